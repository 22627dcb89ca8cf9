"""Accuracy budget (config group `tune`, stage pipeline/stages/tune.py).

- groups.py: fusion groups — the quantizers that return to float together so an engine keeps (or
  cleanly drops) one fused INT8 kernel.
- calibrators.py: every calibrator's activation amax from the one calibration pass's histograms.
- sensitivity.py: cheap per-group proxy (KL of the logits on the hardest tuning examples).
- search.py: greedy, latency-aware fallback until the drop is within budget.
- latency.py: re-export + rebuild the run's engine and time it against the baseline, interleaved.
- plan.py: tuned_quant.yaml (write, validate, apply). plots.py: sensitivity.png, tune_trace.png.
"""
