"""Categorical vocabularies (value -> embedding row) and dense feature scalers.

Index layout follows NVTabular's Categorify: 0 padding, 1 null, 2 out-of-vocabulary, then the
vocabulary, most frequent first. A vocabulary is stable across nights: `build_vocabularies` given
yesterday's vocabularies keeps every known value at its index and appends newly qualifying values,
so a product's embedding row never moves under a reader of yesterday's checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import polars as pl

from feedpipe.contract import CATEGORICAL, CUSTOMER_ID, CUSTOMERS, DENSE, MULTI_CATEGORICAL, PRODUCT_ID, PRODUCTS
from feedpipe.sources import FeatureSpec

PAD_INDEX = 0
NULL_INDEX = 1
OOV_INDEX = 2
FIRST_VALUE_INDEX = 3

VOCAB_SCHEMA = {"feature": pl.Utf8, "value": pl.Utf8, "index": pl.Int64, "count": pl.Int64}


@dataclass(frozen=True)
class DenseScaler:
    """z-score of sign(x)*log1p(|x|): heavy-tailed prices and counts land on a comparable scale."""

    mean: float
    std: float


@dataclass
class Vocabularies:
    """Every categorical feature's value -> index table, plus the dense features' scalers.

    `table` has one row per (feature, value): columns feature, value, index, count.
    """

    table: pl.DataFrame
    scalers: dict[str, DenseScaler] = field(default_factory=dict)
    min_count: int = 1
    customer_specs: list[FeatureSpec] = field(default_factory=list)
    product_specs: list[FeatureSpec] = field(default_factory=list)

    def features(self) -> list[str]:
        return self.table.get_column("feature").unique(maintain_order=True).to_list()

    def for_feature(self, feature: str) -> pl.DataFrame:
        return self.table.filter(pl.col("feature") == feature).select("value", "index")

    def size(self, feature: str) -> int:
        """Rows the embedding table needs: reserved indices plus the largest assigned index."""
        idx = self.table.filter(pl.col("feature") == feature).get_column("index")
        return FIRST_VALUE_INDEX if idx.is_empty() else int(idx.max()) + 1

    def sizes(self) -> dict[str, int]:
        """Every categorical feature's table size, those with no value kept too (all values rarer than
        `min_count`, all null, every bag empty): they still get an embedding table of the reserved rows."""
        named = [feature_key(s) for s in self.customer_specs + self.product_specs if s.role != DENSE]
        return {f: self.size(f) for f in dict.fromkeys(self.features() + named)}

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.table.write_parquet(directory / "vocabularies.parquet")
        pl.DataFrame(
            {
                "feature": list(self.scalers),
                "mean": [s.mean for s in self.scalers.values()],
                "std": [s.std for s in self.scalers.values()],
            },
            schema={"feature": pl.Utf8, "mean": pl.Float64, "std": pl.Float64},
        ).write_parquet(directory / "dense_scalers.parquet")
        (directory / "features.json").write_text(
            json.dumps(
                {
                    "min_count": self.min_count,
                    "customer_specs": [asdict(x) for x in self.customer_specs],
                    "product_specs": [asdict(x) for x in self.product_specs],
                },
                indent=2,
            )
        )

    @classmethod
    def load(cls, directory: str | Path) -> "Vocabularies":
        directory = Path(directory)
        table = pl.read_parquet(directory / "vocabularies.parquet")
        scalers_df = pl.read_parquet(directory / "dense_scalers.parquet")
        scalers = {
            r["feature"]: DenseScaler(r["mean"], r["std"]) for r in scalers_df.iter_rows(named=True)
        }
        features = json.loads((directory / "features.json").read_text())
        return cls(
            table=table,
            scalers=scalers,
            min_count=features["min_count"],
            customer_specs=[FeatureSpec(**x) for x in features["customer_specs"]],
            product_specs=[FeatureSpec(**x) for x in features["product_specs"]],
        )


def _value_counts(values: pl.Series, role: str) -> pl.DataFrame:
    """Counts of each non-null value, most frequent first, ties broken by value for determinism."""
    if role == MULTI_CATEGORICAL:
        values = values.explode()
    s = values.cast(pl.Utf8).drop_nulls()
    return (
        s.to_frame("value")
        .group_by("value")
        .agg(pl.len().cast(pl.Int64).alias("count"))
        .sort(["count", "value"], descending=[True, False])
    )


def _extend_vocabulary(
    feature: str, counts: pl.DataFrame, previous: pl.DataFrame | None, min_count: int
) -> pl.DataFrame:
    """Known values keep their index (count refreshed); new values with enough count are appended."""
    if previous is None or previous.is_empty():
        known = pl.DataFrame(schema=VOCAB_SCHEMA)
        next_index = FIRST_VALUE_INDEX
    else:
        known = previous.select("value", "index").join(counts, on="value", how="left").with_columns(
            pl.col("count").fill_null(0)
        )
        known = known.select(pl.lit(feature).alias("feature"), "value", "index", "count")
        next_index = int(previous.get_column("index").max()) + 1
    new = counts.filter(pl.col("count") >= min_count).join(known.select("value"), on="value", how="anti")
    new = new.with_columns(
        pl.lit(feature).alias("feature"),
        (pl.int_range(pl.len(), dtype=pl.Int64) + next_index).alias("index"),
    ).select("feature", "value", "index", "count")
    return pl.concat([known.cast(VOCAB_SCHEMA), new.cast(VOCAB_SCHEMA)])


def categorical_features(specs: list[FeatureSpec]) -> list[FeatureSpec]:
    return [s for s in specs if s.role in (CATEGORICAL, MULTI_CATEGORICAL)]


def dense_features(specs: list[FeatureSpec]) -> list[FeatureSpec]:
    return [s for s in specs if s.role == DENSE]


def side_specs(table: str, df: pl.DataFrame, config=None) -> list[FeatureSpec]:
    """A side's features: its id first, then its attributes in column order (roles from sources)."""
    from feedpipe.sources import infer_features

    id_spec = FeatureSpec(CUSTOMER_ID if table == CUSTOMERS else PRODUCT_ID, table, CATEGORICAL)
    return [id_spec] + infer_features(table, df, config)


def _signed_log(col: pl.Expr) -> pl.Expr:
    return col.sign() * col.abs().log1p()


def build_vocabularies(
    tables: dict[str, pl.DataFrame],
    specs: list[FeatureSpec],
    *,
    id_counts: dict[str, pl.DataFrame] | None = None,
    previous: Vocabularies | None = None,
    min_count: int = 1,
) -> Vocabularies:
    """Vocabularies for every categorical spec and scalers for every dense spec.

    `tables` maps contract.CUSTOMERS / PRODUCTS to their frames. Attribute values are counted over
    the entity table's rows. Ids are counted by `id_counts` (id -> count, e.g. transactions in the
    training window) when given, so the most bought products get the lowest indices; every id in
    the entity table still gets a row (count 0 at worst) because the feed scores the whole catalogue.
    """
    parts = []
    scalers: dict[str, DenseScaler] = {}
    for spec in specs:
        df = tables[spec.table]
        key = feature_key(spec)
        prev = previous.table.filter(pl.col("feature") == key) if previous is not None else None
        if spec.role == DENSE:
            x = df.select(_signed_log(pl.col(spec.name).cast(pl.Float64)).alias("x")).get_column("x")
            mean = float(x.mean()) if x.drop_nulls().len() else 0.0
            std = float(x.std()) if x.drop_nulls().len() > 1 else 1.0
            scalers[key] = DenseScaler(mean, std if std and std > 1e-12 else 1.0)
            continue
        counts = _value_counts(df.get_column(spec.name), spec.role)
        feature_min_count = min_count
        if id_counts is not None and spec.name in id_counts:
            # Ids: order by activity, but keep every catalogue entry (min count 0 keeps zero-count ids).
            counts = (
                counts.select("value")
                .join(id_counts[spec.name].rename({spec.name: "value"}).cast({"value": pl.Utf8}), on="value", how="left")
                .with_columns(pl.col("count").fill_null(0).cast(pl.Int64))
                .sort(["count", "value"], descending=[True, False])
            )
            feature_min_count = 0
        elif spec.name in (CUSTOMER_ID, PRODUCT_ID):
            feature_min_count = 0
        parts.append(_extend_vocabulary(key, counts, prev, feature_min_count))
    table = pl.concat(parts) if parts else pl.DataFrame(schema=VOCAB_SCHEMA)
    return Vocabularies(
        table=table,
        scalers=scalers,
        min_count=min_count,
        customer_specs=[x for x in specs if x.table == CUSTOMERS],
        product_specs=[x for x in specs if x.table == PRODUCTS],
    )


def encode_column(values: pl.Series, vocab: pl.DataFrame, role: str) -> pl.Series:
    """Values -> indices: null -> NULL_INDEX, unknown -> OOV_INDEX. Multi-valued -> List(Int64)."""
    name = values.name
    lookup = vocab.select(pl.col("value"), pl.col("index"))
    if role == MULTI_CATEGORICAL:
        rows = values.to_frame("v").with_row_index("row")
        items = rows.explode("v").filter(pl.col("v").is_not_null())
        items = items.join(lookup, left_on=pl.col("v").cast(pl.Utf8), right_on="value", how="left", maintain_order="left")
        bags = items.group_by("row", maintain_order=True).agg(pl.col("index").fill_null(OOV_INDEX))
        # An empty or null list becomes [NULL_INDEX]: a bag is never empty, so every row pools something.
        out = rows.select("row").join(bags, on="row", how="left", maintain_order="left").with_columns(
            pl.col("index").fill_null(pl.lit([NULL_INDEX], dtype=pl.List(pl.Int64)))
        )
        return out.get_column("index").cast(pl.List(pl.Int64)).alias(name)
    df = values.cast(pl.Utf8).to_frame("v").join(lookup, left_on="v", right_on="value", how="left", maintain_order="left")
    idx = df.select(
        pl.when(pl.col("v").is_null()).then(NULL_INDEX).otherwise(pl.col("index").fill_null(OOV_INDEX)).cast(pl.Int64)
    ).to_series()
    return idx.alias(name)


def scale_dense(values: pl.Series, scaler: DenseScaler) -> pl.Series:
    """Scaled float32; nulls become 0 (the mean), which is what the model saw for them in training."""
    x = values.cast(pl.Float64).to_frame("x").select(((_signed_log(pl.col("x")) - scaler.mean) / scaler.std).fill_null(0.0).fill_nan(0.0))
    return x.to_series().cast(pl.Float32).alias(values.name)


def feature_key(spec: FeatureSpec) -> str:
    """The feature's name everywhere downstream (vocabulary, encoded column, KJT key, embedding table).

    Prefixed by its table so a customer attribute and a product attribute may share a column name.
    """
    return f"{spec.table}.{spec.name}"


def encode_table(df: pl.DataFrame, id_column: str, specs: list[FeatureSpec], vocabularies: Vocabularies) -> pl.DataFrame:
    """The entity table with every feature encoded: the raw id (text) plus one column per feature key.

    Categorical -> Int64, multi-valued -> List(Int64), dense -> Float32 (scaled).
    """
    cols = [df.get_column(id_column).alias(id_column)]
    for spec in specs:
        key = feature_key(spec)
        s = df.get_column(spec.name)
        if spec.role == DENSE:
            cols.append(scale_dense(s, vocabularies.scalers[key]).alias(key))
        else:
            cols.append(encode_column(s, vocabularies.for_feature(key), spec.role).alias(key))
    return pl.DataFrame(cols)


def oov_share(values: pl.Series, vocab: pl.DataFrame, role: str, min_count: int = 1) -> float:
    """Share of non-null values that the vocabulary has no row for (a drift signal), counting only values
    seen at least `min_count` times in `values`: a vocabulary built with that threshold leaves rarer ones
    out by design, and counting them called unchanged data drifted night after night (the demo's products:
    19 of 80 brands occur once)."""
    v = (values.explode() if role == MULTI_CATEGORICAL else values).drop_nulls().cast(pl.Utf8)
    if not v.len():
        return 0.0
    unknown = ~v.is_in(vocab.get_column("value").cast(pl.Utf8))
    if min_count > 1:
        counts = v.to_frame("v").group_by("v").len()
        unknown &= v.is_in(counts.filter(pl.col("len") >= min_count).get_column("v"))
    return float(unknown.mean())
