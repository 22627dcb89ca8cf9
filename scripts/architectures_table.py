"""Print the README's architecture table: every cell measured by the same checks as
tests/test_architectures.py (pipeline/verify.py), on tiny random-weight models, offline.

    python scripts/architectures_table.py
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from pipeline.testing import CONF, run_tiny
from pipeline.verify import measure

# Every configured architecture (conf/model/), the embedded default first as in the README table.
MODELS = sorted((p.stem for p in (CONF / "model").glob("*.yaml")), key=lambda m: (m != "minilm_l6", m))


def main() -> None:
    logging.disable(logging.INFO)
    print(
        "| model | forward | attention Q/DQ | export (dyn. shapes) | ORT int8 GEMMs / float | padding max rel. diff (fp32 / fake-quant / int8) | FP32 engine vs torch | parity argmax / cosine | TensorRT graphs: rule violations | TensorRT INT8 graph parity (ORT) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for model in MODELS:
            ctx = run_tiny(Path(tmp), [f"model={model}", "benchmark=none", "finetune.max_steps=2"], name=model)
            m = measure(ctx)
            print(
                f"| {model} | ok | {m['attention_quantizers']} quantizers | {'ok' if m['dynamic_shapes'] else 'FAIL'} | "
                f"{m['int8_gemms']} / {m['float_gemms']} | {m['pad_fp32_torch']:.1e} / {m['pad_fake_quant']:.1e} / {m['pad_int8_engine']:.1e} | "
                f"{m['fp32_engine_vs_torch']:.1e} | {100 * m['parity_argmax']:.1f} % / {m['parity_cosine']:.5f} | {m['trt_violations']} | "
                f"{100 * m['trt_parity_argmax']:.1f} % / {m['trt_parity_cosine']:.5f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
