"""Synthetic PROBA-V scenes in the exact competition layout, deterministic by seed.

Each scene has a textured HR ground truth (smooth terrain, field parcels with sharp edges, a few
bright specks above the 14-bit range), LR frames made by a random sub-pixel shift, a blur and x3
block decimation, sensor noise, per-frame brightness drift (gain and offset), and clouds that
corrupt LR pixels and are marked in QM. Some HR status maps hold a small cloud too. ``norm.csv`` is
the ESA baseline cPSNR of every train/val scene, computed with :func:`models.baseline.esa_baseline`
(test scenes get the mean of those, as they have no HR).

Usage::

    python -m data.synthetic --out=datasets/synthetic [--train=24 --val=6 --test=4 --seed=0]

writes ``out/{train,val,test}/{NIR,RED}/imgsetNNNN/`` and ``out/norm.csv``. The reader, the dataset
and every script treat it exactly like the real dataset.
"""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import numpy as np
from scipy import ndimage

from utils.files import atomic_path

from .io import BANDS, HR_SIZE, LR_SIZE, SCALE, write_png

__all__ = ["make_scene", "write_scene", "generate"]

_MARGIN = 12  # HR pixels of context around the scene, so shifted frames never wrap


def _smooth_noise(rng: np.random.Generator, n: int, scale: float) -> np.ndarray:
    """``(n,n)`` zero-mean, unit-std noise low-passed with a Gaussian of ``scale`` pixels."""
    out = _blur(rng.standard_normal((n, n)), scale)
    return (out - out.mean()) / (out.std() + 1e-12)


def _ground_truth(rng: np.random.Generator, n: int) -> np.ndarray:
    """HR radiance ``(n,n)`` float64 in raw DN (about 2,000-15,000, a few specks up to ~20,000)."""
    base = rng.uniform(4000, 8000)
    img = base + 1500 * _smooth_noise(rng, n, 24) + 500 * _smooth_noise(rng, n, 6) + 150 * _smooth_noise(rng, n, 1.5)
    # field parcels: piecewise-constant offsets on a random grid give sharp, aliasing-prone edges
    for _ in range(rng.integers(6, 14)):
        y0, x0 = rng.integers(0, n - 20, size=2)
        h, w = rng.integers(12, 90, size=2)
        img[y0:y0 + h, x0:x0 + w] += rng.uniform(-1500, 1500)
    specks = rng.random((n, n)) < 2e-4
    img[specks] = rng.uniform(16500, 20000, size=specks.sum())
    return np.clip(img, 500, 60000)


def _shift(img: np.ndarray, dy: float, dx: float) -> np.ndarray:
    """Sub-pixel translation by the Fourier shift theorem (periodic; the margin hides the wrap)."""
    return np.fft.irfft2(ndimage.fourier_shift(np.fft.rfft2(img), (dy, dx), n=img.shape[1]), s=img.shape)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of ``sigma`` pixels, in the Fourier domain (periodic)."""
    return np.fft.irfft2(ndimage.fourier_gaussian(np.fft.rfft2(img), sigma, n=img.shape[1]), s=img.shape)


def _clouds(rng: np.random.Generator, n: int, cover: float) -> np.ndarray:
    """Bool ``(n,n)`` cloud mask covering about ``cover`` of the image, in blobs."""
    if cover <= 0:
        return np.zeros((n, n), bool)
    field = _smooth_noise(rng, n, n / 16)
    return field > np.quantile(field, 1 - cover)


def make_scene(seed: int, n_frames: int | None = None, with_hr: bool = True) -> dict:
    """One synthetic scene as the reader returns it (without ``name``/``band``).

    Returns:
        dict ``lr`` uint16 ``(T,128,128)``, ``qm`` bool ``(T,128,128)``, ``hr`` uint16 ``(384,384)``
        or None, ``sm`` bool ``(384,384)``.
    """
    rng = np.random.default_rng(seed)
    T = int(n_frames if n_frames is not None else rng.integers(9, 15))
    n = HR_SIZE + 2 * _MARGIN
    gt = _ground_truth(rng, n)
    crop = slice(_MARGIN, _MARGIN + HR_SIZE)
    lrs, qms = [], []
    for _ in range(T):
        dy, dx = rng.uniform(-1.5 * SCALE, 1.5 * SCALE, size=2)  # up to 1.5 LR pixels
        frame = _blur(_shift(gt, dy, dx), sigma=1.0)[crop, crop]
        lr = frame.reshape(LR_SIZE, SCALE, LR_SIZE, SCALE).mean((1, 3))
        lr = lr * rng.uniform(0.96, 1.04) + rng.uniform(-150, 150)  # per-frame brightness drift
        lr = lr + rng.normal(0, 35, size=lr.shape)  # sensor noise
        cover = 0.0 if rng.random() < 0.35 else rng.uniform(0.02, 0.45)
        cloud = _clouds(rng, LR_SIZE, cover)
        lr[cloud] = rng.uniform(13000, 17500) + 400 * rng.standard_normal(cloud.sum())
        lrs.append(np.clip(np.rint(lr), 0, 65535).astype(np.uint16))
        qms.append(~cloud)
    sm = ~_clouds(rng, HR_SIZE, 0.0 if rng.random() < 0.6 else rng.uniform(0.02, 0.2))
    hr = None
    if with_hr:
        hr_f = gt[crop, crop] + rng.normal(0, 20, size=(HR_SIZE, HR_SIZE))
        hr = np.clip(np.rint(hr_f), 0, 65535).astype(np.uint16)
    return {"lr": np.stack(lrs), "qm": np.stack(qms), "hr": hr, "sm": sm}


def write_scene(path: str | os.PathLike, scene: dict) -> None:
    """Write a scene dict in the competition layout (LRnnn/QMnnn/HR/SM PNGs) into ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for t, (lr, qm) in enumerate(zip(scene["lr"], scene["qm"], strict=True)):
        write_png(path / f"LR{t:03d}.png", lr)
        write_png(path / f"QM{t:03d}.png", qm)
    if scene.get("hr") is not None:
        write_png(path / "HR.png", scene["hr"])
    if scene.get("sm") is not None:
        write_png(path / "SM.png", scene["sm"])


def generate(out: str | os.PathLike, n_train: int = 24, n_val: int = 6, n_test: int = 4, seed: int = 0,
             bands: tuple[str, ...] = BANDS, n_frames: int | None = None, overwrite: bool = False) -> Path:
    """Write a synthetic dataset root: ``n_*`` scenes per band and split, plus ``norm.csv``.

    Scene names are unique across bands and splits (``imgset0000``, ...). Deterministic: the same
    arguments give byte-identical PNGs.
    """
    import torch

    from models.baseline import esa_baseline  # local: data/ must not import models/ at import time
    from utils.metrics import cpsnr

    out = Path(out)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass overwrite=True (--force) to replace it")
        shutil.rmtree(out)
    # written into a temporary folder renamed at the end: a run stopped midway (a full disk, Ctrl-C)
    # leaves no half dataset that a later run would take for a whole one
    with atomic_path(out) as tmp:
        norm: dict[str, float] = {}
        counter = 0
        for split, count in (("train", n_train), ("val", n_val), ("test", n_test)):
            for band in bands:
                for _ in range(count):
                    name = f"imgset{counter:04d}"
                    scene = make_scene(seed * 100_003 + counter, n_frames=n_frames, with_hr=split != "test")
                    write_scene(tmp / split / band / name, scene)
                    if scene["hr"] is not None:
                        sr = torch.from_numpy(esa_baseline(scene["lr"], scene["qm"]))[None]
                        hr = torch.from_numpy(scene["hr"] / 65535.0)[None]
                        norm[name] = float(cpsnr(sr, hr, torch.from_numpy(scene["sm"])[None]).item())
                    else:
                        norm[name] = float("nan")  # filled in below
                    counter += 1
        known = [v for v in norm.values() if v == v]
        fill = float(np.mean(known)) if known else 50.0
        with open(tmp / "norm.csv", "w") as f:
            for name, v in norm.items():
                f.write(f"{name} {v if v == v else fill!r}\n")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write synthetic PROBA-V scenes in the Kelvin layout.")
    p.add_argument("--out", default="datasets/synthetic")
    p.add_argument("--train", type=int, default=24, help="scenes per band in train/")
    p.add_argument("--val", type=int, default=6, help="scenes per band in val/")
    p.add_argument("--test", type=int, default=4, help="scenes per band in test/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing folder")
    a = p.parse_args(argv)
    root = generate(a.out, a.train, a.val, a.test, a.seed, overwrite=a.force)
    print(f"wrote synthetic scenes to {root}")


if __name__ == "__main__":
    main()
