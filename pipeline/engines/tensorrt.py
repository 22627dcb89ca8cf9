"""TensorRT engine (engine=tensorrt). Imported lazily: TensorRT is optional and GPU-only."""

from __future__ import annotations

from pathlib import Path

from pipeline.schema import EngineConfig

INSTALL_HINT = "pip install tensorrt (TensorRT 10+, from a machine that reaches NVIDIA's package index pypi.nvidia.com)"


def check(cfg: EngineConfig) -> list[str]:
    problems = []
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        problems.append(f"engine=tensorrt: the tensorrt package is not installed; {INSTALL_HINT}")
    import torch

    if not torch.cuda.is_available():
        problems.append("engine=tensorrt: no CUDA GPU visible to torch (TensorRT engines build and run on NVIDIA GPUs only)")
    return problems


def build(onnx_path: Path, precision: str, cfg: EngineConfig, run_dir: Path):
    raise NotImplementedError("engine=tensorrt: engine building is not implemented yet")
