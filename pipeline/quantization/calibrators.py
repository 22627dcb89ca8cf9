"""Range calibrators, API-compatible with NVIDIA pytorch-quantization 2.1.3 (`pytorch_quantization.calib`).

The collection rules (absolute values, histogram growth across batches, bin edges) reproduce
pytorch-quantization exactly, so amax values agree with it. The amax *searches* are vectorized:
pytorch-quantization loops in Python over every candidate bin (entropy: a Python loop per bin inside
that loop) and calls `.cuda()` in MSE; here every candidate is scored at once with tensor ops on CPU.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["MaxCalibrator", "HistogramCalibrator", "HISTOGRAM_METHODS"]

HISTOGRAM_METHODS = ("percentile", "entropy", "mse")

# Candidate rows scored per chunk in the vectorized searches: bounds memory at ~chunk x num_bins
# float64 values (a histogram may grow far past 2048 bins when later batches have larger values).
_CHUNK = 512


class _Calibrator:
    def __init__(self, num_bits: int = 8, axis: int | tuple[int, ...] | None = None, unsigned: bool = False):
        self._num_bits = num_bits
        self._axis = axis
        self._unsigned = unsigned

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_bits={self._num_bits}, axis={self._axis}, unsigned={self._unsigned})"


class MaxCalibrator(_Calibrator):
    """Tracks the absolute maximum of every collected tensor (per tensor, or per `axis` channel).

    Args:
        num_bits: Quantization bits (kept for API compatibility; max does not depend on it).
        axis: None for one amax, or the axis (int / tuple) kept when reducing, e.g. 0 for the output
            channels of a Linear weight.
        unsigned: Unsigned quantization (kept for API compatibility).
    """

    def __init__(self, num_bits: int = 8, axis: int | tuple[int, ...] | None = None, unsigned: bool = False):
        super().__init__(num_bits, axis, unsigned)
        self._calib_amax: torch.Tensor | None = None

    @torch.no_grad()
    def collect(self, x: torch.Tensor) -> None:
        """Update the running absolute max with `x` (keepdim shape, as pytorch-quantization)."""
        x = x.detach().abs().float()
        if self._axis is None:
            local = x.max()
        else:
            keep = self._axis if isinstance(self._axis, (list, tuple)) else (self._axis,)
            keep = {a % x.dim() for a in keep}
            local = x
            for dim in sorted((d for d in range(x.dim()) if d not in keep), reverse=True):
                local = local.amax(dim=dim, keepdim=True)
        if self._calib_amax is None:
            self._calib_amax = local.clone()
        else:
            if local.shape != self._calib_amax.shape:
                raise RuntimeError("amax shape changed!")
            torch.maximum(self._calib_amax, local, out=self._calib_amax)

    def reset(self) -> None:
        self._calib_amax = None

    def compute_amax(self) -> torch.Tensor | None:
        """The absolute max of everything collected (None if nothing was collected)."""
        return self._calib_amax

    # Multi-process calibration (pipeline/quantization/calibrate.py): every rank's statistics are
    # gathered to every rank and merged in rank order, so every rank computes the same amax bit for bit.
    def state(self) -> torch.Tensor | None:
        return self._calib_amax

    def merge(self, states: list[torch.Tensor | None]) -> None:
        """Replace the statistics with the merge of every rank's `state()` (max is order-independent)."""
        found = [s for s in states if s is not None]
        self._calib_amax = None
        for s in found:
            self._calib_amax = s.clone() if self._calib_amax is None else torch.maximum(self._calib_amax, s)


class HistogramCalibrator(_Calibrator):
    """Histogram of absolute values; amax by percentile, entropy (KL divergence) or MSE.

    Args:
        num_bits: Quantization bits (8 -> 128 quantized levels + sign, 256 if unsigned).
        axis: Must be None: histograms are per tensor (as in pytorch-quantization).
        unsigned: Unsigned quantization (doubles the levels used by entropy / mse).
        num_bins: Bins of the first histogram. Later batches with a larger max append bins of the same
            width, so the histogram can grow past `num_bins`.
        skip_zeros: Drop exact zeros before collecting (e.g. after ReLU or padding).
    """

    def __init__(
        self,
        num_bits: int = 8,
        axis: int | tuple[int, ...] | None = None,
        unsigned: bool = False,
        num_bins: int = 2048,
        skip_zeros: bool = False,
    ):
        super().__init__(num_bits, axis, unsigned)
        if axis is not None:
            raise NotImplementedError("Calibrator histogram collection only supports per tensor scaling")
        self._num_bins = self._first_num_bins = num_bins
        self._skip_zeros = skip_zeros
        self._calib_hist: torch.Tensor | None = None
        self._calib_bin_edges: torch.Tensor | None = None
        # Multi-process calibration only: a first pass finds the range (`_range_max`), then every rank
        # bins into the same fixed edges [0, global max] so the histograms add up exactly.
        self._range_pass = False
        self._range_max: torch.Tensor | None = None
        self._fixed_max: torch.Tensor | None = None

    @torch.no_grad()
    def collect(self, x: torch.Tensor) -> None:
        """Add `x` to the histogram (same binning and growth rule as pytorch-quantization's torch path)."""
        x = x.detach().float().cpu()  # histograms live on the CPU whatever the model's device
        if torch.min(x) < 0.0:
            x = x.abs()
        if self._skip_zeros:
            x = x[x != 0]
        if self._range_pass:
            m = x.max() if x.numel() else torch.tensor(0.0)
            self._range_max = m if self._range_max is None else torch.maximum(self._range_max, m)
            return
        if self._fixed_max is not None:
            hist = torch.histc(x, bins=self._num_bins, min=0, max=float(self._fixed_max))
            self._calib_hist = hist if self._calib_hist is None else self._calib_hist + hist
            self._calib_bin_edges = torch.linspace(0, float(self._fixed_max), self._num_bins + 1)
            return
        # Histogram of |x| on [0, max]: later batches with a larger max extend the edges with bins of
        # the first batch's width, and earlier counts stay in their bins.
        x_max = x.max()
        if self._calib_hist is None:
            self._calib_hist = torch.histc(x, bins=self._num_bins, min=0, max=x_max)
            self._calib_bin_edges = torch.linspace(0, x_max, self._num_bins + 1)
            return
        if x_max > self._calib_bin_edges[-1]:
            width = self._calib_bin_edges[1] - self._calib_bin_edges[0]
            self._num_bins = int((x_max / width).ceil().item())
            self._calib_bin_edges = torch.arange(0, x_max + width, width, device=x.device)
        hist = torch.histc(x, bins=self._num_bins, min=0, max=self._calib_bin_edges[-1])
        hist[: self._calib_hist.numel()] += self._calib_hist
        self._calib_hist = hist

    def reset(self) -> None:
        self._calib_hist = None
        self._calib_bin_edges = None
        # collect() grows the bin count with the range: a new collection starts from the configured count, or it
        # would bin the same data differently than a fresh calibrator (a second pass after a first one).
        self._num_bins = self._first_num_bins
        self._range_pass = False
        self._range_max = None
        self._fixed_max = None

    # Multi-process calibration (pipeline/quantization/calibrate.py). Growing histograms depend on the
    # order batches arrive in, so ranks could not add theirs up; instead: pass 1 records each rank's
    # |x| max (`begin_range_pass`), the ranks agree on the global max (`fix_range`), pass 2 bins every
    # rank's data into the same `num_bins` edges on [0, global max], and the counts are summed in rank
    # order (`merge`): every rank ends with the same histogram, hence the same amax.
    def begin_range_pass(self) -> None:
        self.reset()
        self._range_pass = True

    def range_state(self) -> torch.Tensor | None:
        return self._range_max

    def fix_range(self, maxima: list[torch.Tensor | None]) -> None:
        found = [m for m in maxima if m is not None]
        self.reset()
        if found:
            self._fixed_max = torch.stack(found).max()

    def state(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self._calib_hist is None else (self._calib_hist, self._calib_bin_edges)

    def merge(self, states: list[tuple[torch.Tensor, torch.Tensor] | None]) -> None:
        """Replace the histogram with the sum of every rank's `state()` (all binned on the same edges)."""
        found = [s for s in states if s is not None]
        self._calib_hist = self._calib_bin_edges = None
        for hist, edges in found:
            if self._calib_bin_edges is not None and not torch.equal(edges, self._calib_bin_edges):
                raise RuntimeError("histograms from different ranks have different bin edges; call fix_range first")
            self._calib_hist = hist.clone() if self._calib_hist is None else self._calib_hist + hist
            self._calib_bin_edges = edges

    def compute_max(self) -> torch.Tensor | None:
        """The largest |x| the histogram holds: upper edge of its last non-empty bin (max calibration on a
        histogram, for per-quantizer method overrides)."""
        if self._calib_hist is None:
            return None
        nonzero = torch.nonzero(self._calib_hist).flatten()
        if nonzero.numel() == 0:
            return torch.tensor(0.0)
        return torch.tensor(float(self._calib_bin_edges[int(nonzero[-1]) + 1]))

    def compute_amax(self, method: str, *, stride: int = 1, start_bin: int = 128, percentile: float = 99.99) -> torch.Tensor | None:
        """amax from the collected histogram.

        Args:
            method: "percentile", "entropy" or "mse".
            stride: Step between candidate bins (entropy, mse).
            start_bin: First candidate bin (entropy, mse).
            percentile: Fraction of values (in %) that must fall below amax (percentile).

        Returns:
            A scalar tensor, or None if nothing was collected.
        """
        if self._calib_hist is None:
            return None
        hist = self._calib_hist.int().cpu().numpy()
        edges = self._calib_bin_edges.cpu().numpy()
        if method == "percentile":
            return _amax_percentile(hist, edges, percentile)
        if method == "entropy":
            return _amax_entropy(hist, edges, self._num_bits, self._unsigned, stride, start_bin)
        if method == "mse":
            return _amax_mse(hist, edges, self._num_bits, self._unsigned, stride, start_bin)
        raise TypeError(f"Unknown calibration method {method!r}; valid: {', '.join(HISTOGRAM_METHODS)}")

    def __repr__(self) -> str:
        bins = "None" if self._calib_hist is None else str(self._calib_hist.numel())
        return f"{super().__repr__()[:-1]}, num_bins={bins}, skip_zeros={self._skip_zeros})"


def _amax_percentile(hist: np.ndarray, edges: np.ndarray, percentile: float) -> torch.Tensor:
    if not 0 <= percentile <= 100:
        raise ValueError("Invalid percentile. Must be in range 0 <= percentile <= 100.")
    cdf = np.cumsum(hist / hist.sum())
    idx = np.searchsorted(cdf, percentile / 100)
    return torch.tensor(edges[idx].item())


def _amax_entropy(hist: np.ndarray, edges: np.ndarray, num_bits: int, unsigned: bool, stride: int, start_bin: int) -> torch.Tensor:
    """Bin whose clipped, re-quantized distribution has the smallest KL divergence from the data's.

    For a candidate i (bins kept), the reference P is bins[:i] with everything past i folded into bin
    i-1; the candidate Q merges bins[:i] into `nbins` levels and spreads each level's count evenly over
    its non-empty bins. pytorch-quantization builds P and Q bin by bin in Python for every i. Here
    KL(P||Q) is rewritten with per-level sums, which prefix sums give for all candidates at once:

        KL_i = (1/T) * [ sum_{j<i-1} b_j log b_j - sum_g C_g log avg_g  - B_{i-1} (log T - log S_i) ]
               + the folded last bin's term,

    with T the total count, S_i = sum_{j<i} b_j, C_g / avg_g a level's count / mean over non-empty
    bins (C_g excluding bin i-1), B_{i-1} = sum_{j<i-1} b_j: O(candidates x levels) work, no per-bin loop.
    """
    bins = torch.from_numpy(hist.astype(np.float64))
    bins[0] = bins[1]  # as pytorch-quantization: the zero bin's spike is replaced by its neighbour
    n = bins.numel()
    nbins = 1 << (num_bits - 1 + int(unsigned))
    zero = torch.zeros(1, dtype=torch.float64)
    cum = torch.cat([zero, bins.cumsum(0)])  # cum[j] = sum of bins[:j]
    cum_nz = torch.cat([zero, (bins != 0).to(torch.float64).cumsum(0)])
    blogb = torch.where(bins > 0, bins * torch.log(bins.clamp(min=1e-300)), 0.0)
    cum_blogb = torch.cat([zero, blogb.cumsum(0)])
    total = cum[-1]
    candidates = torch.arange(start_bin, n + 1, stride, dtype=torch.int64)
    divergences = []
    for i in candidates.split(_CHUNK):
        fi = i.to(torch.float64)
        # numpy's linspace(0, i, nbins + 1) bit for bit (arange * step, last point = i); level g holds
        # the bins j with space[g] <= j < space[g + 1], i.e. j in [ceil(space[g]), ceil(space[g + 1])).
        space = torch.arange(nbins + 1, dtype=torch.float64) * (fi / nbins).unsqueeze(1)
        space[:, -1] = fi
        first = space.ceil().long()
        count = cum[first[:, 1:]] - cum[first[:, :-1]]
        nonempty = cum_nz[first[:, 1:]] - cum_nz[first[:, :-1]]
        avg = torch.where(nonempty > 0, count / nonempty.clamp(min=1), 0.0)
        log_avg = torch.where(avg > 0, torch.log(avg.clamp(min=1e-300)), 0.0)
        last = i - 1
        b_last = bins[last]
        g_last = (first[:, :-1] <= last.unsqueeze(1)).sum(1) - 1  # level of bin i-1
        avg_last = avg.gather(1, g_last.unsqueeze(1)).squeeze(1)
        # Everything except bin i-1 (whose reference count also carries the clipped tail).
        body = cum_blogb[last] - (count * log_avg).sum(1) + b_last * torch.log(avg_last.clamp(min=1e-300))
        s_i = cum[i]
        body = body - cum[last] * (torch.log(total) - torch.log(s_i))
        p_last = (b_last + (total - s_i)) / total
        q_last = torch.where(b_last > 0, avg_last, 0.0) / s_i
        last_term = torch.where(p_last > 0, p_last * torch.log(p_last / q_last), 0.0)
        last_term = torch.where((p_last > 0) & (q_last <= 0), float("inf"), last_term)
        divergences.append(body / total + last_term)
    div = torch.cat(divergences)
    last_argmin = len(div) - 1 - int(torch.argmin(div.flip(0)))
    return torch.tensor(edges[last_argmin * stride + start_bin].item())


def _amax_mse(hist: np.ndarray, edges: np.ndarray, num_bits: int, unsigned: bool, stride: int, start_bin: int) -> torch.Tensor:
    """Bin center that minimizes the count-weighted squared error of fake-quantizing the bin centers.

    float32, narrow range, round-half-even: the same arithmetic as pytorch-quantization's
    `fake_tensor_quant` so ties break identically; all candidates at once instead of a loop.
    """
    counts = torch.from_numpy(hist).float()
    e = torch.from_numpy(edges).float()
    centers = (e[1:] + e[:-1]) / 2
    max_bound = torch.tensor(2.0 ** (num_bits - 1 + int(unsigned)) - 1.0)
    cand_idx = torch.arange(start_bin, len(centers), stride)
    # Empty bins add exact zeros to the sum: score only the occupied ones (the mean keeps len(centers)).
    occupied = counts > 0
    c, w = centers[occupied], counts[occupied]
    mses = []
    for chunk in cand_idx.split(_CHUNK):
        scale = max_bound / centers[chunk].unsqueeze(1)  # (k, 1): one candidate amax per row
        err = (c * scale).round_().clamp_(-max_bound, max_bound).div_(scale).sub_(c)
        mses.append(err.pow_(2).mul_(w).sum(1) / len(centers))
    argmin = int(torch.argmin(torch.cat(mses)))
    return centers[cand_idx[argmin]]
