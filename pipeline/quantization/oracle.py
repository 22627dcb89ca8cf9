"""pytorch-quantization 2.1.3 as a test oracle on CPU (tests and benchmarks only; never the product).

Its histogram MSE search calls `.cuda()` on CPU tensors; `cpu_oracle()` makes `.cuda()` a no-op while
the oracle runs so the reference values can be computed on machines without a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def cpu_oracle() -> Iterator[object]:
    """Yield `pytorch_quantization.calib` with `Tensor.cuda` patched to return the tensor itself."""
    from pytorch_quantization import calib  # deprecated package: imported only here, on demand

    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    try:
        yield calib
    finally:
        torch.Tensor.cuda = original  # type: ignore[method-assign]
