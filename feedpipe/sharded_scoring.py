"""All-pairs scoring split by customers across torchrun ranks.

Rank r of W scores the r-th of W contiguous customer ranges against every product with the exact
scorer (`ranking.model_ranking`, the same call `pair_scores` makes in one process), writes its part,
and rank 0 concatenates the parts in rank order: the merged frame is the one-process frame, bit for
bit (tested). That needs the ranges to start on the scorer's work-unit boundaries: the scorer runs
its GEMMs per unit of customers, and oneDNN's blocking over a unit's rows makes a score depend in
its last bit on where the customer sits in the unit (measured: 3 of 7,475 scores moved by 3e-8
with ranges cut elsewhere). A unit is a fraction of a second of work (a few seconds for catalogues near
the customer-rows layout's 29k-product limit, where a unit is one tile of 512 customers), so whole
units balance ranks well enough once each rank has several.

Ranks do not talk while scoring (each holds the whole model, which is small next to the pairs): they
agree once on the unit size before it and wait at a barrier before the merge, so a rank on a slower
machine delays the merge and nothing else.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import torch

from feedpipe.contract import PRODUCT_ID
from feedpipe.process_group import RankGroup, split_range
from feedpipe.ranking import model_ranking
from feedpipe.scoring import (
    DEFAULT_PAIRS_PER_TILE,
    DEFAULT_PAIRS_PER_UNIT,
    customer_units,
    customers_as_rows,
    default_pairs_per_tile,
    default_pairs_per_unit,
)
from feedpipe.training import TrainedModel


def customers_per_unit(num_scored_products: int, pairs_per_tile: int = DEFAULT_PAIRS_PER_TILE,
                       pairs_per_unit: int = DEFAULT_PAIRS_PER_UNIT, customer_rows: bool = False) -> int:
    """Customers in one of the scorer's work units at this tile and unit size (the device's defaults)
    and layout (`scoring.customers_as_rows`)."""
    # The scorer's own unit rule: ranges aligned to it make the merged result bit-identical (a
    # change to the rule shows up as a failing row-for-row test, not as a silent difference).
    n = pairs_per_unit + pairs_per_tile  # more customers than any unit holds
    start, stop = customer_units(n, num_scored_products, pairs_per_tile, pairs_per_unit, customer_rows)[0]
    return stop - start


def customer_range(num_customers: int, num_scored_products: int, world_size: int, rank: int,
                   pairs_per_tile: int = DEFAULT_PAIRS_PER_TILE,
                   pairs_per_unit: int = DEFAULT_PAIRS_PER_UNIT, customer_rows: bool = False) -> tuple[int, int]:
    """[start, stop) of this rank's customers: a contiguous run of whole scorer units."""
    per_unit = customers_per_unit(num_scored_products, pairs_per_tile, pairs_per_unit, customer_rows)
    return unit_range(num_customers, per_unit, world_size, rank)


def unit_range(num_customers: int, per_unit: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of this rank's share of `num_customers` cut into units of `per_unit` customers."""
    units = -(-num_customers // per_unit)
    first, last = split_range(units, world_size, rank)
    return min(num_customers, first * per_unit), min(num_customers, last * per_unit)


def scored_products(products: pl.DataFrame, unavailable: pl.Series | None) -> int:
    """How many products the scorer scores: those not unavailable."""
    if unavailable is None or not unavailable.len():
        return products.height
    return products.height - products.join(unavailable.to_frame(PRODUCT_ID), on=PRODUCT_ID, how="semi").height


def agreed_customers_per_unit(group: RankGroup, num_scored_products: int, pairs_per_tile: int,
                              pairs_per_unit: int, customer_rows: bool) -> int:
    """The unit every rank cuts its range from: the smallest of the ranks' own.

    Hosts may differ (with AMX a bf16 tile is 4x larger and products are its rows, so the unit differs
    too), and ranges cut from different units would overlap or leave customers out. Where all ranks agree, as on identical hosts, this is each one's own unit and
    the merged ranking equals one process's to the bit.
    """
    return group.min(customers_per_unit(num_scored_products, pairs_per_tile, pairs_per_unit, customer_rows))


def rank_customers(customers: pl.DataFrame, group: RankGroup, per_unit: int) -> pl.DataFrame:
    """This rank's customer rows: a contiguous run of whole units of `per_unit` customers."""
    start, stop = unit_range(customers.height, per_unit, group.world_size, group.rank)
    return customers.slice(start, stop - start)


def part_path(directory: str | Path, rank: int) -> Path:
    return Path(directory) / f"part-{rank:05d}.parquet"


def score_rank_part(
    trained: TrainedModel,
    customers: pl.DataFrame,
    products: pl.DataFrame,
    group: RankGroup,
    parts_dir: str | Path,
    *,
    top_n: int,
    exclude: pl.DataFrame | None = None,
    unavailable: pl.Series | None = None,
    dtype: torch.dtype = torch.float32,
    rerank: bool = False,
) -> tuple[int, int]:
    """Score this rank's customers and write its part; returns (customers, pairs) it scored."""
    device = next(trained.model.parameters()).device
    # what the scorer will use
    tile, unit = default_pairs_per_tile(device, dtype), default_pairs_per_unit(device)
    n_scored = scored_products(products, unavailable)
    rows = customers_as_rows(trained.model, n_scored, device, dtype)
    mine = rank_customers(customers, group, agreed_customers_per_unit(group, n_scored, tile, unit, rows))
    ranking = model_ranking(trained, mine, products, top_n=top_n, exclude=exclude, unavailable=unavailable,
                            dtype=dtype, rerank=rerank, pairs_per_tile=tile)
    Path(parts_dir).mkdir(parents=True, exist_ok=True)
    tmp = part_path(parts_dir, group.rank).with_suffix(".tmp")
    ranking.write_parquet(tmp)
    tmp.replace(part_path(parts_dir, group.rank))
    return mine.height, mine.height * products.height


def merge_parts(parts_dir: str | Path, world_size: int, out: str | Path) -> pl.DataFrame:
    """Concatenate the ranks' parts in rank order into `out` (written atomically); parts are removed."""
    paths = [part_path(parts_dir, r) for r in range(world_size)]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"scoring parts missing (a rank failed before writing?): {missing}")
    merged = pl.concat([pl.read_parquet(p) for p in paths], how="vertical")
    tmp = Path(out).with_suffix(".tmp")
    merged.write_parquet(tmp)
    tmp.replace(out)
    for p in paths:
        p.unlink()
    return merged
