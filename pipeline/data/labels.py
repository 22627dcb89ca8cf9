"""The label rules, one function for every source and every split: raw labels -> class ids 0..K-1.

1. A label is an integer (JSON `1` or `1.0`; text `1`, ` 1`, `+1`, `1.0`) or a non-empty string
   (surrounding spaces ignored; JSON `true`/`false` read as "true"/"false"). Refused, each with its
   line: null, NaN (JSON `NaN`, the text `nan` in any case), a blank label, anything else (`0.5`, lists).
2. `data.labels` given: it lists the classes in id order (strings or integers); each label is looked
   up by its text (`1` matches `"1"`) and must be listed. A listed class may have no training example.
3. Else, a source that names its classes (a hub dataset's ClassLabel, the embedded movie snippets):
   integers are those ids, strings those names.
4. Else labels are all integers or all strings; a mixture is refused (listing the lines of the rarer
   kind). Integers are the ids themselves: they must be 0..K-1 and every one of them must occur in
   the training split (a gap would be a class with no example, and K = max + 1 would be wrong).
   Strings get ids in the sorted order of the training split's distinct labels.
5. Every other split (eval, and any later split such as a tuning set) may only use labels that occur
   in the training split, under every rule above: a class the model never saw cannot be scored fairly.
6. At least two classes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

_INTEGER = re.compile(r"[+-]?\d+(?:\.0*)?")


@dataclass
class LabelColumn:
    """The raw labels of one split as read, and where each came from (for the messages)."""

    values: list
    where: Callable[[int], str]  # row index -> "data.train_path: train.csv line 3, column 'label'"
    complete: bool = True  # False: some rows of the split could not be read (their labels are not here)


@dataclass
class LabelIds:
    ids: dict[str, list[int]]  # per split name, aligned with its LabelColumn.values
    names: list[str]  # names[id]


def _normalize(value) -> tuple[int | str | None, str | None]:
    """(label, None) with an int or a stripped string, or (None, why it is refused)."""
    if value is None:
        return None, "label is null (a missing value)"
    if isinstance(value, bool):  # before int: bool is an int subclass
        return str(value).lower(), None
    if isinstance(value, int):
        return value, None
    if isinstance(value, float):
        if math.isnan(value):
            return None, "label is NaN (a missing value)"
        if value.is_integer():
            return int(value), None
        return None, f"label {value!r} is neither an integer nor a string"
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None, "label is blank"
        if text.lower() == "nan":  # what str() of a missing float writes; never a real class name
            return None, f"label is {text!r} (a missing value)"
        if _INTEGER.fullmatch(text):
            return int(text.split(".")[0]), None
        return text, None
    return None, f"label {value!r} is neither an integer nor a string"


def _show(values) -> str:
    """Labels for a message: integers bare, strings quoted, at most 12."""
    values = list(values)
    shown = ", ".join(repr(v) for v in values[:12])
    return shown + (f", ... ({len(values)} in all)" if len(values) > 12 else "")


def assign_label_ids(
    columns: dict[str, LabelColumn],
    problems: list[str],
    *,
    labels: Sequence[str | int] | None = None,
    class_names: Sequence[str] | None = None,
    key: str = "data.label_column",
) -> LabelIds | None:
    """Apply the module's rules to every split; `columns` must contain "train" (it defines the classes).

    Args:
        columns: raw labels per split name ("train", "eval", ...).
        problems: every refused label is appended here, one line each, with its location.
        labels: `data.labels` (rule 2).
        class_names: the source's own class names (rule 3), used when `labels` is None.
        key: the config key named by messages about the labels as a whole.

    Returns:
        The ids and class names, or None when anything was refused (the reasons are in `problems`).
    """
    before = len(problems)
    norm: dict[str, list[int | str | None]] = {}
    for split, col in columns.items():
        norm[split] = []
        for i, value in enumerate(col.values):
            label, why = _normalize(value)
            if why:
                problems.append(f"{col.where(i)}: {why}")
            norm[split].append(label)
    # Conclusions from the training class set (a gap, an eval label not in training, too few classes)
    # need every training label: with rows missing they would be guesses, so they wait until the rows
    # are fixed. Checks of each label on its own go on.
    complete = columns["train"].complete and all(lab is not None for lab in norm["train"])

    lookup: Callable[[int | str], int | None]
    if labels is not None:
        names = []
        for i, item in enumerate(labels):  # normalized like the labels themselves: 1, "1" and "1.0" are one class
            lab, why = _normalize(item)
            if why:
                problems.append(f"data.labels[{i}]: {why}")
            names.append(str(lab))
        for n in sorted({n for n in names if names.count(n) > 1}):
            problems.append(f"data.labels: {n!r} is listed more than once")
        index = {n: i for i, n in enumerate(names)}
        lookup = lambda lab: index.get(str(lab))  # noqa: E731
        unknown = f"is not in data.labels ({_show(names)})"
    elif class_names is not None:
        names = list(class_names)
        index = {n: i for i, n in enumerate(names)}
        lookup = lambda lab: (lab if 0 <= lab < len(names) else None) if isinstance(lab, int) else index.get(lab)  # noqa: E731
        unknown = f"is not a class of this data (ids 0..{len(names) - 1}: {_show(names)})"
    else:
        names, lookup, unknown = _own_classes(columns, norm, problems, key, complete)
        if names is None:
            return None

    ids: dict[str, list[int | None]] = {}
    for split, col in columns.items():
        ids[split] = [None if lab is None else lookup(lab) for lab in norm[split]]
        for i, (lab, cid) in enumerate(zip(norm[split], ids[split])):
            if lab is not None and cid is None:
                problems.append(f"{col.where(i)}: label {lab!r} {unknown}")
    seen = {cid for cid in ids["train"] if cid is not None}
    as_read = {cid: lab for lab, cid in zip(norm["train"], ids["train"]) if cid is not None}  # id -> label as in the data
    for split, col in columns.items():
        if split == "train" or not complete:
            continue
        for i, cid in enumerate(ids[split]):
            if cid is not None and cid not in seen:
                problems.append(
                    f"{col.where(i)}: label {norm[split][i]!r} is not among the training labels ({_show(as_read[c] for c in sorted(seen))})"
                )
    if complete and len(names) < 2:
        problems.append(f"{key}: a classifier needs at least 2 classes; the labels are {_show(names)}")
    return None if len(problems) > before else LabelIds(ids, names)  # type: ignore[arg-type]  (no None left when no problem)


def _own_classes(columns, norm, problems, key, complete):
    """Rule 4: classes from the labels themselves. Returns (names, lookup, unknown) or Nones."""
    kinds = {split: [isinstance(lab, int) for lab in labs if lab is not None] for split, labs in norm.items()}
    n_int = sum(sum(k) for k in kinds.values())
    n_str = sum(len(k) for k in kinds.values()) - n_int
    if n_int and n_str:
        rare_is_int = n_int < n_str
        for split, col in columns.items():
            for i, lab in enumerate(norm[split]):
                if lab is not None and isinstance(lab, int) == rare_is_int:
                    what = "an integer among string labels" if rare_is_int else "not an integer, unlike the other labels"
                    problems.append(f"{col.where(i)}: label {lab!r} is {what} (to mix them, list every class in data.labels)")
        return None, None, None
    train = {lab for lab in norm["train"] if lab is not None}
    if n_int:
        negative = False
        for split, col in columns.items():
            for i, lab in enumerate(norm[split]):
                if lab is not None and lab < 0:
                    negative = True
                    problems.append(f"{col.where(i)}: label {lab} is negative; integer labels are class ids 0..K-1")
        if negative:
            return None, None, None
        k = max(train, default=-1) + 1
        gaps = sorted(set(range(k)) - train)
        if gaps and complete:
            problems.append(
                f"{key}: integer labels are class ids 0..K-1, but the training labels have no {_show(gaps)} (they are "
                f"{_show(sorted(train))}); renumber them, or list the classes in data.labels (e.g. data.labels=[{','.join(map(str, sorted(train)))}])"
            )
            return None, None, None
        return [str(i) for i in range(k)], lambda lab: lab if lab < k else None, f"is not among the training labels ({_show(range(k))})"
    names = sorted(train)
    index = {n: i for i, n in enumerate(names)}
    return names, index.get, f"is not among the training labels ({_show(names)})"
