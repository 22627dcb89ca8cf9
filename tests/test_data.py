"""Data sources and the data checks: the embedded movie snippets, CSV / TSV / JSONL with int or string
labels, pairs; every kind of bad data refused in the pre-flight with its exact message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from pipeline.data import SOURCES, load_splits
from pipeline.data.labels import LabelColumn, assign_label_ids
from pipeline.data.sources import movie_snippets_path
from pipeline.data.splits import DataError
from pipeline.schema import ConfigError, DataConfig


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


def _ids(split) -> set[tuple]:
    return set(zip(split.texts, split.labels, split.pairs or [None] * len(split)))


def test_tuning_split_is_disjoint_from_train_calib_and_eval(tmp_path):
    """Decisions (tune stage, QAT best state) read the tuning split only: it never shares an example with
    the other splits, and carving it out changes neither the eval set nor the default training set."""
    cfg = DataConfig(name="m", source="movie_snippets", num_train=6000, num_calib=512, num_eval=2000)
    s = load_splits(cfg)
    assert len(s.tune) == 400  # auto: 400 (a tenth of the 8,093-snippet remainder is more)
    # The snippet file repeats some texts: a text in two splits must occur that often in the file.
    counts = Counter(row.split("\t", 2)[2].strip() for row in movie_snippets_path().read_text().splitlines()[1:] if row.count("\t") >= 2)
    for other in (s.train, s.calib, s.eval):
        assert all(counts[t] >= 2 for t in set(s.tune.texts) & set(other.texts))
    without = load_splits(DataConfig(name="m", source="movie_snippets", num_train=6000, num_calib=512, num_eval=2000, num_tune=0))
    assert without.tune is None and without.train.texts == s.train.texts and without.eval.texts == s.eval.texts
    # Files: held out of the training file before calibration and training examples are drawn.
    _write_csv(tmp_path / "train.csv", ["text", "label"], [[f"t{i}", str(i % 2)] for i in range(50)])
    _write_csv(tmp_path / "eval.csv", ["text", "label"], [[f"e{i}", str(i % 2)] for i in range(10)])
    f = load_splits(_csv_cfg(tmp_path, num_calib=20))
    assert len(f.tune) == 5 and len(f.train) == 45  # auto: a tenth of 50 rows
    assert not {t for t in f.tune.texts} & ({*f.train.texts} | {*f.calib.texts} | {*f.eval.texts})
    assert load_splits(_csv_cfg(tmp_path, num_tune=0)).tune is None
    with pytest.raises(DataError, match="data.num_tune: 50 tuning examples leave no training data"):
        load_splits(_csv_cfg(tmp_path, num_tune=50))


def test_csv_string_labels_sorted_and_pairs(tmp_path):
    _write_csv(tmp_path / "train.csv", ["premise", "hyp", "gold"], [["a", "b", "yes"], ["c", "d", "no"], ["e", "f", "maybe"]])
    _write_csv(tmp_path / "eval.csv", ["premise", "hyp", "gold"], [["g", "h", "no"]])
    s = load_splits(_csv_cfg(tmp_path, text_column="premise", text_pair_column="hyp", label_column="gold"))
    assert s.label_names == ["maybe", "no", "yes"]
    assert s.eval.labels == [1] and s.eval.pairs == ["h"]
    assert sorted(zip(s.train.texts, s.train.labels)) == [("a", 2), ("c", 1), ("e", 0)]


def test_csv_int_labels_are_the_ids_and_data_labels_sets_the_order(tmp_path):
    _write_csv(tmp_path / "train.csv", ["text", "label"], [["x", "0"], ["y", "2"], ["w", "1"]])
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
    assert e.value.errors == [
        "data.text_column: column 'text' not found in data.train_path; available columns: sentence, label",
        "data.text_column: column 'text' not found in data.eval_path; available columns: sentence, label",
    ]


def test_unsupported_extension(tmp_path):
    (tmp_path / "a.xlsx").write_text("x")
    _write_csv(tmp_path / "eval.csv", ["text", "label"], [["y", "1"]])
    with pytest.raises(DataError) as e:
        load_splits(_csv_cfg(tmp_path, train_path=str(tmp_path / "a.xlsx")))
    assert e.value.errors == ["data.train_path: unsupported file type '.xlsx'; valid: .csv, .tsv, .jsonl, .json"]


# ---------------------------------------------------------------------------------------------
# Bad data: each case -> its exact message, through run_pipeline (the pre-flight), nothing written.

GOOD_EVAL = b"text,label\nfine,0\ngood,1\n"


def _case_files(tmp_path: Path, train: bytes, eval_: bytes = GOOD_EVAL, suffix: str = ".csv") -> tuple[str, str]:
    tr, ev = tmp_path / f"train{suffix}", tmp_path / f"eval{suffix}"
    tr.write_bytes(train)
    ev.write_bytes(eval_)
    return str(tr), str(ev)


# name -> (train bytes, eval bytes, suffix, extra overrides, expected errors with {train} / {eval} for the paths)
BAD = {
    "latin1_bytes": (
        b"text,label\ncaf\xe9 noir,1\nok,0\n",
        GOOD_EVAL,
        ".csv",
        [],
        [
            "data.train_path: {train}: not valid utf-8 at byte offset 14 (line 2, byte 0xe9); "
            "set data.encoding to the file's encoding, e.g. data.encoding=latin-1"
        ],
    ),
    "short_row": (
        b"text,label\nok,1\nno label here\nfine,0\n",
        GOOD_EVAL,
        ".csv",
        [],
        ["data.train_path: {train} line 3: 1 field, the header has 2 (missing: label)"],
    ),
    "long_row": (
        b"text,label\nok,1\nan, unquoted comma,0\n",
        GOOD_EVAL,
        ".csv",
        [],
        ["data.train_path: {train} line 3: 3 fields, the header has 2"],
    ),
    "jsonl_missing_key": (
        b'{"text": "ok", "label": 1}\n{"text": "no label"}\n{"text": "fine", "label": 0}\n',
        b'{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n',
        ".jsonl",
        [],
        ["data.train_path: {train} line 2: no key 'label' (keys: text)"],
    ),
    "nan_label": (
        b"text,label\nok,1\nnot rated,NaN\nfine,0\n",
        GOOD_EVAL,
        ".csv",
        [],
        ["data.train_path: {train} line 3, column 'label': label is 'NaN' (a missing value)"],
    ),
    "json_nan_label": (
        b'{"text": "ok", "label": 1}\n{"text": "not rated", "label": NaN}\n{"text": "fine", "label": 0}\n',
        b'{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n',
        ".jsonl",
        [],
        ["data.train_path: {train} line 2, column 'label': label is NaN (a missing value)"],
    ),
    "blank_label": (
        b"text,label\nok,1\nfine,0\nnot rated, \n",
        GOOD_EVAL,
        ".csv",
        [],
        ["data.train_path: {train} line 4, column 'label': label is blank"],
    ),
    "integer_gap": (
        b"text,label\nok,0\nfine,2\n",
        b"text,label\ngood,2\n",
        ".csv",
        [],
        [
            "data.label_column: integer labels are class ids 0..K-1, but the training labels have no 1 (they are 0, 2); "
            "renumber them, or list the classes in data.labels (e.g. data.labels=[0,2])"
        ],
    ),
    "one_string_among_integers": (
        b"text,label\nok,1\nfine,0\nmeh,pos\ngood,1\n",
        GOOD_EVAL,
        ".csv",
        [],
        [
            "data.train_path: {train} line 4, column 'label': label 'pos' is not an integer, unlike the other labels (to mix them, list every class in data.labels)"
        ],
    ),
    "eval_integer_unseen_in_train": (
        b"text,label\nok,1\nfine,0\n",
        b"text,label\ngood,1\nodd,2\n",
        ".csv",
        [],
        ["data.eval_path: {eval} line 3, column 'label': label 2 is not among the training labels (0, 1)"],
    ),
    "eval_string_unseen_in_train": (
        b"text,label\nok,pos\nfine,neg\n",
        b"text,label\ngood,pos\nso-so,neutral\n",
        ".csv",
        [],
        ["data.eval_path: {eval} line 3, column 'label': label 'neutral' is not among the training labels ('neg', 'pos')"],
    ),
    "empty_text": (
        b'text,label\nok,1\n"  ",0\nfine,0\n',
        GOOD_EVAL,
        ".csv",
        [],
        ["data.train_path: {train} line 3, column 'text': text is empty"],
    ),
    "unterminated_quote": (
        b'text,label\nok,1\n"never closed,0\nfine,0\n',
        GOOD_EVAL,
        ".csv",
        [],
        ["data.train_path: {train} line 3: malformed CSV (unexpected end of data); the rest of the file was not read"],
    ),
    "label_not_in_data_labels": (
        b"text,label\nok,pos\nfine,neg\nmeh,neutral\n",
        b"text,label\ngood,pos\n",
        ".csv",
        ["data.labels=[neg,pos]"],
        ["data.train_path: {train} line 4, column 'label': label 'neutral' is not in data.labels ('neg', 'pos')"],
    ),
    "unknown_encoding": (
        b"text,label\nok,1\nfine,0\n",
        GOOD_EVAL,
        ".csv",
        ["data.encoding=klingon"],
        ["data.encoding: unknown encoding 'klingon' (e.g. utf-8, latin-1, cp1252, utf-16)"],
    ),
    "every_problem_of_both_files_at_once": (
        b"text,label\n,1\nfine\nok,nan\n",
        b"text,label\ngood,\n",
        ".csv",
        [],
        [
            "data.train_path: {train} line 2, column 'text': text is empty",
            "data.train_path: {train} line 3: 1 field, the header has 2 (missing: label)",
            "data.train_path: {train} line 4, column 'label': label is 'nan' (a missing value)",
            "data.eval_path: {eval} line 2, column 'label': label is blank",
        ],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_data_is_refused_before_the_run_folder_exists(tmp_path, case):
    from tests.conftest import run_tiny

    train, eval_, suffix, extra, expected = BAD[case]
    tr, ev = _case_files(tmp_path, train, eval_, suffix)
    with pytest.raises(ConfigError) as e:
        run_tiny(tmp_path, ["data=csv", f"data.train_path={tr}", f"data.eval_path={ev}", *extra])
    assert e.value.errors == [m.format(train=tr, eval=ev) for m in expected]
    assert not (tmp_path / "run").exists()


def test_a_bom_header_just_works(tmp_path):
    tr, ev = _case_files(tmp_path, b"\xef\xbb\xbftext,label\nok,1\nfine,0\n", b"\xef\xbb\xbftext,label\ngood,1\n")
    s = load_splits(_csv_cfg(tmp_path, train_path=tr, eval_path=ev))
    assert sorted(s.train.texts) == ["fine", "ok"] and s.eval.texts == ["good"] and s.label_names == ["0", "1"]


def test_data_encoding_reads_latin1(tmp_path):
    tr, ev = _case_files(tmp_path, b"text,label\ncaf\xe9 noir,1\nok,0\n", b"text,label\nd\xe9j\xe0 vu,1\n")
    s = load_splits(_csv_cfg(tmp_path, train_path=tr, eval_path=ev, encoding="latin-1"))
    assert sorted(s.train.texts) == ["café noir", "ok"] and s.eval.texts == ["déjà vu"]


def test_data_labels_closes_an_integer_gap(tmp_path):
    """The documented way out of the gap refusal: data.labels lists the classes, ids follow its order."""
    tr, ev = _case_files(tmp_path, b"text,label\nok,0\nfine,2\n", b"text,label\ngood,2\n")
    s = load_splits(_csv_cfg(tmp_path, train_path=tr, eval_path=ev, labels=[0, 2]))
    assert s.label_names == ["0", "2"] and s.eval.labels == [1] and sorted(s.train.labels) == [0, 1]


def test_quoted_newlines_keep_line_numbers_exact(tmp_path):
    tr, ev = _case_files(tmp_path, b'text,label\n"two\nlines",1\n"three\n\nlines",0\nok,\n', GOOD_EVAL)
    with pytest.raises(DataError) as e:
        load_splits(_csv_cfg(tmp_path, train_path=tr, eval_path=ev))
    assert e.value.errors == [f"data.train_path: {tr} line 7, column 'label': label is blank"]


def test_tsv_and_json_array(tmp_path):
    tr, ev = _case_files(tmp_path, b"text\tlabel\nok, with comma\tpos\nfine\tneg\n", b"", ".tsv")
    (tmp_path / "eval.json").write_text(json.dumps([{"text": "good", "label": "pos"}, {"text": "", "label": "neg"}]))
    with pytest.raises(DataError) as e:
        load_splits(_csv_cfg(tmp_path, train_path=tr, eval_path=str(tmp_path / "eval.json")))
    assert e.value.errors == [f"data.eval_path: {tmp_path}/eval.json item 2, column 'text': text is empty"]
    (tmp_path / "eval.json").write_text(json.dumps([{"text": "good", "label": "pos"}]))
    s = load_splits(_csv_cfg(tmp_path, train_path=tr, eval_path=str(tmp_path / "eval.json")))
    assert sorted(s.train.texts) == ["fine", "ok, with comma"] and s.label_names == ["neg", "pos"] and s.eval.labels == [1]


def test_many_problems_list_the_first_20_and_count_the_rest(tmp_path):
    rows = b"".join(b"row %d,\n" % i for i in range(25))
    tr, ev = _case_files(tmp_path, b"text,label\nok,1\nfine,0\n" + rows)
    with pytest.raises(DataError) as e:
        load_splits(_csv_cfg(tmp_path, train_path=tr, eval_path=ev))
    assert len(e.value.problems) == 25
    assert e.value.errors == [f"data.train_path: {tr} line {n}, column 'label': label is blank" for n in range(4, 24)] + [
        "... and 5 more (25 in all)"
    ]


def test_label_rules_are_one_function_for_every_split():
    """A third split (e.g. a future tuning set) is checked against the training classes like eval."""
    cols = {
        "train": LabelColumn([0, 1, 1], lambda i: f"train {i}"),
        "eval": LabelColumn([1, 0], lambda i: f"eval {i}"),
        "tune": LabelColumn([0, 3], lambda i: f"tune {i}"),
    }
    problems: list[str] = []
    assert assign_label_ids(cols, problems) is None
    assert problems == ["tune 1: label 3 is not among the training labels (0, 1)"]
    problems = []
    got = assign_label_ids({"train": cols["train"], "eval": cols["eval"]}, problems, class_names=["neg", "pos"])
    assert problems == [] and got.ids == {"train": [0, 1, 1], "eval": [1, 0]} and got.names == ["neg", "pos"]
    assert assign_label_ids({"train": LabelColumn(["a", "a"], str)}, problems) is None
    assert problems == ["data.label_column: a classifier needs at least 2 classes; the labels are 'a'"]


def test_hub_rows_go_through_the_same_rules(monkeypatch):
    """data=hub offline: a local DatasetDict stands in for the download; a ClassLabel keeps its names."""
    import datasets

    feats = datasets.Features({"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"sentence": ["a", "b", "c"], "label": [0, 1, 1]}, features=feats),
        validation=datasets.Dataset.from_dict({"sentence": ["d", ""], "label": [1, -1]}, features=feats),
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: dd)
    cfg = DataConfig(name="h", source="hub", hub_id="x/y", text_column="sentence", num_calib=2)
    with pytest.raises(DataError) as e:
        load_splits(cfg)
    assert e.value.errors == [
        "data.hub_id=x/y[validation] row 1, column 'sentence': text is empty",
        "data.hub_id=x/y[validation] row 1, column 'label': label -1 is not a class of this data (ids 0..1: 'neg', 'pos')",
    ]
    dd["validation"] = dd["validation"].select([0])
    s = load_splits(cfg)
    assert s.label_names == ["neg", "pos"] and s.eval.labels == [1]


def test_the_load_stage_uses_the_data_the_preflight_validated(tmp_path, monkeypatch):
    from tests.conftest import run_tiny

    calls = []
    real = SOURCES["csv"]
    monkeypatch.setitem(SOURCES, "csv", lambda cfg: calls.append(cfg) or real(cfg))
    tr, ev = _case_files(tmp_path, b"text,label\n" + b"".join(b"review %d,%d\n" % (i, i % 2) for i in range(40)))
    ctx = run_tiny(
        tmp_path,
        ["data=csv", f"data.train_path={tr}", f"data.eval_path={ev}", "finetune=none", "calibration=none", "qat=none"]
        + ["export=none", "engine=none", "benchmark=none", "evaluate.enabled=false"],
    )
    assert len(calls) == 1 and ctx.stages["load"].status == "done"
    assert len(ctx.splits.eval) == 2 and ctx.splits.label_names == ["0", "1"]


def test_cli_bad_data_exits_2_without_traceback_or_run_folder(tmp_path):
    from tests.conftest import TINY

    tr, ev = _case_files(tmp_path, b"text,label\nok,1\nno label here\nfine,\n")
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            *TINY,
            "data=csv",
            f"data.train_path={tr}",
            f"data.eval_path={ev}",
            f"hydra.run.dir={tmp_path}/run",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert (
        f"error: invalid configuration (2 errors):\n"
        f"  - data.train_path: {tr} line 3: 1 field, the header has 2 (missing: label)\n"
        f"  - data.train_path: {tr} line 4, column 'label': label is blank\n"
    ) in r.stderr
    # Refused in the RunDirGuard callback, before Hydra creates the run folder: nothing at all is written.
    assert not (tmp_path / "run").exists()


class _PadTokenizer:
    """tokenizer.pad as Hugging Face's does it for right padding: enough for batches()."""

    def pad(self, features, return_tensors="pt"):
        import torch

        n = max(len(f["input_ids"]) for f in features)
        return {
            "input_ids": torch.tensor([f["input_ids"] + [0] * (n - len(f["input_ids"])) for f in features]),
            "attention_mask": torch.tensor([[1] * len(f["input_ids"]) + [0] * (n - len(f["input_ids"])) for f in features]),
        }


def test_length_grouped_training_batches_cover_every_example_once_with_less_padding():
    import random

    from pipeline.data.batching import Encoded, batches

    rng = random.Random(0)
    lengths = [rng.randint(3, 80) for _ in range(2000)]
    data = Encoded([{"input_ids": [1] * n} for n in lengths], list(range(2000)))

    def epoch(seed, grouped):
        return list(batches(_PadTokenizer(), data, 16, shuffle=True, seed=seed, group_by_length=grouped))

    plain, grouped = epoch(1, False), epoch(1, True)
    assert sorted(i for b in grouped for i in b.index) == list(range(2000))  # each example once per epoch
    assert all(b.labels.tolist() == b.index for b in grouped)  # labels stay with their examples
    padded = {name: sum(b.inputs["input_ids"].numel() for b in bs) for name, bs in (("plain", plain), ("grouped", grouped))}
    assert padded["grouped"] < 0.7 * padded["plain"], padded
    assert [b.index for b in epoch(1, True)] == [b.index for b in grouped]  # seeded
    assert [b.index for b in epoch(2, True)] != [b.index for b in grouped]  # another epoch, another draw
    # Long batches are not all at the start or the end: the batch order is shuffled too.
    widths = [b.inputs["input_ids"].shape[1] for b in grouped]
    assert widths != sorted(widths) and widths != sorted(widths, reverse=True)
    # group_by_length off keeps the plain permutation exactly (runs before the key behave as they did).
    assert [b.index for b in plain] == [order[i : i + 16] for order in [_perm(2000, 1)] for i in range(0, 2000, 16)]


def _perm(n, seed):
    import random

    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order
