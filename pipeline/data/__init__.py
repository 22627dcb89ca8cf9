"""Task data: labelled text splits (train / calibration / eval) and tokenized batches.

Sources are config options (`data.source`), each a loader in `SOURCES`:
movie_snippets (embedded default), csv (CSV/TSV/JSONL files), hub (`datasets`, e.g. GLUE).
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.data.batching import Batch, batches, encode
from pipeline.data.sources import load_hub, load_movie_snippets, load_table
from pipeline.data.splits import DataSplits, Split
from pipeline.schema import DataConfig

SOURCES: dict[str, Callable[[DataConfig], DataSplits]] = {
    "movie_snippets": load_movie_snippets,
    "csv": load_table,
    "hub": load_hub,
}


def load_splits(cfg: DataConfig) -> DataSplits:
    return SOURCES[cfg.source](cfg)


__all__ = ["Batch", "DataSplits", "SOURCES", "Split", "batches", "encode", "load_splits"]
