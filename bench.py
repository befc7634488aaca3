"""Benchmarks that print figures, and one pass/fail check of a GPU machine (gpu-check).

    python bench.py metric [--device=cpu] [--scenes=16]      cPSNR/cSSIM speed vs a 49-offset loop
    python bench.py models [--device=cuda] [--amp=off,bf16] [--compile=off,on] [--graphs] [--impls=ours,ours-cl]
                           [--ref=MODEL=DIR ...]            train samples/s and peak memory per model
    python bench.py loader [--data_dir=...] [--workers=0,2]  decode cache and patch loader samples/s
    python bench.py valid [--device=cuda] [--batch=8]         full-scene validation scenes/s per model
    python bench.py losses [--device=cpu] [--batch=8] [--patch=96]  forward+backward time per training loss
    python bench.py zoo --ref=MODEL=DIR ... [--batch=2]    the zoo against its authors' code: train step and
                           full-scene time per model, both in one run (benchmarks/zoo.py)
    python bench.py gpu-check [--device=cuda|cuda:N|cpu] [--only=A,B] [--list]
                           every GPU path of train/valid/predict once, PASS/FAIL/SKIP per path
                           (benchmarks/gpu_check.py; minutes on one GPU)

Every command takes ``--malloc=reuse|system``: on CPU, whether freed memory is kept for reuse as
the training and evaluation scripts do (the default) or glibc's default is timed.

``cpsnr_loop`` below is the straightforward oracle: the official definition written as a loop over
the 49 offsets, in numpy float64. The tests use it as the reference on arbitrary shapes.
"""
from __future__ import annotations

import argparse
import gc
import time

import numpy as np
import torch

from benchmarks import gpu_check, zoo
from benchmarks.timing import (
    authors_config,
    device_name,
    reset_resident_peak,
    resident_peak_mib,
    sync,
    timeit,
    train_step_fn,
)


def cpsnr_loop(sr: np.ndarray, hr: np.ndarray, sm: np.ndarray, border: int = 3) -> float:
    """Official cPSNR of one image, ``sr, hr (H,W)`` float in [0,1], ``sm (H,W)`` bool, by a loop."""
    H, W = sr.shape
    h, w = H - 2 * border, W - 2 * border
    sr_c = sr[border:border + h, border:border + w]
    best = -np.inf
    for u in range(2 * border + 1):
        for v in range(2 * border + 1):
            m = sm[u:u + h, v:v + w]
            if not m.any():
                continue
            d = hr[u:u + h, v:v + w][m] - sr_c[m]
            d = d - d.mean()
            best = max(best, -10 * np.log10(np.mean(d * d)))
    return float(best) if np.isfinite(best) else float("nan")


def bench_metric(args) -> None:
    from utils.metrics import cpsnr, cssim
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    n = args.scenes
    hr = torch.rand(n, 384, 384, generator=g, dtype=torch.float64) * 0.2 + 0.05
    sr = (hr + 0.003 * torch.randn(n, 384, 384, generator=g, dtype=torch.float64)).clamp(0, 1)
    sm = torch.rand(n, 384, 384, generator=g) > 0.1
    hr_np, sr_np, sm_np = hr.numpy(), sr.numpy(), sm.numpy()
    t_loop = timeit(lambda: [cpsnr_loop(sr_np[i], hr_np[i], sm_np[i]) for i in range(n)], torch.device("cpu"), 1) / n
    ref = np.array([cpsnr_loop(sr_np[i], hr_np[i], sm_np[i]) for i in range(n)])
    print(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"cpsnr  loop oracle (numpy, float64, CPU): {t_loop * 1e3:8.2f} ms/scene")
    for dtype in (torch.float64, torch.float32):
        s, h, m = sr.to(device, dtype), hr.to(device, dtype), sm.to(device)
        t = timeit(lambda s=s, h=h, m=m: cpsnr(s, h, m), device) / n
        err = np.abs(cpsnr(s, h, m).double().cpu().numpy() - ref).max()
        print(f"cpsnr  batched core ({str(dtype)[6:]}, batch {n}):    {t * 1e3:8.2f} ms/scene  "
              f"{t_loop / t:6.1f}x the loop  max |diff| {err:.1e} dB")
    if device.type == "cuda":
        big = 290
        s = sr[:1].expand(big, -1, -1).contiguous().to(device, torch.float32)
        h, m = hr[:1].expand(big, -1, -1).contiguous().to(device, torch.float32), sm[:1].expand(big, -1, -1).to(device)
        t = timeit(lambda: cpsnr(s, h, m), device)
        print(f"cpsnr  290 scenes in one call: {t * 1e3:.1f} ms ({big / t:.0f} scenes/s)")
    k = min(n, 4)
    t = timeit(lambda: cssim(sr[:k].to(device), hr[:k].to(device), sm[:k].to(device)), device, 1) / k
    print(f"cssim  batched (float64): {t * 1e3:8.2f} ms/scene")


def bench_losses(args) -> None:
    """Forward + backward time of every training loss on a batch of HR-sized float32 patches."""
    from utils.losses import LOSSES, compute_loss
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, 1, args.patch, args.patch)
    hr = (torch.rand(shape, generator=g) * 0.2 + 0.2).to(device)
    mask = (torch.rand(shape, generator=g) < 0.9).float().to(device)
    sr = (hr.roll(1, -1) + 0.01 * torch.randn(shape, generator=g).to(device)).requires_grad_()
    log_scale = torch.full(shape, -4.0, device=device, requires_grad=True)
    print(f"device: {device_name(device)}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"batch {args.batch} x {args.patch}x{args.patch}")
    for name in LOSSES:
        def step(name=name):
            compute_loss(name, {"sr": sr, "log_scale": log_scale}, hr, mask).backward()
        print(f"{name:18s} {timeit(step, device, repeat=5) * 1e3:8.2f} ms forward+backward")


def bench_models(args) -> None:
    """Training samples/s and peak memory per model at the authors' configurations."""
    from models import build_model, request_channels_last, spec_of
    from utils.runtime import release_freed_memory
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    names = args.models.split(",")
    print(f"device: {device_name(device)}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"patch {args.patch}, malloc {args.malloc}")
    print(f"{'model':10s} {'impl':8s} {'amp':5s} {'mode':7s} {'batch':>5s} {'samples/s':>10s} {'ms/step':>8s} "
          f"{'peak MiB':>9s} {'reserved':>9s}")
    for name in names:
        cfg = authors_config(name)
        batch = args.batch or cfg["batch"]
        ref_path = dict(r.split("=", 1) for r in args.ref).get(name, "")
        makers = {"ours": lambda name=name: build_model(name),
                  "ours-cl": lambda name=name: request_channels_last(build_model(name)),
                  "authors": lambda name=name, ref_path=ref_path: spec_of(name).authors_network(ref_path)}
        wanted = args.impls.split(",") + (["authors"] if ref_path else [])
        unknown = set(wanted) - set(makers)
        if unknown:
            raise SystemExit(f"--impls: unknown {sorted(unknown)}; choose from ours, ours-cl")
        impls = [(k, makers[k]) for k in dict.fromkeys(wanted)]
        modes = [(c == "on", False) for c in args.compile.split(",")]
        modes += [(False, True)] if args.graphs else []
        for amp in args.amp.split(","):
            for compiled, graphs in modes:
                for impl, make in impls:
                    if graphs and impl == "authors":
                        continue
                    torch.manual_seed(0)
                    if device.type == "cuda":  # peak over everything from here: warm-up, graph capture, steps
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats(device)
                    else:
                        reset_resident_peak()
                    model = make().to(device).train()
                    if compiled:
                        model = torch.compile(model)
                    mode = "graphs" if graphs else "compile" if compiled else "eager"
                    try:
                        step = train_step_fn(model, name, batch, cfg["frames"], args.patch, device, amp,
                                              impl == "authors", graphs)
                        for _ in range(args.warmup):
                            step()
                        sync(device)
                        t = time.perf_counter()
                        for _ in range(args.steps):
                            step()
                        sync(device)
                    except torch.OutOfMemoryError:
                        print(f"{name:10s} {impl:8s} {amp:5s} {mode:7s} {batch:5d} out of memory")
                        continue
                    dt = (time.perf_counter() - t) / args.steps
                    cuda = device.type == "cuda"
                    # CPU: the resident high-water mark of the whole process during this row
                    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if cuda else resident_peak_mib()
                    reserved = torch.cuda.max_memory_reserved(device) / 2 ** 20 if cuda else float("nan")
                    print(f"{name:10s} {impl:8s} {amp:5s} {mode:7s} {batch:5d} {batch / dt:10.2f} "
                          f"{dt * 1e3:8.1f} {peak:9.0f} {reserved:9.0f}", flush=True)
                    del model, step
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    gc.collect()  # the step's closures hold the model in reference cycles
                    release_freed_memory()  # each row's blocks differ in size: start the next from a clean heap
    if device.type == "cpu":
        print("CPU peak MiB: the process's resident high-water mark during the row (Linux VmHWM, "
              "reset before each row; includes the ~0.4 GiB of the interpreter and torch)")


def bench_valid(args) -> None:
    """Full-scene validation throughput: SR of (B,T,128,128) batches plus cPSNR, per model (T: the views
    its authors' recipe feeds, ``spec.n_views``, else 9)."""
    from engine.evaluate import super_resolve
    from models import build_model, spec_of
    from utils.metrics import cpsnr
    device = torch.device(args.device)
    print(f"device: {device_name(device)}, batch {args.batch} scenes, amp {args.amp}")
    hr = torch.rand(args.batch, 1, 384, 384, generator=torch.Generator().manual_seed(1)).to(device)
    for name in args.models.split(","):
        frames = spec_of(name).n_views or 9
        g = torch.Generator().manual_seed(0)
        lr = torch.rand(args.batch, frames, 128, 128, generator=g).to(device)
        qm = (torch.rand(args.batch, frames, 128, 128, generator=g) > 0.1).float().to(device)
        model = build_model(name).to(device).eval()
        t = timeit(lambda model=model, lr=lr, qm=qm: cpsnr(super_resolve(model, lr, qm, args.amp)["sr"], hr,
                                                             qm.new_ones(hr.shape)), device, 2)
        print(f"{name:10s} {frames:3d} frames {args.batch / t:8.2f} scenes/s  ({t / args.batch * 1e3:.1f} ms/scene, "
              f"SR + cPSNR)")


def bench_loader(args) -> None:
    """Scene decoding (PNG vs the .npz cache) and training-patch loading, in samples/s."""
    import shutil
    import tempfile
    from pathlib import Path

    from torch.utils.data import DataLoader

    from data import DatasetOptions, ProbaVDataset
    from data.synthetic import generate
    root = Path(args.data_dir)
    if not root.exists():
        print(f"generating synthetic scenes in {root}")
        generate(root)
    cache = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    try:
        opts = DatasetOptions(bands="all", n_frames=9, selection="weighted", patch_size=32, min_clear=0.25,
                              progress=False, cache_dir=cache)
        t = time.perf_counter()
        ds = ProbaVDataset(root, "train", opts)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        ds = ProbaVDataset(root, "train", opts)
        warm = time.perf_counter() - t
        n = len(ds.scenes)
        print(f"{root}: {n} train scenes; decode PNGs + write cache {n / cold:7.1f} scenes/s, "
              f"read cache {n / warm:7.1f} scenes/s")
        for workers in [int(w) for w in args.workers.split(",")]:
            loader = DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=workers, drop_last=True,
                                pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)
            count, t = 0, None
            for epoch in range(args.epochs + 1):
                ds.set_epoch(epoch)
                for batch in loader:
                    count += len(batch["name"]) if t is not None else 0
                if t is None:  # the first epoch starts the workers: not counted
                    t = time.perf_counter()
            dt = time.perf_counter() - t
            print(f"loader, {workers} workers, batch {args.batch}, 32x32 patches, 9 weighted frames: "
                  f"{count / dt:9.1f} samples/s")
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _authored() -> list[str]:
    """The trainable models with a published training recipe (the default rows)."""
    from models import MODELS
    return [name for name, spec in MODELS.items() if spec.trainable and spec.preset]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("metric")
    m.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    m.add_argument("--scenes", type=int, default=16)
    mo = sub.add_parser("models")
    mo.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    mo.add_argument("--models", default=",".join(_authored()))
    mo.add_argument("--batch", type=int, default=0,
                    help="0: the authors' batch (QA-Net 10, PIUnet 24, HighRes-net 32, MISR-GRU 16, TR-MISR 4)")
    mo.add_argument("--patch", type=int, default=32)
    mo.add_argument("--amp", default="off", help="comma list of off, bf16, fp16")
    mo.add_argument("--compile", default="off", help="comma list of off, on")
    mo.add_argument("--impls", default="ours-cl",
                    help="comma list of ours (NCHW features), ours-cl (channels-last, the training default)")
    mo.add_argument("--graphs", action="store_true",
                    help="also time our models with CUDA graphs (train.py --cuda_graphs)")
    mo.add_argument("--steps", type=int, default=5)
    mo.add_argument("--warmup", type=int, default=2)
    mo.add_argument("--ref", action="append", default=[], metavar="MODEL=DIR",
                    help="a local checkout of a model's authors' code, to time it too (repeatable)")
    va = sub.add_parser("valid")
    va.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    va.add_argument("--models", default=",".join(_authored()))
    va.add_argument("--batch", type=int, default=4)
    va.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    lo = sub.add_parser("loader")
    lo.add_argument("--data_dir", default="datasets/synthetic")
    lo.add_argument("--workers", default="0,2")
    lo.add_argument("--batch", type=int, default=10)
    lo.add_argument("--epochs", type=int, default=3)
    ls = sub.add_parser("losses")
    ls.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ls.add_argument("--batch", type=int, default=8)
    ls.add_argument("--patch", type=int, default=96, help="HR patch side (3x the LR patch)")
    zo = sub.add_parser("zoo", description=zoo.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    zoo.add_arguments(zo)
    gc_ = sub.add_parser("gpu-check", description=gpu_check.__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu_check.add_arguments(gc_)
    for sp in (m, mo, va, lo, ls, zo):
        sp.add_argument("--malloc", default="reuse", choices=["reuse", "system"],
                        help="reuse: keep freed CPU memory for reuse, as train.py, valid.py and predict.py do "
                             "(utils.runtime.reuse_freed_memory); system: glibc's default")
    args = p.parse_args(argv)
    if getattr(args, "malloc", "") == "reuse":  # gpu-check has none: its paths run in their own processes
        from utils.runtime import reuse_freed_memory
        reuse_freed_memory()
    {"metric": bench_metric, "models": bench_models, "valid": bench_valid, "loader": bench_loader,
     "losses": bench_losses, "zoo": zoo.main, "gpu-check": gpu_check.main}[args.what](args)


if __name__ == "__main__":
    main()
