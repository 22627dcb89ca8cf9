"""Is folding SmoothQuant's 1/s into LayerNorm gamma/beta exact in a post-LayerNorm encoder? (No.)

In BERT/MPNet the attention block's LayerNorm output feeds the FFN first Linear AND is the residual added
to the FFN output. Dividing gamma/beta by s (and multiplying the Linear's weight columns by s) keeps the
Linear's output but changes the residual branch, so the model's outputs change. The explicit Mul that
pipeline/quantization/smoothing.py puts on the Linear's input branch instead leaves them unchanged
(tests/test_outliers.py::test_smoothing_fold_leaves_fp32_outputs_unchanged).

    python scripts/ln_fold_check.py      # tiny random BERT, a second on CPU
"""

from __future__ import annotations

import copy

import torch

from pipeline.models import load_model
from pipeline.testing import compose_cfg
from pipeline.validation import validate


def main() -> None:
    torch.manual_seed(0)
    cfg = validate(compose_cfg(["model.random_init=true"]))
    loaded = load_model(cfg.model, 2, torch.device("cpu"))
    model, tok = loaded.model.eval(), loaded.tokenizer
    x = tok(["a fine film", "dull and far too long, nothing works"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**x).logits
        folded = copy.deepcopy(model)
        s = torch.rand(folded.config.hidden_size) * 4 + 0.25
        for layer in folded.bert.encoder.layer:
            ln = layer.attention.output.LayerNorm  # feeds intermediate.dense and the FFN's residual add
            ln.weight.div_(s)
            ln.bias.div_(s)
            layer.intermediate.dense.weight.mul_(s)
        out = folded(**x).logits
    print(f"LayerNorm fold: max |logit diff| {float((out - ref).abs().max()):.3g} (max |logit| {float(ref.abs().max()):.3g})")


if __name__ == "__main__":
    main()
