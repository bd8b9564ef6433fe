"""Model quality under other training settings: DLRM recall@20 on each half of the held-out customers.

Trains `train_dlrm` on the encoded examples a `feedpipe run` stored, once per setting, and ranks the
customers of both halves as the evaluation does (the training days' purchases excluded), against the
generator's oracle. The validation half is the one a choice of defaults may look at (the model early-stops
on it, so its figures flatter every setting alike); the test half is what `model_evaluation` reports.

    FEEDPIPE_HOME=H feedpipe run --date D              # demo data, stored under H/artifacts
    benchmarks/model_quality.py --artifacts H/artifacts --data H/demo --date D '{}' '{"embedding_weight_decay": 3e-4}'

Each setting is a JSON object of `TrainConfig` fields over the defaults. Prints a line per setting and one
JSON line last: {"date", "settings": [{"setting", "epochs", "validation": {...}, "test": {...}, "seconds"}]}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import feedpipe  # noqa: E402,F401  (first: it sets OMP_WAIT_POLICY before torch loads OpenMP)
import polars as pl  # noqa: E402

from feedpipe.model_evaluation import evaluate_rankers, split_pairs  # noqa: E402
from feedpipe.training import TrainConfig, TrainedModel, model_shape, split_examples, train_dlrm  # noqa: E402
from feedpipe.training_examples import SPLIT, TEST, VALIDATION  # noqa: E402
from feedpipe.vocabularies import Vocabularies  # noqa: E402


def validation_as_test(examples: pl.DataFrame) -> pl.DataFrame:
    """The examples with the validation half where the evaluation reads the test half (and that half set aside)."""
    return examples.with_columns(
        pl.when(pl.col(SPLIT) == VALIDATION).then(pl.lit(TEST))
        .when(pl.col(SPLIT) == TEST).then(pl.lit("set_aside"))
        .otherwise(pl.col(SPLIT)).alias(SPLIT)
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", required=True, help="the artifacts root of a feedpipe run")
    p.add_argument("--data", required=True, help="its demo data directory (for truth.parquet)")
    p.add_argument("--date", required=True, help="its feed date, YYYY-MM-DD")
    p.add_argument("settings", nargs="+", help="JSON objects of TrainConfig fields")
    args = p.parse_args()

    root, day = Path(args.artifacts), args.date
    examples = pl.read_parquet(root / "training_examples" / f"{day}.parquet")
    customers = pl.read_parquet(root / "customers" / f"{day}.parquet")
    products = pl.read_parquet(root / "products" / f"{day}.parquet")
    truth = pl.read_parquet(Path(args.data) / "truth.parquet")
    vocab = Vocabularies.load(root / "vocabularies" / day)
    history, _ = split_pairs(examples)
    halves = {"validation": validation_as_test(examples), "test": examples}
    train, valid = split_examples(examples, vocab.customer_specs, vocab.product_specs)
    results = []
    for setting in args.settings:
        config = replace(TrainConfig(), **json.loads(setting))
        t0 = time.perf_counter()
        result = train_dlrm(train, valid, model_shape(vocab.customer_specs, vocab.product_specs, vocab, config), config)
        trained = TrainedModel(result.model, vocab.customer_specs, vocab.product_specs, vocab, "model_quality")
        row = {"setting": json.loads(setting), "epochs": len(result.history)}
        for half, frame in halves.items():
            ranking = evaluate_rankers(trained, frame, customers, products, k=20, truth=truth, with_lightgbm=False,
                                       exclude=history).ranking
            dlrm, oracle = ranking["dlrm"]["recall"], ranking["oracle"]["recall"]
            row[half] = {"recall": round(dlrm, 4), "oracle": round(oracle, 4), "of_oracle": round(dlrm / oracle, 3)}
        row["seconds"] = round(time.perf_counter() - t0, 1)
        results.append(row)
        print(f"{setting}: {row['epochs']} epochs; validation half {row['validation']}, test half {row['test']}",
              flush=True)
    print(json.dumps({"date": day, "settings": results}))


if __name__ == "__main__":
    main()
