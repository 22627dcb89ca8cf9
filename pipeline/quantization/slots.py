"""Tensor slots: where in a layer a quantizer sits, named for people (the sensitivity and activation-range
tools group by these) and as a layer-wildcarded name (the tuner's per-slot calibration).

A quantizer's layer is the first ".<digits>." of its name (encoder.layer.3., transformer.layer.3., layers.3.);
later numbers (GemmPair indices) tell different GEMMs of one layer apart and stay.
"""

from __future__ import annotations

import fnmatch
import re

LAYER = re.compile(r"\.(\d+)\.")

# Readable slot -> (quantizer-name globs, role); BERT-family and MPNet module names; first match wins.
NAMED: list[tuple[str, list[str], str]] = [
    (
        "FFN2 input (GELU out)",
        ["*.layer.[0-9].output.dense.input_quantizer", "*.layer.[0-9][0-9].output.dense.input_quantizer"],
        "linear_input",
    ),
    ("FFN1 input (LN out)", ["*.intermediate.dense.input_quantizer"], "linear_input"),
    ("attn-out input", ["*.attention.attn.o.input_quantizer", "*.attention.output.dense.input_quantizer"], "linear_input"),
    (
        "QKV input (LN out)",
        ["*.attn.[qkv].input_quantizer", "*.self.query.input_quantizer", "*.self.key.input_quantizer", "*.self.value.input_quantizer"],
        "linear_input",
    ),
    ("Linear weights", ["*"], "linear_weight"),
    ("attn Q, K", ["*"], "attn_q"),
    ("attn Q, K", ["*"], "attn_k"),
    ("attn P (softmax)", ["*"], "attn_probs"),
    ("attn V", ["*"], "attn_v"),
]


def slot_of(name: str, role: str) -> str:
    """The readable slot of quantizer `name` with `role` ("other (<role>)" for positions not named above)."""
    for slot, globs, want in NAMED:
        if role == want and any(fnmatch.fnmatchcase(name, g) for g in globs):
            return slot
    return f"other ({role})"


def layer_of(name: str) -> int | None:
    m = LAYER.search(name)
    return int(m.group(1)) if m else None


def position(name: str) -> str:
    """The name with its layer index wildcarded: one position in every layer."""
    return LAYER.sub(".*.", name, count=1)


def position_globs(names: list[str]) -> list[str]:
    """fnmatch globs for one position in every layer: the layer index as [0-9] per digit ("*" would also
    match "0.attention" and catch the attention output's Linear with the FFN's)."""
    return sorted({LAYER.sub(lambda m: "." + "[0-9]" * len(m[1]) + ".", n, count=1) for n in names}, key=len)
