"""Timing helpers the benchmarks share: synchronised best-of timers, the process's resident peak,
and one training step as ``train.py`` runs it (ours) or as the authors' code runs it (theirs)."""
from __future__ import annotations

import torch

__all__ = ["sync", "timeit", "reset_resident_peak", "resident_peak_mib", "authors_config", "train_step_fn",
           "device_name"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device, repeat=3) -> float:
    """Seconds per call of ``fn``: the best of ``repeat`` timed calls after a warm-up call
    (``torch.utils.benchmark.Timer`` synchronises CUDA around each)."""
    from torch.utils.benchmark import Timer
    fn()
    sync(device)
    timer = Timer(stmt="fn()", globals={"fn": fn})
    return min(timer.timeit(1).mean for _ in range(repeat))


def reset_resident_peak() -> None:
    """Linux: restart the process's resident-memory high-water mark (VmHWM), so that it measures
    one benchmark row. Elsewhere a no-op (the peak then reads nan)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def resident_peak_mib() -> float:
    """The process's resident-memory high-water mark in MiB (Linux ``VmHWM``), nan where unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def authors_config(name: str) -> dict:
    """The batch, frame count and LR patch side of a model's published training recipe (its authors' preset)."""
    from config import parse_args
    from models import spec_of
    cfg = parse_args([f"--preset={spec_of(name).preset}"])  # resolved: a preset leaves out what the defaults say
    return dict(batch=cfg.batch_size, frames=cfg.n_frames, patch=cfg.patch_size)


def train_step_fn(model, name: str, batch: int, frames: int, patch: int, device, amp: str, reference: bool,
                   graphs: bool = False):
    """One training step as train.py runs it (the authors' code: with the plain Adam it ships with)."""
    from models import spec_of
    from utils.runtime import AMP_DTYPES, cuda_graphed, make_optimizer
    spec = spec_of(name)
    lr = torch.rand(batch, frames, patch, patch, device=device)
    qm = (torch.rand(batch, frames, patch, patch, device=device) > 0.1).float()
    hr = torch.rand(batch, 1, 3 * patch, 3 * patch, device=device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4) if reference else make_optimizer(model.parameters(), 1e-4, 0.0,
                                                                                          device)
    dtype = AMP_DTYPES[amp]

    class Core(torch.nn.Module):  # ours: super_resolve, as train.py calls it; the authors': their raw forward
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, lr, qm):
            if not reference:
                out = self.net.super_resolve(lr, qm)
                return (out["sr"], out["log_scale"]) if spec.uncertainty else out["sr"]
            return self.net(lr, qm) if spec.uses_masks else self.net(lr)

    core = Core()
    fwd = cuda_graphed(core, (lr, qm), amp) if graphs else core

    def step():
        model.train()  # whatever ran before it (a full-scene evaluation) left the mode in
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = fwd(lr, qm)
            if spec.uncertainty:  # (mean, log-scale): the log-scale joins the graph as in training
                out = out[0] + 0 * out[1].mean()
        loss = (out.float() - hr).abs().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 15.0)
        opt.step()
    return step


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    import platform
    return f"cpu ({platform.processor() or platform.machine()})"
