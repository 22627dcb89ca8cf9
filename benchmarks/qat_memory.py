"""Peak memory of QAT on the embedded default: batch 32 x sequence 128 (every token real, no padding),
all quantizers active, the FP32 teacher loaded (as qat=kd), a few optimizer steps.

    python benchmarks/qat_memory.py [--steps 5] [--batch 32] [--seq 128]
Prints the process's peak RSS (ru_maxrss) and seconds per step.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from pipeline.models import load_model
from pipeline.quantization import rules as qrules
from pipeline.quantization.calibrate import calibrate
from pipeline.quantization.placement import insert_quantizers
from pipeline.testing import compose_cfg
from pipeline.training import kd_loss
from pipeline.validation import validate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    cfg = validate(compose_cfg(["qat=kd"]))
    torch.manual_seed(0)
    loaded = load_model(cfg.model, 2, torch.device("cpu"))
    model, tok = loaded.model, loaded.tokenizer
    teacher = load_model(cfg.model, 2, torch.device("cpu")).model.eval()
    vocab = len(tok)
    ids = torch.randint(1000, vocab, (args.batch, args.seq))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    qs = insert_quantizers(model, cfg.quant, cfg.calibration, inputs)
    calibrate(model, qs, [inputs], cfg.calibration, rules=qrules.as_rules(cfg.quant.rules))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.qat.lr)
    labels = torch.randint(0, 2, (args.batch,))
    model.train()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        with torch.no_grad():
            t_logits = teacher(**inputs).logits
        loss = kd_loss(model(**inputs).logits, t_logits, labels, cfg.qat.kd_alpha, cfg.qat.kd_temperature)
        opt.zero_grad()
        loss.backward()
        opt.step()
    dt = (time.perf_counter() - t0) / args.steps
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"QAT (kd) batch {args.batch} x seq {args.seq}, {len(qs)} quantizers: peak RSS {rss:.0f} MiB, {dt:.2f} s/step")


if __name__ == "__main__":
    main()
