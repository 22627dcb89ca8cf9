"""Print the README's architecture table: every cell measured by the same checks as
tests/test_architectures.py (pipeline/verify.py), on tiny random-weight models, offline.

    python scripts/architectures_table.py            # sequence classification: the checks per architecture
    python scripts/architectures_table.py --tasks    # one column per other task (conf/task/), same tiny models
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from pathlib import Path

from pipeline.testing import CONF, run_tiny
from pipeline.verify import measure

# Every configured architecture (conf/model/), the embedded default first as in the README table.
MODELS = sorted((p.stem for p in (CONF / "model").glob("*.yaml")), key=lambda m: (m != "minilm_l6", m))


# Each non-default task (conf/task/): its extra overrides, and the parity words of its report row.
TASKS = {
    "embedding": [],
    "token_classification": [],
    # short windows, so the synthetic contexts are cut with a stride
    "question_answering": ["model.max_length=64", "task.doc_stride=16"],
}
TASK_RUN = ["benchmark=none", "qat=none", "finetune.max_steps=2", "export.tensorrt_graphs=false"]


def task_cell(run: Path) -> str:
    """INT8 kernels in ORT's optimized graph / float GEMMs, the graph's output, parity in the task's terms."""
    m = json.loads((run / "metrics.json").read_text())
    k = m["quantization"]["engine_kernels"]["int8"]
    int8 = sum(v for op, v in k.items() if op in ("MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "QGemm"))
    p = m["parity"]
    agree = f"{100 * p['argmax_agreement']:.1f} % / " if p.get("argmax_agreement") is not None else ""
    return f"{int8} / {sum(k.values()) - int8} · {agree}{p['cosine']:.5f}"


def tasks_table() -> None:
    print("| model | " + " | ".join(TASKS) + " |")
    print("|---|" + "---|" * len(TASKS))
    with tempfile.TemporaryDirectory() as tmp:
        for model in MODELS:
            cells = []
            for task, extra in TASKS.items():
                name = f"{model}_{task}"
                try:
                    run_tiny(Path(tmp), [f"model={model}", f"task={task}", *TASK_RUN, *extra], name=name)
                    cells.append(task_cell(Path(tmp) / name))
                except Exception as exc:  # a failing architecture x task is a table cell, not the end of the table
                    cells.append(f"FAIL: {type(exc).__name__}: {str(exc)[:80]}")
            print(f"| {model} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    logging.disable(logging.INFO)
    if "--tasks" in sys.argv[1:]:
        tasks_table()
        return
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
