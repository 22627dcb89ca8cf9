"""Calibrators: pytorch-quantization's own reference cases, then oracle comparisons against 2.1.3."""

from __future__ import annotations

import pytest
import torch

from pipeline.quantization.calibrators import HistogramCalibrator, MaxCalibrator
from pipeline.quantization.oracle import cpu_oracle


def _amax(batches, method, ctor=None, **kwargs):
    calib = HistogramCalibrator(8, None, **(ctor or {}))
    for b in batches:
        calib.collect(b)
    return float(calib.compute_amax(method, **kwargs))


def _spike(value, spike):
    torch.manual_seed(12345)
    x = torch.ones(11, 7, 3, 3) * value
    x[1, 1, 1, 1] = spike
    return x


GROW = [torch.tensor([0, 255, 255, 255, 255, 255.0]), torch.tensor([0, 255, 255, 255, 255, 256.0])]

# (batches, method, constructor kwargs, compute_amax kwargs, pytorch-quantization 2.1.3 value)
REFERENCE = [
    ([torch.arange(100.0)], "percentile", {}, {"percentile": 90}, 88.9937),
    ([torch.arange(100.0)], "percentile", {"unsigned": True}, {"percentile": 80}, 78.9873),
    ([torch.arange(100.0), torch.arange(0, 50, 0.5)], "percentile", {}, {"percentile": 99}, 96.9697),
    (
        [torch.tensor([0, 0, 0, 0, 0, 1, 2, 3, 4, 5.0]), torch.tensor([0, 0, 0, 0, 0, 6, 7, 8, 9, 10.0])],
        "percentile",
        {"skip_zeros": True},
        {"percentile": 50},
        4.9976,
    ),
    (GROW, "entropy", {}, {}, 254.8755),
    ([_spike(255, 256)], "mse", {}, {}, 255.0625),
    ([_spike(512, 513)], "mse", {"unsigned": True}, {}, 512.1233),
    (GROW, "mse", {}, {}, 255.0623),
]


@pytest.mark.parametrize(("batches", "method", "ctor", "kwargs", "expected"), REFERENCE)
def test_reference_values(batches, method, ctor, kwargs, expected):
    assert _amax(batches, method, ctor, **kwargs) == pytest.approx(expected, rel=1e-3)


def test_entropy_ignores_single_outlier():
    torch.manual_seed(12345)
    x = torch.rand(11, 7, 3, 3)
    x[1, 1, 1, 1] = 10.0
    assert _amax([x], "entropy") < 1.1  # pytorch-quantization's own bound


def _data(kind: str, seed: int, n_batches: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_batches):
        if kind == "normal":
            x = torch.randn(32, 64, 48, generator=g)
        elif kind == "heavy":  # Student-t(2): rare huge values make the histogram grow across batches
            x = torch.randn(32, 64, 48, generator=g) / torch.rand(32, 64, 48, generator=g).sqrt().clamp(min=1e-3)
        else:  # unsigned, softmax-like
            x = torch.softmax(torch.randn(16, 4, 32, 32, generator=g) * 3, dim=-1)
        out.append(x * (1 + 0.25 * i))  # growing scale: exercises the bin-growth rule
    return out


@pytest.mark.parametrize("kind", ["normal", "heavy", "unsigned"])
@pytest.mark.parametrize("n_batches", [1, 3])
def test_histogram_matches_pytorch_quantization(kind, n_batches):
    batches = _data(kind, seed=7 + n_batches, n_batches=n_batches)
    unsigned = kind == "unsigned"
    ours = HistogramCalibrator(8, None, unsigned, num_bins=2048)
    with cpu_oracle() as calib:
        ref = calib.HistogramCalibrator(8, None, unsigned, num_bins=2048)
        for b in batches:
            ours.collect(b)
            ref.collect(b)
        assert torch.equal(ours._calib_hist, ref._calib_hist)
        assert torch.equal(ours._calib_bin_edges, ref._calib_bin_edges)
        cases = [("percentile", {"percentile": p}) for p in (99.0, 99.9, 99.99)]
        cases += [("entropy", {}), ("mse", {}), ("entropy", {"stride": 4, "start_bin": 256}), ("mse", {"stride": 3})]
        for method, kwargs in cases:
            expected = float(ref.compute_amax(method, **kwargs))
            got = float(ours.compute_amax(method, **kwargs))
            assert got == pytest.approx(expected, rel=1e-3), (method, kwargs)


@pytest.mark.parametrize("axis", [None, 0, 1, (0, 2)])
def test_max_matches_pytorch_quantization(axis):
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(6, 5, 4, generator=g) * (i + 1) for i in range(3)]
    ours = MaxCalibrator(8, axis, False)
    with cpu_oracle() as calib:
        ref = calib.MaxCalibrator(8, axis, False)
        for b in batches:
            ours.collect(b)
            ref.collect(b)
        assert torch.allclose(ours.compute_amax(), ref.compute_amax())
        assert ours.compute_amax().shape == ref.compute_amax().shape


def test_reset_and_empty():
    calib = HistogramCalibrator()
    assert calib.compute_amax("percentile") is None
    calib.collect(torch.arange(10.0))
    calib.reset()
    assert calib.compute_amax("mse") is None
    m = MaxCalibrator()
    assert m.compute_amax() is None
    with pytest.raises(TypeError, match="Unknown calibration method 'kl'"):
        calib.collect(torch.arange(10.0))
        calib.compute_amax("kl")
    with pytest.raises(NotImplementedError):
        HistogramCalibrator(8, 0, False)
