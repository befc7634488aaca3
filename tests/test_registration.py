"""Frame registration, PIUnet's frame selection rule, and the fixed patch grid."""
from __future__ import annotations

import os
import shutil
import warnings

import numpy as np
import pytest
from scipy import ndimage

import data.cache
from conftest import shared_path
from data import (
    DataError,
    DatasetOptions,
    ProbaVDataset,
    load_scene_cached,
    read_scene,
    register_frames,
    select_frames,
    write_png,
)
from data.registration import RegistrationWarning

MOVES = [(2, -3), (-5, 1), (7, 7), (-1, 0), (0, 4), (-12, 9)]


def _real_scene():
    root = shared_path("probav")
    return read_scene(sorted((root / "train" / "NIR").iterdir())[0])


def _moved(frame: np.ndarray, mask: np.ndarray, d: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``frame`` with its content moved by ``d`` (reflected borders), its mask moved with zeros."""
    return (ndimage.shift(frame, d, order=0, mode="reflect"),
            ndimage.shift(mask.astype(np.uint8), d, order=0, mode="constant") > 0)


@pytest.mark.parametrize("as_float", [False, True], ids=["uint16", "float"])
def test_registration_recovers_known_shifts_of_a_real_frame(as_float):
    s = _real_scene()
    ref = int(np.argmax(s["qm"].mean((1, 2))))
    base, base_mask = s["lr"][ref], s["qm"][ref]
    # the moved copies are a little cloudier than the reference (a cloud over one corner each)
    frames, masks = [base], [base_mask]
    for i, d in enumerate(MOVES):
        f, m = _moved(base, base_mask, d)
        m = m.copy()
        m[(i % 2) * 64:(i % 2) * 64 + 30, 10:40] = False
        frames.append(f)
        masks.append(m)
    lr, qm = np.stack(frames), np.stack(masks)
    if as_float:
        lr = lr.astype(np.float32) / 65535.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", RegistrationWarning)
        out, out_qm, shifts = register_frames(lr, qm)
    assert shifts.dtype == np.int64 and shifts.shape == (len(lr), 2)
    assert shifts.tolist() == [[0, 0]] + [[-dy, -dx] for dy, dx in MOVES]
    assert out.dtype == lr.dtype and out_qm.dtype == np.bool_
    for t, (dy, dx) in enumerate(MOVES, 1):
        # back in place: wherever the moved-back mask is clear, the pixels are the reference's
        assert out_qm[t].any() and np.array_equal(out[t][out_qm[t]], lr[0][out_qm[t]])
        # pixels that came in from outside the frame are not clear
        if dy > 0:
            assert not out_qm[t][-dy:].any()
        if dx < 0:
            assert not out_qm[t][:, :-dx].any()


def test_real_scene_registration_is_small_and_finite():
    s = _real_scene()
    out, out_qm, shifts = register_frames(s["lr"], s["qm"])
    assert np.abs(shifts).max() <= 32 and out.dtype == np.uint16 and out.shape == s["lr"].shape
    assert out_qm.dtype == np.bool_


def test_unregistrable_frames_are_kept_and_reported_once():
    rng = np.random.default_rng(0)
    ref = ndimage.gaussian_filter(rng.random((64, 64)), 2) * 1e4
    far, far_m = _moved(ref, np.ones((64, 64), bool), (20, 0))  # 20 > 64 / 4: a failed registration
    lr = np.stack([ref, ref * 0 + 5.0, ref, far]).astype(np.float64)
    qm = np.ones_like(lr, bool)
    qm[2] = False  # no clear pixel
    with pytest.warns(RegistrationWarning) as rec:
        out, out_qm, shifts = register_frames(lr, qm, reference=0, name="imgset9999")
    assert len(rec) == 1
    msg = str(rec[0].message)
    assert "imgset9999" in msg and "1 (flat" in msg and "2 (no clear pixel)" in msg and "3 (shift (-20, 0)" in msg
    assert shifts.tolist() == [[0, 0]] * 4
    assert np.array_equal(out, lr) and np.array_equal(out_qm, qm) and np.isfinite(out).all()
    # a reference without clear pixels: nothing can be registered, nothing is moved
    with pytest.warns(RegistrationWarning, match="reference frame 0"):
        _, _, shifts = register_frames(lr, np.zeros_like(qm), reference=0)
    assert not shifts.any()
    with pytest.raises(ValueError, match=r"\(T,h,w\)"):
        register_frames(lr[0], qm[0])


def test_registration_is_cached_with_the_scene_and_invalidated(tmp_path, monkeypatch):
    src = sorted((shared_path("probav") / "train" / "RED").iterdir())[0]
    scene = tmp_path / "RED" / src.name
    scene.mkdir(parents=True)
    for f in os.listdir(src):
        os.symlink(src / f, scene / f) if f != "LR000.png" else (scene / f).write_bytes((src / f).read_bytes())
    cache = tmp_path / "cache"
    calls = []
    real = data.cache.register_frames
    monkeypatch.setattr(data.cache, "register_frames", lambda *a, **k: calls.append(1) or real(*a, **k))
    reg = load_scene_cached(scene, cache, register=True)
    plain = load_scene_cached(scene, cache, register=False)
    assert len(calls) == 1 and reg["shifts"].shape == (len(reg["lr"]), 2) and "shifts" not in plain
    assert len(list(cache.glob("*.npz"))) == 2  # the key covers whether frames are registered
    again = load_scene_cached(scene, cache, register=True)
    assert len(calls) == 1 and np.array_equal(again["lr"], reg["lr"]) and np.array_equal(again["shifts"],
                                                                                           reg["shifts"])
    os.utime(scene / "LR000.png", ns=(1, 1))  # the scene changed: registered again
    load_scene_cached(scene, cache, register=True)
    assert len(calls) == 2


def test_min_clearance_selection_follows_the_authors_rule():
    c = np.array([0.9, 0.5, 0.95, 0.86, 0.2, 0.85])
    qm = np.zeros((6, 4, 4), bool)
    picked = select_frames(qm, 5, "clearest", np.random.default_rng(0), clearance=c, min_clearance=0.85)
    assert picked[:3].tolist() == [2, 0, 3]  # the clearest first; 0.85 itself is not above 0.85
    assert set(picked[3:].tolist()) <= {2, 0, 3} and len(picked) == 5  # padded with random repeats
    assert select_frames(qm, 2, "clearest", clearance=c, min_clearance=0.85).tolist() == [2, 0]
    # nothing above the threshold: the clearest frame alone (val/test fallback)
    low = np.array([0.3, 0.6, 0.5])
    assert select_frames(qm[:3], 4, "clearest", clearance=low, min_clearance=0.85).tolist() == [1] * 4
    # other strategies choose among the candidates only
    assert set(select_frames(qm, 3, "all", clearance=c, min_clearance=0.85).tolist()) == {0, 2, 3}


def _cloud_over(scene, fraction: float) -> None:
    """Rewrite every quality map of ``scene`` to be clear on its first ``fraction`` of rows only."""
    for qm in scene.glob("QM*.png"):
        m = np.zeros((128, 128), bool)
        m[:int(128 * fraction)] = True
        write_png(qm, m)


def test_dataset_drops_train_scenes_without_a_clear_frame(synthetic_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(synthetic_root, root)
    cloudy_train = sorted((root / "train" / "NIR").iterdir())[0]
    cloudy_val = sorted((root / "val" / "NIR").iterdir())[0]
    _cloud_over(cloudy_train, 0.5)
    _cloud_over(cloudy_val, 0.5)
    opts = DatasetOptions(bands="NIR", n_frames=4, cache_dir=tmp_path / "c", progress=False, min_frame_clearance=0.85)
    ds = ProbaVDataset(root, "train", opts)
    assert ds.dropped == [f"NIR/{cloudy_train.name}"] and cloudy_train.name not in [n for _, n in ds.keys]
    assert len(ds.scenes) == len(list((root / "train" / "NIR").iterdir())) - 1
    val = ProbaVDataset(root, "val", opts)  # val keeps every scene; the cloudy one gets its clearest frame
    i = [n for _, n in val.keys].index(cloudy_val.name)
    assert val.frames_for(i, None).tolist() == [int(np.argmax(val.scenes[i]["clearance"]))] * 4
    for other in (root / "train" / "NIR").iterdir():
        _cloud_over(other, 0.5)
    with pytest.raises(DataError, match="min_frame_clearance"):
        ProbaVDataset(root, "train", opts)


def test_grid_patches_cover_the_clear_grid(synthetic_root, tmp_path):
    ds = ProbaVDataset(synthetic_root, "train", DatasetOptions(bands="all", n_frames=3, cache_dir=tmp_path / "c",
                                                                progress=False, patch_size=32, min_clear=0.5,
                                                                patches="grid", repeats=2))
    n_grid = sum(1 for s in ds.scenes for y in range(0, 128, 32) for x in range(0, 128, 32)
                 if s["sm"][3 * y:3 * y + 96, 3 * x:3 * x + 96].mean() >= 0.5)
    assert len(ds) == 2 * n_grid and 0 < n_grid <= 16 * len(ds.scenes)
    seen = set()
    for i in range(n_grid):
        a, b = ds[i], ds[i + n_grid]  # the second repeat gives the same patch
        assert a["hr_mask"].mean() >= 0.5 and a["lr"].shape == (3, 32, 32) and a["hr"].shape == (1, 96, 96)
        assert np.array_equal(a["hr"], b["hr"])
        seen.add((a["index"], a["hr"].sum().item()))
    assert len(seen) == n_grid  # every grid patch once per repeat
