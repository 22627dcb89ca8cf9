"""Multi-process runs under `torchrun` (torch.distributed): one run folder, rank 0 writes.

    torchrun --nproc_per_node 2 -m pipeline experiment=smoke          # CPU: gloo
    torchrun --nproc_per_node 8 -m pipeline device=cuda               # GPUs: NCCL, one per rank

What changes with WORLD_SIZE > 1 (set by torchrun):
- Every rank composes the same config; the `${now:...}` in the run folder's name is rank 0's clock
  (broadcast before Hydra composes), so all ranks name one run folder. Rank 0 owns it: Hydra's
  `.hydra/` and job log, config, manifest, metrics, checkpoints, ONNX and engine files. Other ranks
  write nothing there (their scratch state goes to a temp folder removed at exit) and log to stderr.
- finetune / calibrate / qat run on every rank: training with DistributedDataParallel (each rank takes
  its slice of every global batch of `batch_size`, so steps, schedule and effective batch match a
  single-process run), calibration on each rank's share of the batches with the statistics reduced
  across ranks before amax is computed (pipeline/quantization/calibrate.py), so amax is bit-identical
  everywhere. Export, engines, evaluation, benchmark and report then run on rank 0 alone.
- The stage cache is off: a hit on one rank and a miss on another would leave a rank waiting forever
  in a collective.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Stages every rank runs (collectives inside); the rest run on rank 0 only. tune runs on every rank
# (each computes the same plan, latency not timed there) so that QAT after it trains one model.
COLLECTIVE_STAGES = ("load", "finetune", "calibrate", "tune", "qat")


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    return rank() == 0


def init_from_env() -> bool:
    """Join the process group torchrun describes (env://); NCCL when a GPU per rank exists, else gloo.

    Returns True when this process is one rank of several. A no-op without torchrun (WORLD_SIZE unset or 1).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        use_nccl = torch.cuda.is_available() and torch.cuda.device_count() > int(os.environ.get("LOCAL_RANK", "0"))
        if use_nccl:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if use_nccl else "gloo")
        log.info("distributed: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), dist.get_backend())
    return dist.get_world_size() > 1


def device_for_rank(device: torch.device) -> torch.device:
    """The rank's own GPU (LOCAL_RANK) under NCCL; the device unchanged otherwise."""
    if is_distributed() and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` from rank `src` on every rank (unchanged when not distributed)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank ([obj] when not distributed)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def agreed_now() -> _dt.datetime:
    """Rank 0's clock on every rank (the local clock when not distributed)."""
    return broadcast_object(_dt.datetime.now())


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_(t: torch.Tensor, op: str) -> torch.Tensor:
    """In-place all-reduce of `t` ("sum" or "max") on every rank; returns t (unchanged when not distributed)."""
    if not is_distributed():
        return t
    buf = t.detach().to(_collective_device())
    dist.all_reduce(buf, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    t.copy_(buf.to(t.device))
    return t


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
