"""Data sources: the embedded movie snippets, CSV / TSV / JSONL with int or string labels, pairs."""

from __future__ import annotations

import json

import pytest

from pipeline.data import load_splits
from pipeline.data.splits import DataError
from pipeline.schema import DataConfig


def _csv_cfg(tmp_path, **kw) -> DataConfig:
    base = dict(name="csv", source="csv", train_path=str(tmp_path / "train.csv"), eval_path=str(tmp_path / "eval.csv"), num_calib=2)
    return DataConfig(**{**base, **kw})


def _write_csv(path, header, rows):
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_movie_snippets_split_is_disjoint_and_seeded():
    cfg = DataConfig(name="m", source="movie_snippets", num_train=300, num_calib=50, num_eval=100)
    a, b = load_splits(cfg), load_splits(cfg)
    assert (len(a.train), len(a.calib), len(a.eval)) == (300, 50, 100)
    assert a.eval.texts == b.eval.texts and a.train.texts == b.train.texts
    assert not set(a.eval.texts) & set(a.train.texts) - {""}
    assert set(a.train.labels) == {0, 1} and a.label_names == ["negative", "positive"]
    # num_train never changes the eval set
    c = load_splits(DataConfig(name="m", source="movie_snippets", num_train=50, num_calib=50, num_eval=100))
    assert c.eval.texts == a.eval.texts


def test_csv_string_labels_sorted_and_pairs(tmp_path):
    _write_csv(tmp_path / "train.csv", ["premise", "hyp", "gold"], [["a", "b", "yes"], ["c", "d", "no"], ["e", "f", "maybe"]])
    _write_csv(tmp_path / "eval.csv", ["premise", "hyp", "gold"], [["g", "h", "no"]])
    s = load_splits(_csv_cfg(tmp_path, text_column="premise", text_pair_column="hyp", label_column="gold"))
    assert s.label_names == ["maybe", "no", "yes"]
    assert s.eval.labels == [1] and s.eval.pairs == ["h"]
    assert sorted(zip(s.train.texts, s.train.labels)) == [("a", 2), ("c", 1), ("e", 0)]


def test_csv_int_labels_and_explicit_label_order(tmp_path):
    _write_csv(tmp_path / "train.csv", ["text", "label"], [["x", "0"], ["y", "2"]])
    _write_csv(tmp_path / "eval.csv", ["text", "label"], [["z", "1"]])
    s = load_splits(_csv_cfg(tmp_path))
    assert s.label_names == ["0", "1", "2"] and s.eval.labels == [1]
    _write_csv(tmp_path / "train.csv", ["text", "label"], [["x", "pos"], ["y", "neg"]])
    _write_csv(tmp_path / "eval.csv", ["text", "label"], [["z", "neg"]])
    s = load_splits(_csv_cfg(tmp_path, labels=["pos", "neg"]))
    assert s.label_names == ["pos", "neg"] and s.eval.labels == [1]


def test_jsonl(tmp_path):
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"sentence": f"s{i}", "label": i % 2}) for i in range(10)))
    s = load_splits(
        _csv_cfg(tmp_path, train_path=str(tmp_path / "t.jsonl"), eval_path=str(tmp_path / "t.jsonl"), text_column="sentence", num_train=4)
    )
    assert len(s.train) == 4 and len(s.eval) == 10 and s.label_names == ["0", "1"]


def test_missing_column_names_the_key_and_the_columns(tmp_path):
    _write_csv(tmp_path / "train.csv", ["sentence", "label"], [["x", "0"]])
    _write_csv(tmp_path / "eval.csv", ["sentence", "label"], [["y", "1"]])
    with pytest.raises(DataError) as e:
        load_splits(_csv_cfg(tmp_path))
    assert str(e.value) == "data.text_column: column 'text' not found in data.train_path; available columns: sentence, label"


def test_unknown_eval_label(tmp_path):
    _write_csv(tmp_path / "train.csv", ["text", "label"], [["x", "pos"]])
    _write_csv(tmp_path / "eval.csv", ["text", "label"], [["y", "neutral"]])
    with pytest.raises(DataError, match=r"data.label_column: label 'neutral' is not among the labels \['pos'\]"):
        load_splits(_csv_cfg(tmp_path))


def test_unsupported_extension(tmp_path):
    (tmp_path / "a.xlsx").write_text("x")
    with pytest.raises(DataError, match=r"data.train_path: unsupported file type '.xlsx'; valid: .csv, .tsv, .jsonl, .json"):
        load_splits(_csv_cfg(tmp_path, train_path=str(tmp_path / "a.xlsx")))
