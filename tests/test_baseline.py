"""The ESA baseline reproduces norm.csv: this proves the reader, the masks, the kernel and the metric."""
from __future__ import annotations

import numpy as np
import torch

from data import list_scenes, read_norm, read_scene
from models import ESABaseline, esa_baseline
from models.baseline import bicubic_upscale
from utils.metrics import cpsnr


def test_baseline_reproduces_norm_csv_on_every_real_scene(probav_root):
    norm = read_norm(probav_root / "norm.csv")
    errors = []
    for split in ("train", "val"):
        for band in ("NIR", "RED"):
            for p in list_scenes(probav_root, split, band):
                s = read_scene(p)
                sr = esa_baseline(s["lr"], s["qm"])
                assert sr.dtype == np.float64 and sr.shape == (384, 384) and 0 <= sr.min() and sr.max() <= 1
                hr = torch.from_numpy(s["hr"] / 65535.0)[None]
                got = cpsnr(torch.from_numpy(sr)[None], hr, torch.from_numpy(s["sm"])[None]).item()
                errors.append(abs(got - norm[s["name"]]))
    assert len(errors) >= 100
    assert max(errors) < 0.005, f"worst scene off by {max(errors):.4f} dB"


def test_bicubic_keeps_constants_and_matches_torch_batches():
    img = np.full((5, 7), 0.25)
    assert np.allclose(bicubic_upscale(img), 0.25)
    rng = np.random.default_rng(0)
    x = rng.random((2, 3, 6, 5))
    assert np.allclose(bicubic_upscale(torch.from_numpy(x)).numpy(), bicubic_upscale(x))


def test_baseline_module_matches_function_and_ignores_padding():
    rng = np.random.default_rng(1)
    lr = rng.integers(0, 2 ** 15, size=(4, 16, 16)).astype(np.uint16)
    qm = rng.random((4, 16, 16)) > 0.3
    qm[2] = True  # the clearest frame
    ref = esa_baseline(lr, qm)
    m = ESABaseline()
    x = torch.from_numpy(lr / 65535.0)[None]
    q = torch.from_numpy(qm)[None].double()
    out = m(x, q)
    assert out.shape == (1, 1, 48, 48)
    assert np.allclose(out[0, 0].numpy(), ref)
    # repeating the clearest frame (the dataset's padding) changes nothing
    out2 = m(torch.cat([x, x[:, 2:3]], 1), torch.cat([q, q[:, 2:3]], 1))
    assert torch.allclose(out, out2)
