"""Task data: labelled text splits (train / calibration / eval) and tokenized batches.

Sources are config options (`data.source`), each a loader in `SOURCES`:
movie_snippets (embedded default), csv (CSV/TSV/JSONL/JSON files), hub (`datasets`, e.g. GLUE).
Every source checks its rows and applies the label rules of `pipeline.data.labels`, raising one
DataError that lists every problem.
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.data.batching import Batch, batches, encode
from pipeline.data.sources import load_hub, load_movie_snippets, load_table
from pipeline.data.splits import DataError, DataSplits, Split
from pipeline.schema import DataConfig

SOURCES: dict[str, Callable[[DataConfig], DataSplits]] = {
    "movie_snippets": load_movie_snippets,
    "csv": load_table,
    "hub": load_hub,
}

# Sources read and validated in the pre-flight, before the run folder exists: local files, cheap to
# read. Hub datasets may need a download, so the load stage checks them (same rules).
PREFLIGHT_SOURCES = ("movie_snippets", "csv")


def load_splits(cfg: DataConfig) -> DataSplits:
    return SOURCES[cfg.source](cfg)


__all__ = ["Batch", "DataError", "DataSplits", "PREFLIGHT_SOURCES", "SOURCES", "Split", "batches", "encode", "load_splits"]
