"""Devices, mixed precision, seeding, distributed processes and atomic files, without branches in
the training code: CPU, one GPU and ``torchrun`` with several processes take the same path."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .files import atomic_path

__all__ = ["AMP_DTYPES", "check_amp", "reuse_freed_memory", "release_freed_memory", "resolve_device", "open_device",
           "autocast", "make_scaler",
           "make_optimizer", "load_scaler_state", "cuda_graphed", "seed_everything", "rng_state", "set_rng_state",
           "Dist", "init_distributed", "atomic_torch_save"]


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
_reusing = False
_libc: ctypes.CDLL | None = None  # the glibc whose malloc keeps freed memory


def reuse_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the OS.

    By default glibc serves each large block (a training activation of tens of MB) with a fresh
    ``mmap`` and returns it with ``munmap`` when the tensor dies, so the next step's tensors
    page-fault in and zero every page again. On CPU that costs more than the arithmetic of most
    element-wise layers: a PIUnet training step at the authors' configuration takes 1.7x longer (62 s
    instead of 37 s on 2 cores), leaky ReLU on a 37 MB tensor 15 ms instead of 5 ms. With mmap off and
    heap trimming off, freed blocks stay in the process and are reused: the resident memory stays at
    the run's peak rather than shrinking between steps. The same effect as PyTorch's CPU tuning guide
    gets from jemalloc/tcmalloc, without a preloaded library. Forked data-loader workers inherit it.
    Returns whether the setting took (False off glibc, e.g. on macOS or musl); calling it again is
    harmless."""
    global _reusing
    if _reusing:
        return True
    if not sys.platform.startswith("linux"):
        return False
    global _libc
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; -1 for M_TRIM_THRESHOLD means never trim
    _reusing = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, -1) == 1
    _libc = libc if _reusing else None
    return _reusing


def release_freed_memory() -> None:
    """Give the freed pages that :func:`reuse_freed_memory` keeps back to the OS (glibc's
    ``malloc_trim``). Within a phase of fixed tensor shapes (training steps) the kept blocks are
    reused as they are; a phase of other shapes (validation on full scenes, another model) would
    otherwise stack its own blocks on top: call this between phases. A no-op when not reusing."""
    if _libc is not None:
        _libc.malloc_trim(0)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> the process's CUDA device when one exists, else CPU; ``cuda`` -> ``cuda:local_rank``.
    Changes nothing (see :func:`open_device`)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} but this machine has no CUDA GPU; use --device=cpu")
    return device


def open_device(name: str, local_rank: int = 0) -> torch.device:
    """:func:`resolve_device`, then set the process up for it: on CPU glibc keeps freed memory for
    reuse (:func:`reuse_freed_memory`); on CUDA the process's current device becomes ``device``
    (``--device=cuda:1`` in one process: CUDA-graph capture, the pinned-memory thread and tensors made
    without a device follow the current device, GPU 0 until set) and cuDNN benchmarks its kernels
    and keeps the fastest (training patches and evaluation scenes have fixed shapes). For the
    scripts' one device."""
    device = resolve_device(name, local_rank)
    if device.type == "cpu":
        reuse_freed_memory()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    return device


# --amp: the autocast dtype of each setting (None: float32, no autocast); fp16 is CUDA's only
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_amp(amp: str, device: torch.device) -> None:
    """A ValueError for an ``amp`` that ``device`` cannot run (fp16 autocast is CUDA's only)."""
    if amp == "fp16" and device.type != "cuda":
        raise ValueError(f"amp=fp16 needs a CUDA device, and this runs on {device}; use --amp=bf16 or --amp=off")


def autocast(device: torch.device, amp: str):
    """The autocast context for ``amp`` in :data:`AMP_DTYPES` (a no-op context for ``off``)."""
    if AMP_DTYPES[amp] is None:
        return contextlib.nullcontext()
    check_amp(amp, device)
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def make_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """A gradient scaler, enabled only for fp16 (bf16 has float32's exponent range)."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")


def load_scaler_state(scaler: torch.amp.GradScaler, state: dict) -> None:
    """Restore a gradient scaler's saved state where both the run saved and the run resumed use fp16;
    otherwise the scaler starts afresh (a run saved without fp16 holds an empty state, which
    ``load_state_dict`` refuses; one resumed without fp16 has a disabled scaler)."""
    if scaler.is_enabled() and state:
        scaler.load_state_dict(state)


def make_optimizer(params, lr: float, weight_decay: float, device: torch.device) -> torch.optim.Adam:
    """Adam; on CUDA the fused kernel, which updates all of QA-Net's ~1,300 small tensors in a few
    launches instead of several per tensor (same update rule, equal to float32 rounding)."""
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=device.type == "cuda")


def cuda_graphed(module: torch.nn.Module, sample_args: tuple, amp: str) -> torch.nn.Module:
    """``module`` with its training forward and backward captured as CUDA graphs, for inputs of
    exactly the shapes of ``sample_args``. QA-Net runs thousands of small kernels per step; replaying
    them as one graph removes the CPU launch cost that otherwise leaves the GPU idle. In eval mode the
    returned module runs eagerly. ``module`` should be a thin wrapper around the network: its
    ``forward`` is replaced; the network's own stays usable for evaluation. One difference from eager
    autograd: parameters that no output's loss reaches (PIUnet's uncertainty head under an L1 loss)
    get zero gradients rather than none, and gradients are handed back in static buffers that the next
    replay overwrites: :class:`engine.trainer.Trainer` restores ``None`` for the first and copies the
    second before accumulating micro-batches."""
    # the capture's warm-up passes run in training mode: keep the BatchNorm statistics as they were
    buffers = {k: v.detach().clone() for k, v in module.state_dict().items()}
    with torch.autocast("cuda", dtype=AMP_DTYPES[amp] or torch.float16, enabled=AMP_DTYPES[amp] is not None,
                        cache_enabled=False):
        # allow_unused_input: inputs a model does not read (PIUnet: the masks; most models: the alphas)
        graphed = torch.cuda.make_graphed_callables(module, tuple(a.detach().clone() for a in sample_args),
                                                    allow_unused_input=True)
    module.load_state_dict(buffers)
    return graphed


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The RNG states of Python, NumPy, torch (and CUDA) as tensors and plain Python values only,
    so that a checkpoint holding them loads with ``torch.load(..., weights_only=True)``."""
    np_state = np.random.get_state(legacy=False)
    state = {"python": random.getstate(),
             "numpy": {"bit_generator": np_state["bit_generator"],
                       "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                       "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                       "gauss": float(np_state["gauss"])},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state` (also the NumPy tuple that checkpoints of format 1 hold)."""
    random.setstate(state["python"])
    np_state = state["numpy"]
    if isinstance(np_state, dict):
        np_state = {"bit_generator": np_state["bit_generator"],
                    "state": {"key": np.asarray(np_state["key"], dtype=np.int64).astype(np.uint32),
                              "pos": np_state["pos"]},
                    "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]}
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass(frozen=True)
class Dist:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Dist:
        """This process's place as ``torchrun`` sets it (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), before
        the process group is joined (:func:`init_distributed`)."""
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                   int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of ``t`` over the processes. ``t`` must be on the training device: an NCCL group
        (CUDA) serves CUDA tensors only."""
        if self.enabled:
            t = t.clone()
            dist.all_reduce(t)
        return t

    def all_gather_objects(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE > 1``).

    The backend is NCCL for CUDA devices and gloo on CPU; each process uses its local GPU.
    """
    place = Dist.from_env()
    device = open_device(device_name, place.local_rank)
    if place.enabled and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return place, device


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`utils.files.atomic_path`: a crash or Ctrl-C while writing leaves
    the previous file intact; a full disk raises :class:`utils.files.WriteError`."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        out = _KeepsWriteErrors(f)
        try:
            torch.save(obj, out)
        except RuntimeError as e:
            if out.error is None:
                raise
            raise out.error from e  # the OSError with its errno, which atomic_path reports


class _KeepsWriteErrors:
    """A binary file for ``torch.save`` that keeps the ``OSError`` of a failed write: torch's writer
    reports it as a RuntimeError without the errno ("unexpected pos ...")."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as e:
            self.error = e
            raise
