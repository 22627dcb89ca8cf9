"""Which PTQ recipe keeps a sentence-embedding model's neighbours: many fake-quant variants, one process.

Loads the model and calibrates it once exactly as the pipeline does (`run_pipeline` with `task=embedding`,
load -> calibrate only), keeps the calibration pass's own histograms, then for each variant re-sets amax (every
calibrator recomputed from those histograms with the project's calibrator code, pipeline/tune/calibrators.py),
the weight range or which quantizers are on, embeds the eval split in fake quant and reports against the FP32
embeddings: cosine mean / 1st percentile and recall@10 agreement (the task's own functions,
pipeline/tasks/embedding.py). Seconds per variant instead of a pipeline run each; the best variants are then
confirmed on the INT8 ONNX Runtime engine with the real pipeline (fake quant is not the engine: compare the two).

Variants (`--variants`, comma-separated; default: all):
    <cal>            every activation quantizer by calibrator <cal> (max, percentile_99_9, percentile_99_99,
                     percentile_99_999, entropy, mse)
    <cal>+<slot>_<c2> <cal> everywhere, one slot's Linear inputs by <c2> (repeatable): ffn2 (FFN second Linear,
                     GELU output), ffn1, qkv, ln (= qkv + ffn1: LayerNorm outputs), attnout
    ...@w8           the same with 8-bit weights (quant.weight_range=full; amax unchanged, scale amax/127)
    ...@ffn2_float   the same with the FFN second Linears' inputs not quantized (those GEMMs in float)
    ...@weights_only / @acts_only   only the weights / only the activations quantized (where the loss is)
    ...@float_<slot> one slot's inputs not quantized: qkv, attnout, ffn1, ffn2 (Linear inputs), attn (Q, K, P, V)

Smoothing and more calibration data change the calibration pass itself: run the script again with pipeline
overrides after `--` (e.g. `-- smoothing=ffn_down smoothing.alpha=0.5`, `-- data.num_calib=2048
calibration.num_batches=64`). On a shared machine: `nice -n 10`, and a few variants per invocation.

    python scripts/embedding_probe.py --variants percentile_99_99,mse,mse+ffn2_max@w8 --json outputs/probe.json
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import pipeline.run
from pipeline.inference import torch_logits
from pipeline.run import run_pipeline
from pipeline.tasks.embedding import cosine_rows, recall_at_k
from pipeline.testing import compose_cfg
from pipeline.tune.calibrators import CANDIDATES, candidate_amax, load_histograms
from pipeline.validation import validate

# The FFN second Linear's input (GELU output) of BERT-style encoders: conf/calibration/percentile_ffn_mse.yaml.
FFN2 = ["*.layer.[0-9].output.dense.input_quantizer", "*.layer.[0-9][0-9].output.dense.input_quantizer"]
# Linear-input slots of BERT-style encoders (module-name globs) and the attention GEMM inputs (roles): @float_<slot>.
SLOTS = {
    "qkv": ["*.self.query.input_quantizer", "*.self.key.input_quantizer", "*.self.value.input_quantizer"],
    "attnout": ["*.attention.output.dense.input_quantizer"],
    "ffn1": ["*.intermediate.dense.input_quantizer"],
    "ffn2": FFN2,
}
SLOTS["ln"] = SLOTS["qkv"] + SLOTS["ffn1"]  # every LayerNorm output a Linear reads
ATTENTION_ROLES = ("attn_q", "attn_k", "attn_v", "attn_probs")
MODIFIERS = ("w8", "ffn2_float", "weights_only", "acts_only", *(f"float_{s}" for s in (*SLOTS, "attn")))


def default_variants() -> list[str]:
    out = list(CANDIDATES)
    out += [f"percentile_99_99+{s}_{c}" for s in ("ffn2", "ln") for c in CANDIDATES if c != "percentile_99_99"]
    out += [f"{v}@w8" for v in ("percentile_99_99", "mse", "percentile_99_99+ffn2_mse")]
    out += ["percentile_99_99@ffn2_float", "percentile_99_99@weights_only", "percentile_99_99@acts_only"]
    return out


def parse(variant: str) -> tuple[str, dict[str, str], set[str]]:
    """'mse+ffn2_max+qkv_percentile_99_9@w8' -> ('mse', {'ffn2': 'max', 'qkv': 'percentile_99_9'}, {'w8'})."""
    body, *mods = variant.split("@")
    base, *parts = body.split("+")
    per_slot = {}
    for part in parts:
        slot, _, cal = part.partition("_")
        if slot not in SLOTS:
            raise SystemExit(f"--variants: unknown slot {slot!r} in {variant!r}; valid: {', '.join(SLOTS)}")
        per_slot[slot] = cal
    for c in (base, *per_slot.values()):
        if c not in CANDIDATES:
            raise SystemExit(f"--variants: unknown calibrator {c!r} in {variant!r}; valid: {', '.join(CANDIDATES)}")
    for m in mods:
        if m not in MODIFIERS:
            raise SystemExit(f"--variants: unknown modifier @{m} in {variant!r}; valid: {', '.join(MODIFIERS)}")
    return base, per_slot, set(mods)


def _fp32_embeddings(ctx, cfg, ev, bs: int) -> np.ndarray:
    """The FP32 embeddings of the eval split, cached under the stage cache by what determines them (model,
    data, pooling): repeated invocations with other calibration settings skip this forward pass."""
    key = hashlib.sha256(
        json.dumps(
            [dataclasses.asdict(cfg.model), dataclasses.asdict(cfg.data), dataclasses.asdict(cfg.task)], sort_keys=True, default=str
        ).encode()
    ).hexdigest()[:16]
    path = Path(cfg.cache.dir).expanduser() / f"embedding_probe_fp32_{key}.npy"
    if cfg.cache.enabled and path.exists():
        return np.load(path)
    ref = torch_logits(ctx.fp32_model, ctx.tokenizer, ev, bs, ctx.device)
    if cfg.cache.enabled:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path.with_suffix(".tmp.npy"), ref)
        path.with_suffix(".tmp.npy").replace(path)
    return ref


def main(argv: list[str] | None = None) -> int:
    with tempfile.TemporaryDirectory(prefix="embedding-probe-") as scratch:  # the run's files go with it
        return _main(argv, Path(scratch))


def _main(argv: list[str] | None, scratch: Path) -> int:
    argv = sys.argv[1:] if argv is None else argv
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=None, help="comma-separated variant names (see the module doc); default: all")
    p.add_argument("--json", type=Path, default=None, help="write every number here")
    p.add_argument("--k", type=int, default=10, help="recall@k")
    p.add_argument("--limit", type=int, default=None, help="screen on the first N eval sentences (recall@k then ranks within those N only)")
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    variants = args.variants.split(",") if args.variants else default_variants()
    parsed = [(v, *parse(v)) for v in variants]
    t0 = time.perf_counter()
    # 7-bit weights as the ONNX Runtime engine on this AVX2 CPU (engine=none would resolve auto to full);
    # the user's overrides come last and win.
    raw = compose_cfg(
        [
            "task=embedding",
            "qat=none",
            "export=none",
            "engine=none",
            "benchmark=none",
            "evaluate.enabled=false",
            "quant.weight_range=reduced",
            *overrides,
        ]
    )
    cfg = validate(raw)
    run_dir = scratch / "run"
    # load -> calibrate exactly as a run (stage cache included); the report stage (plots) is not needed here.
    stages = pipeline.run.STAGES
    pipeline.run.STAGES = [s for s in stages if s[0] != "report"]
    try:
        ctx = run_pipeline(raw, run_dir)
    finally:
        pipeline.run.STAGES = stages
    hists = load_histograms(run_dir)
    qs = ctx.quantizers
    ev = ctx.encoded["eval"]
    bs = cfg.evaluate.batch_size
    ref = _fp32_embeddings(ctx, cfg, ev, bs)  # the whole split (cached), cut below
    if args.limit:
        ev = dataclasses.replace(ev, features=ev.features[: args.limit], labels=ev.labels[: args.limit])
        ref = ref[: args.limit]
    setup_s = time.perf_counter() - t0
    print(f"setup {setup_s:.0f} s: {len(qs)} quantizers, {len(hists)} histograms, eval {len(ref)} sentences", flush=True)
    if not hists:
        raise SystemExit("the calibration kept no histograms: use a histogram calibration (percentile / entropy / mse)")
    wanted = sorted({c for _, b, per_slot, _ in parsed for c in (b, *per_slot.values())})
    amax_of = {c: candidate_amax(c, hists, qs, cfg.calibration) for c in wanted}
    slot_members = {k: {n for n in qs if any(fnmatch.fnmatchcase(n, g) for g in globs)} for k, globs in SLOTS.items()}
    ffn2 = slot_members["ffn2"]
    saved = {n: (q.amax.clone() if q.amax is not None else None, q.enabled, q.num_bits) for n, q in qs.items()}

    def restore() -> None:
        for n, (a, en, bits) in saved.items():
            qs[n].amax, qs[n].enabled, qs[n].num_bits = a, en, bits

    rows = []
    for v, base, per_slot, mods in parsed:
        t1 = time.perf_counter()
        for n, a in amax_of[base].items():
            qs[n].load_amax(a)
        for slot, cal in per_slot.items():
            for n in slot_members[slot] & set(amax_of[cal]):
                qs[n].load_amax(amax_of[cal][n])
        for n, q in qs.items():
            weight = q.role == "linear_weight"
            if "w8" in mods and weight:
                q.num_bits = 8
            if ("ffn2_float" in mods and n in ffn2) or ("weights_only" in mods and not weight) or ("acts_only" in mods and weight):
                q.enabled = False
            if any(f"float_{k}" in mods and any(fnmatch.fnmatchcase(n, g) for g in globs) for k, globs in SLOTS.items()):
                q.enabled = False  # the Linear's input in float (its weight stays quantized; the GEMM runs in float)
            if "float_attn" in mods and q.role in ATTENTION_ROLES:
                q.enabled = False
        emb = torch_logits(ctx.model, ctx.tokenizer, ev, bs, ctx.device)
        cos = cosine_rows(emb, ref)
        row = {
            "variant": v,
            "cosine_mean": float(cos.mean()),
            "cosine_p1": float(np.percentile(cos, 1)),
            f"recall_at_{args.k}": recall_at_k(ref, emb, args.k),
            "seconds": round(time.perf_counter() - t1, 1),
        }
        rows.append(row)
        print(
            f"{v:40s} cosine {row['cosine_mean']:.5f} p1 {row['cosine_p1']:.5f} recall@{args.k} {row[f'recall_at_{args.k}']:.4f}"
            f"  ({row['seconds']} s)",
            flush=True,
        )
        restore()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {
            "overrides": overrides,
            "calibration": dataclasses.asdict(cfg.calibration),
            "smoothing": dataclasses.asdict(cfg.smoothing),
            "eval_sentences": len(ref),
            "setup_seconds": round(setup_s, 1),
            "rows": rows,
        }
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
