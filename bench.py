"""Benchmarks that print figures; nothing here is a pass/fail test.

    python bench.py metric [--device=cpu] [--scenes=16]      cPSNR/cSSIM speed vs a 49-offset loop
    python bench.py models [--device=cuda] [--amp=bf16] ...  train samples/s and peak memory per model
    python bench.py loader [--data_dir=...]                  patch loader samples/s

``cpsnr_loop`` below is the straightforward oracle: the official definition written as a loop over
the 49 offsets, in numpy float64. The tests use it as the reference on arbitrary shapes.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timeit(fn, device, repeat=3) -> float:
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def bench_metric(args) -> None:
    from utils.metrics import cpsnr, cssim
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    n = args.scenes
    hr = torch.rand(n, 384, 384, generator=g, dtype=torch.float64) * 0.2 + 0.05
    sr = (hr + 0.003 * torch.randn(n, 384, 384, generator=g, dtype=torch.float64)).clamp(0, 1)
    sm = torch.rand(n, 384, 384, generator=g) > 0.1
    hr_np, sr_np, sm_np = hr.numpy(), sr.numpy(), sm.numpy()
    t_loop = _timeit(lambda: [cpsnr_loop(sr_np[i], hr_np[i], sm_np[i]) for i in range(n)], torch.device("cpu"), 1) / n
    ref = np.array([cpsnr_loop(sr_np[i], hr_np[i], sm_np[i]) for i in range(n)])
    print(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"cpsnr  loop oracle (numpy, float64, CPU): {t_loop * 1e3:8.2f} ms/scene")
    for dtype in (torch.float64, torch.float32):
        s, h, m = sr.to(device, dtype), hr.to(device, dtype), sm.to(device)
        t = _timeit(lambda: cpsnr(s, h, m), device) / n
        err = np.abs(cpsnr(s, h, m).double().cpu().numpy() - ref).max()
        print(f"cpsnr  batched core ({str(dtype)[6:]}, batch {n}):    {t * 1e3:8.2f} ms/scene  "
              f"{t_loop / t:6.1f}x the loop  max |diff| {err:.1e} dB")
    if device.type == "cuda":
        big = 290
        s = sr[:1].expand(big, -1, -1).contiguous().to(device, torch.float32)
        h, m = hr[:1].expand(big, -1, -1).contiguous().to(device, torch.float32), sm[:1].expand(big, -1, -1).to(device)
        t = _timeit(lambda: cpsnr(s, h, m), device)
        print(f"cpsnr  290 scenes in one call: {t * 1e3:.1f} ms ({big / t:.0f} scenes/s)")
    k = min(n, 4)
    t = _timeit(lambda: cssim(sr[:k].to(device), hr[:k].to(device), sm[:k].to(device)), device, 1) / k
    print(f"cssim  batched (float64): {t * 1e3:8.2f} ms/scene")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("metric")
    m.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    m.add_argument("--scenes", type=int, default=16)
    args = p.parse_args(argv)
    {"metric": bench_metric}[args.what](args)


if __name__ == "__main__":
    main()
