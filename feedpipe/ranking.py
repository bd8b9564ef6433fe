"""Rankings as frames: the model's top-N per customer (via the exact scorer) and the popularity baseline.

Both return `customer_id, product_id, rank (1..N), score` with the same exclusions applied, so
evaluation compares like with like and the feed is just the first K ranks.
"""

from __future__ import annotations

import time

import numpy as np
import polars as pl
import torch

from feedpipe.contract import AVAILABLE, CUSTOMER_ID, PRODUCT_ID
from feedpipe.feature_tensors import side_tensors
from feedpipe.scoring import Exclusions, pair_logits, score_all_pairs
from feedpipe.training import TrainedModel
from feedpipe.vocabularies import encode_table

RANK = "rank"
SCORE = "score"
RANKING_SCHEMA = {CUSTOMER_ID: pl.Utf8, PRODUCT_ID: pl.Utf8, RANK: pl.Int32, SCORE: pl.Float32}


def _row_index(ids: pl.Series, name: str) -> pl.DataFrame:
    return ids.to_frame(name).with_row_index(f"{name}__row")


def exclusions_for(
    exclude: pl.DataFrame | None, customer_ids: pl.Series, product_ids: pl.Series
) -> Exclusions:
    """CSR exclusions aligned with the given id orders, from (customer_id, product_id) pairs."""
    if exclude is None or exclude.is_empty():
        return Exclusions.none(customer_ids.len())
    pairs = (
        exclude.select(CUSTOMER_ID, PRODUCT_ID)
        .join(_row_index(customer_ids, CUSTOMER_ID), on=CUSTOMER_ID)
        .join(_row_index(product_ids, PRODUCT_ID), on=PRODUCT_ID)
    )
    return Exclusions.from_pairs(
        pairs.get_column(f"{CUSTOMER_ID}__row").to_numpy(),
        pairs.get_column(f"{PRODUCT_ID}__row").to_numpy(),
        customer_ids.len(),
    )


def top_n_frame(customer_ids: pl.Series, product_ids: pl.Series, rows: torch.Tensor, scores: torch.Tensor) -> pl.DataFrame:
    """[Nc, N] result tensors -> long frame, dropping unfilled slots (row -1)."""
    n_c, n = rows.shape
    r = rows.numpy().reshape(-1)
    keep = r >= 0
    cust = np.repeat(np.arange(n_c), n)[keep]
    return pl.DataFrame(
        {
            CUSTOMER_ID: customer_ids.gather(cust),
            PRODUCT_ID: product_ids.gather(r[keep]),
            RANK: np.tile(np.arange(1, n + 1, dtype=np.int32), n_c)[keep],
            SCORE: scores.numpy().reshape(-1)[keep].astype(np.float32),
        },
        schema=RANKING_SCHEMA,
    )


def unavailable_products(products: pl.DataFrame) -> pl.Series | None:
    """The ids of products never to be recommended (their availability false, `contract.AVAILABLE`), or None
    when the products say nothing of availability (no `products.available` in the input config)."""
    if AVAILABLE not in products.columns:
        return None
    return products.filter(~pl.col(AVAILABLE)).get_column(PRODUCT_ID)


def model_ranking(
    trained: TrainedModel,
    customers: pl.DataFrame,
    products: pl.DataFrame,
    *,
    top_n: int,
    exclude: pl.DataFrame | None = None,
    unavailable: pl.Series | None = None,
    dtype: torch.dtype = torch.float32,
    rerank: bool = False,
    pairs_per_tile: int | None = None,
    timings: dict[str, float] | None = None,
) -> pl.DataFrame:
    """The model's top-N over the whole product table for every customer in `customers`.

    `exclude`: (customer_id, product_id) pairs never recommended to that customer; `unavailable`:
    product ids never recommended to anyone. `timings`, when given, receives the seconds spent
    encoding, building exclusions, scoring and building the frame.
    """
    t0 = time.perf_counter()
    enc_c = encode_table(customers, CUSTOMER_ID, trained.customer_specs, trained.vocabularies)
    enc_p = encode_table(products, PRODUCT_ID, trained.product_specs, trained.vocabularies)
    c_ids, p_ids = enc_c.get_column(CUSTOMER_ID), enc_p.get_column(PRODUCT_ID)
    device = next(trained.model.parameters()).device
    c_side = side_tensors(enc_c, trained.customer_specs).to(device)
    p_side = side_tensors(enc_p, trained.product_specs).to(device)
    t1 = time.perf_counter()
    exclusions = exclusions_for(exclude, c_ids, p_ids)
    unavailable_rows = None
    if unavailable is not None and unavailable.len():
        rows = _row_index(p_ids, PRODUCT_ID).join(unavailable.to_frame(PRODUCT_ID), on=PRODUCT_ID, how="semi")
        unavailable_rows = torch.from_numpy(rows.get_column(f"{PRODUCT_ID}__row").to_numpy().astype(np.int64))
    t2 = time.perf_counter()
    top = score_all_pairs(
        trained.model,
        c_side,
        p_side,
        top_n=top_n,
        exclusions=exclusions,
        unavailable=unavailable_rows,
        dtype=dtype,
        rerank=rerank,
        pairs_per_tile=pairs_per_tile,
    )
    t3 = time.perf_counter()
    frame = top_n_frame(c_ids, p_ids, top.product_rows.cpu(), top.scores.cpu())
    if timings is not None:
        t4 = time.perf_counter()
        timings.update(encode_s=t1 - t0, exclusions_s=t2 - t1, scoring_s=t3 - t2, frame_s=t4 - t3)
    return frame


def top_k_overlap(
    trained: TrainedModel,
    customers: pl.DataFrame,
    products: pl.DataFrame,
    *,
    dtype: torch.dtype = torch.bfloat16,
    rerank: bool = False,
    k: int = 20,
    sample: int = 256,
    seed: int = 0,
) -> float:
    """Mean share of the fp32 top k that `dtype` (re-ranked in fp32 with `rerank`) also ranks in its
    top k, over a sample of customers.

    How far bf16 can be trusted depends on the model (how far apart its scores are), so pair_scores
    measures it on the model it serves rather than quoting a benchmark's random model.
    """
    customers = customers.sample(min(sample, customers.height), seed=seed) if customers.height > sample else customers
    enc_c = encode_table(customers, CUSTOMER_ID, trained.customer_specs, trained.vocabularies)
    enc_p = encode_table(products, PRODUCT_ID, trained.product_specs, trained.vocabularies)
    device = next(trained.model.parameters()).device
    c_side = side_tensors(enc_c, trained.customer_specs).to(device)
    p_side = side_tensors(enc_p, trained.product_specs).to(device)
    rows = torch.arange(enc_c.height, device=device)
    k = min(k, enc_p.height)
    if k == 0 or not enc_c.height:
        return 1.0
    ref = torch.topk(pair_logits(trained.model, c_side, p_side, rows), k, dim=1).indices
    if rerank:
        got = score_all_pairs(trained.model, c_side, p_side, top_n=k, dtype=dtype, rerank=True).product_rows
        got = got.to(device)
    else:
        got = torch.topk(pair_logits(trained.model, c_side, p_side, rows, dtype=dtype), k, dim=1).indices
    return float((ref.unsqueeze(2) == got.unsqueeze(1)).any(dim=2).float().mean())


def popularity_ranking(
    purchases: pl.DataFrame, customer_ids: pl.Series, *, top_n: int, exclude: pl.DataFrame | None = None
) -> pl.DataFrame:
    """Top sellers (distinct buyers in `purchases`) per customer, minus that customer's exclusions.

    Takes the top (N + most exclusions any customer has) products once, crosses them with the
    customers and filters, so the frame stays customers x (N + a margin), never customers x catalogue.
    Score is the product's share of buyers.
    """
    popular = (
        purchases.select(CUSTOMER_ID, PRODUCT_ID).unique().group_by(PRODUCT_ID).agg(pl.len().alias("buyers"))
        .sort(["buyers", PRODUCT_ID], descending=[True, False])
    )
    n_buyers = max(1, purchases.get_column(CUSTOMER_ID).n_unique())
    margin = 0
    if exclude is not None and not exclude.is_empty():
        margin = int(exclude.group_by(CUSTOMER_ID).agg(pl.len()).get_column("len").max())
    head = popular.head(top_n + margin).with_row_index("pop_rank")
    grid = customer_ids.unique(maintain_order=True).to_frame(CUSTOMER_ID).join(head, how="cross")
    if exclude is not None and not exclude.is_empty():
        grid = grid.join(exclude.select(CUSTOMER_ID, PRODUCT_ID), on=[CUSTOMER_ID, PRODUCT_ID], how="anti")
    return (
        grid.sort([CUSTOMER_ID, "pop_rank"])
        .with_columns(pl.int_range(1, pl.len() + 1).over(CUSTOMER_ID).cast(pl.Int32).alias(RANK))
        .filter(pl.col(RANK) <= top_n)
        .select(CUSTOMER_ID, PRODUCT_ID, RANK, (pl.col("buyers") / n_buyers).cast(pl.Float32).alias(SCORE))
    )


def customers_without_scores(
    in_window: pl.DataFrame, scores: pl.DataFrame, products: pl.DataFrame, exclude: pl.DataFrame | None
) -> tuple[int, int, int]:
    """(customers with history in the window, those of them with no scores, those who bought every product).

    `products`: those that may be recommended (unavailable ones left out), so "every product" is every one of those.

    A customer whose exclusions cover the whole catalogue has nothing left to recommend: no rows, and not a
    fault of the scorer, so they are counted apart rather than as missing.
    """
    with_history = in_window.select(CUSTOMER_ID).unique()
    exhausted = with_history.clear()
    if exclude is not None and products.height:
        exhausted = (
            exclude.join(products.select(PRODUCT_ID), on=PRODUCT_ID, how="semi").group_by(CUSTOMER_ID)
            .agg(pl.col(PRODUCT_ID).n_unique().alias("n")).filter(pl.col("n") >= products.height).select(CUSTOMER_ID)
        )
    unscored = with_history.join(scores.select(CUSTOMER_ID).unique(), on=CUSTOMER_ID, how="anti")
    missing = unscored.join(exhausted, on=CUSTOMER_ID, how="anti").height
    return with_history.height, missing, unscored.height - missing
