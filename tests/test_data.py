"""The scene reader, the dataset, frame selection and the synthetic writer."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data import (
    DataError,
    DatasetNotFoundError,
    DatasetOptions,
    ProbaVDataset,
    list_scenes,
    load_scene_cached,
    read_norm,
    read_scene,
    select_frames,
    split_scenes,
    write_png,
)
from data.synthetic import generate, make_scene, write_scene


def _check_scene(s: dict, with_hr: bool) -> None:
    assert set(s) == {"name", "band", "lr", "qm", "hr", "sm"}
    assert s["name"].startswith("imgset") and s["band"] in ("NIR", "RED")
    T = s["lr"].shape[0]
    assert 9 <= T <= 35
    assert s["lr"].dtype == np.uint16 and s["lr"].shape == (T, 128, 128)
    assert s["qm"].dtype == np.bool_ and s["qm"].shape == (T, 128, 128)
    if with_hr:
        assert s["hr"].dtype == np.uint16 and s["hr"].shape == (384, 384)
        assert s["sm"].dtype == np.bool_ and s["sm"].shape == (384, 384)
    else:
        assert s["hr"] is None


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_reader_on_real_scenes(probav_root, split):
    for band in ("NIR", "RED"):
        paths = list_scenes(probav_root, split, band)
        assert paths
        for p in paths[:3]:
            s = read_scene(p)
            _check_scene(s, with_hr=split != "test")
            assert s["band"] == band and s["name"] == p.name
            # frames in index order: LR000 is the first
            first = np.asarray(Image.open(p / "LR000.png"))
            assert np.array_equal(s["lr"][0], first)


def test_real_values_exceed_14_bits_somewhere(probav_root):
    """The reader must keep values above 2**14 (they exist in the real data)."""
    top = max(int(read_scene(p)["lr"].max()) for p in list_scenes(probav_root, "train", "NIR")[:20])
    assert top > 2 ** 14 - 1


def test_norm_csv(probav_root):
    norm = read_norm(probav_root / "norm.csv")
    assert all(30 < v < 80 for v in norm.values())
    assert "imgset0000" in norm


def _scene_dir(tmp_path: Path, n: int = 3) -> Path:
    p = tmp_path / "train" / "NIR" / "imgset0001"
    s = make_scene(3, n_frames=n)
    write_scene(p, s)
    return p


def test_missing_qm_names_the_file(tmp_path):
    p = _scene_dir(tmp_path)
    (p / "QM001.png").unlink()
    with pytest.raises(DataError, match=r"QM001\.png.*quality map missing for LR001\.png"):
        read_scene(p)


def test_lr_not_16_bit(tmp_path):
    p = _scene_dir(tmp_path)
    Image.fromarray(np.zeros((128, 128), np.uint8)).save(p / "LR002.png")
    with pytest.raises(DataError, match=r"LR002\.png.*16-bit"):
        read_scene(p)


@pytest.mark.parametrize("name,shape", [("LR000.png", (100, 128)), ("HR.png", (383, 384))])
def test_wrong_shapes(tmp_path, name, shape):
    p = _scene_dir(tmp_path)
    write_png(p / name, np.zeros(shape, np.uint16))
    with pytest.raises(DataError, match=rf"{name.replace('.', r'.')}.*expected shape"):
        read_scene(p)


def test_wrong_mask_shape(tmp_path):
    p = _scene_dir(tmp_path)
    write_png(p / "SM.png", np.ones((128, 128), bool))
    with pytest.raises(DataError, match=r"SM\.png.*expected shape"):
        read_scene(p)


def test_hr_without_sm(tmp_path):
    p = _scene_dir(tmp_path)
    (p / "SM.png").unlink()
    with pytest.raises(DataError, match=r"SM\.png.*status map missing"):
        read_scene(p)


def test_scene_without_lr(tmp_path):
    p = tmp_path / "train" / "NIR" / "imgset0009"
    p.mkdir(parents=True)
    with pytest.raises(DataError, match=r"imgset0009.*no LR frame"):
        read_scene(p)


def test_corrupt_png(tmp_path):
    p = _scene_dir(tmp_path)
    (p / "LR000.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"LR000\.png.*not a readable PNG"):
        read_scene(p)


def test_empty_split_and_missing_root(tmp_path):
    (tmp_path / "train" / "NIR").mkdir(parents=True)
    with pytest.raises(DataError, match="empty split"):
        list_scenes(tmp_path, "train", "NIR")
    with pytest.raises(DatasetNotFoundError) as e:
        list_scenes(tmp_path / "nowhere", "train", "NIR")
    msg = str(e.value)
    assert "nowhere" in msg and "synthetic" in msg and "kelvins" in msg.lower()
    with pytest.raises(DatasetNotFoundError, match="nowhere"):
        ProbaVDataset(tmp_path / "nowhere", "train")


def test_synthetic_round_trip_and_determinism(tmp_path):
    s = make_scene(7, n_frames=10)
    write_scene(tmp_path / "val" / "RED" / "imgset0042", s)
    r = read_scene(tmp_path / "val" / "RED" / "imgset0042")
    _check_scene(r, with_hr=True)
    assert r["band"] == "RED" and r["name"] == "imgset0042"
    for k in ("lr", "qm", "hr", "sm"):
        assert np.array_equal(r[k], s[k])
    assert (~s["qm"]).any(), "clouds are marked in QM"
    t = make_scene(7, n_frames=10)
    assert all(np.array_equal(s[k], t[k]) for k in ("lr", "qm", "hr", "sm"))
    assert not np.array_equal(make_scene(8, n_frames=10)["lr"], s["lr"])


def test_synthetic_dataset_layout(synthetic_root, tmp_path):
    for split, n in (("train", 3), ("val", 2), ("test", 2)):
        for band in ("NIR", "RED"):
            assert len(list_scenes(synthetic_root, split, band)) == n
    norm = read_norm(synthetic_root / "norm.csv")
    assert len(norm) == 2 * (3 + 2 + 2) and all(np.isfinite(v) for v in norm.values())
    with pytest.raises(FileExistsError):
        generate(synthetic_root, 1, 1, 1)
    # byte-identical for the same seed
    a = generate(tmp_path / "a", 1, 1, 0, seed=5)
    b = generate(tmp_path / "b", 1, 1, 0, seed=5)
    for f in sorted(a.rglob("*.png")):
        assert f.read_bytes() == (b / f.relative_to(a)).read_bytes()


def test_val_carved_from_train_when_absent(synthetic_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(synthetic_root, root)
    shutil.rmtree(root / "val")
    for band in ("NIR", "RED"):
        train = split_scenes(root, "train", band, val_fraction=0.3)
        val = split_scenes(root, "val", band, val_fraction=0.3)
        assert len(val) == 1 and len(train) == 2
        assert not set(train) & set(val)
        assert val == split_scenes(root, "val", band, val_fraction=0.3)  # deterministic
    # with a val/ folder, train is all of train/
    assert len(split_scenes(synthetic_root, "train", "NIR")) == 3


def test_frame_selection():
    rng = np.random.default_rng(0)
    qm = np.ones((5, 8, 8), bool)
    clear = [10, 64, 30, 50, 0]
    for t, c in enumerate(clear):
        qm[t].flat[c:] = False
    assert select_frames(qm, 2, "clearest").tolist() == [1, 3]
    # fewer frames than k: padded by repeating the clearest
    assert select_frames(qm[:2], 4, "clearest").tolist() == [1, 0, 1, 1]
    draws = np.stack([select_frames(qm, 2, "weighted", np.random.default_rng(i), beta=3.0) for i in range(1000)])
    assert all(len(set(d)) == 2 for d in draws)  # without replacement
    counts = np.bincount(draws.ravel(), minlength=5)
    assert counts[1] > counts[3] > counts[2] > counts[0] > counts[4] > 0
    # a large beta concentrates on the clearest frames (QA-Net's beta=50)
    sharp = {tuple(sorted(select_frames(qm, 2, "weighted", np.random.default_rng(i), beta=50.0))) for i in range(50)}
    assert sharp == {(1, 3)}
    # coverage: the worst-covered clear HR pixel decides
    sm = np.ones((24, 24), bool)
    qm2 = np.ones((4, 8, 8), bool)
    qm2[0, :, :4] = qm2[1, :, :4] = False  # two clear-ish frames that miss the same half
    qm2[2, :, 4:] = False
    qm2[3, 0, 0] = False
    sel = select_frames(qm2, 2, "coverage", rng, sm=sm)
    assert 2 in sel.tolist() and 3 in sel.tolist()
    with pytest.raises(ValueError, match="clearest, weighted, coverage, all"):
        select_frames(qm, 2, "best")


def test_dataset_samples_and_patches(synthetic_root):
    ds = ProbaVDataset(synthetic_root, "train", DatasetOptions(bands="all", n_frames=4, selection="weighted",
                                                                patch_size=16, min_clear=0.5, progress=False))
    assert len(ds) == 6
    s = ds[0]
    assert set(s) >= {"lr", "lr_mask", "hr", "hr_mask", "name", "band"}
    assert s["lr"].shape == (4, 16, 16) and s["lr_mask"].shape == (4, 16, 16)
    assert s["hr"].shape == (1, 48, 48) and s["hr_mask"].shape == (1, 48, 48)
    assert 0 <= s["lr"].min() and s["lr"].max() <= 1
    assert s["hr_mask"].mean() >= 0.5
    # same (seed, epoch, index): same sample; another epoch: another draw
    assert all((ds[0][k] == s[k]).all() for k in ("lr", "hr"))
    ds.set_epoch(1)
    assert not (ds[0]["lr"] == s["lr"]).all()
    # the HR patch sits at x3 the LR patch position
    full = ProbaVDataset(synthetic_root, "val", DatasetOptions(bands="NIR", n_frames=4, progress=False))
    f = full[0]
    assert f["lr"].shape == (4, 128, 128) and f["hr"].shape == (1, 384, 384)
    test = ProbaVDataset(synthetic_root, "test", DatasetOptions(bands="RED", n_frames=4, progress=False))
    assert "hr" not in test[0] and test[0]["band"] == "RED"


def test_patch_alignment(tmp_path):
    # a scene whose HR is the x3 nearest upscaling of LR: patches must match exactly
    s = make_scene(1, n_frames=3)
    s["hr"] = np.repeat(np.repeat(s["lr"][0], 3, 0), 3, 1)
    s["lr"][:] = s["lr"][0]
    s["qm"][:] = True
    write_scene(tmp_path / "train" / "NIR" / "imgset0000", s)
    (tmp_path / "val" / "NIR").mkdir(parents=True)
    write_scene(tmp_path / "val" / "NIR" / "imgset0001", s)
    ds = ProbaVDataset(tmp_path, "train", DatasetOptions(bands="NIR", n_frames=2, patch_size=10, progress=False))
    for e in range(5):
        ds.set_epoch(e)
        x = ds[0]
        up = x["lr"][0].repeat_interleave(3, 0).repeat_interleave(3, 1)
        assert (up == x["hr"][0]).all()


def test_decode_cache_is_invalidated_when_files_change(tmp_path):
    p = _scene_dir(tmp_path)
    cache = tmp_path / "cache"
    a = load_scene_cached(p, cache)
    assert list(cache.iterdir())
    b = load_scene_cached(p, cache)
    assert np.array_equal(a["lr"], b["lr"]) and np.array_equal(a["clearance"], b["clearance"])
    new = a["lr"][0].copy()
    new[0, 0] += 1
    write_png(p / "LR000.png", new)
    c = load_scene_cached(p, cache)
    assert c["lr"][0, 0, 0] == new[0, 0]
    assert np.allclose(c["clearance"], a["qm"].mean((1, 2)))


def test_repeats_draw_different_patches_and_fill_clouds(synthetic_root):
    ds = ProbaVDataset(synthetic_root, "train", DatasetOptions(bands="NIR", n_frames=9, selection="weighted",
                                                                patch_size=16, repeats=3, progress=False))
    n = len(ds.scenes)
    assert len(ds) == 3 * n
    a, b = ds[0], ds[n]
    assert a["name"] == b["name"] and not torch.equal(a["lr"], b["lr"])  # same scene, another patch
    with pytest.raises(IndexError):
        ds[3 * n]
    opts = DatasetOptions(bands="NIR", n_frames=9, selection="clearest", progress=False)
    filled = ProbaVDataset(synthetic_root, "train", dataclasses.replace(opts, fill_clouds=True))[0]
    plain = ProbaVDataset(synthetic_root, "train", opts)[0]
    clear = plain["lr_mask"] > 0
    assert torch.equal(filled["lr"][clear], plain["lr"][clear]) and torch.equal(filled["lr_mask"], plain["lr_mask"])
    assert (~clear).any()
    # a cloudy pixel takes the median of the clear values of that pixel
    t, y, x = [int(v[0]) for v in torch.nonzero(~clear, as_tuple=True)]
    col = plain["lr"][:, y, x][clear[:, y, x]]
    if len(col):
        assert filled["lr"][t, y, x].item() == pytest.approx(float(np.median(col.numpy())), abs=1e-7)


def test_step_batch_sampler_splits_steps_over_processes_and_accumulation():
    from data.sampler import StepBatchSampler
    one = list(StepBatchSampler(20, 2, world=1, rank=0, accum_steps=2, seed=3, epoch=1))
    r0 = list(StepBatchSampler(20, 2, world=2, rank=0, accum_steps=1, seed=3, epoch=1))
    r1 = list(StepBatchSampler(20, 2, world=2, rank=1, accum_steps=1, seed=3, epoch=1))
    assert one[0::2] == r0 and one[1::2] == r1  # micro-batch a of one process = rank a of two
    assert len(one) == 10 and sorted(sum(one, [])) == list(range(20))
    skipped = list(StepBatchSampler(20, 2, accum_steps=2, seed=3, epoch=1, skip_steps=3))
    assert skipped == one[6:]
    assert list(StepBatchSampler(20, 2, seed=3, epoch=2)) != list(StepBatchSampler(20, 2, seed=3, epoch=1))
    with pytest.raises(ValueError, match="cannot fill one optimizer step"):
        StepBatchSampler(5, 2, world=2, accum_steps=2)


def test_select_split_is_carved_from_train_and_disjoint(synthetic_root):
    for band in ("NIR", "RED"):
        train = set(split_scenes(synthetic_root, "train", band, holdout_fraction=0.34))
        holdout = set(split_scenes(synthetic_root, "holdout", band, holdout_fraction=0.34))
        everything = set(split_scenes(synthetic_root, "train", band))
        val = set(split_scenes(synthetic_root, "val", band, holdout_fraction=0.34))
        assert len(holdout) == 2 and train | holdout == everything and not train & holdout and not val & everything
    with pytest.raises(ValueError, match="holdout_fraction"):
        split_scenes(synthetic_root, "holdout", "NIR")


def test_augmentation_keeps_lr_and_hr_aligned():
    from data.transforms import augment_sample
    rng = np.random.default_rng(0)
    lr = rng.integers(0, 1000, size=(3, 5, 4)).astype(np.uint16)
    qm = lr > 500
    hr = np.kron(lr[1], np.ones((3, 3), np.uint16))  # the target is frame 1, upscaled
    sm = np.kron(qm[1], np.ones((3, 3), bool))
    seen = set()
    for seed in range(40):
        a_lr, a_qm, a_hr, a_sm = augment_sample(np.random.default_rng(seed), lr, qm, hr, sm)
        pos = [t for t in range(3) if np.array_equal(np.sort(a_lr[t].ravel()), np.sort(lr[1].ravel()))]
        assert any(np.array_equal(np.kron(a_lr[t], np.ones((3, 3), np.uint16)), a_hr) for t in pos)
        assert np.array_equal(a_qm, a_lr > 500) and np.array_equal(a_sm, a_hr > 500)
        seen.add(a_hr.tobytes())
    assert len(seen) == 8  # every flip/rotation occurs
    assert augment_sample(np.random.default_rng(0), lr, qm, None, None)[2] is None


def test_unknown_selection_names_the_table_and_options_are_frozen():
    from data import SELECTIONS
    qm = np.ones((3, 4, 4), bool)
    keys = ", ".join(SELECTIONS)
    with pytest.raises(ValueError, match=f"unknown frame selection 'best'; choose from {keys}$"):
        select_frames(qm, 2, "best")
    with pytest.raises(ValueError, match=f"unknown frame selection 'best'; choose from {keys}$"):
        select_frames(qm, 2, "best", min_clearance=0.5)  # checked before the candidates are narrowed
    with pytest.raises(ValueError, match=f"unknown frame selection 'best'; choose from {keys}$"):
        DatasetOptions(selection="best")  # before any scene is read
    opts = DatasetOptions(n_frames=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.n_frames = 5
    assert dataclasses.replace(opts, n_frames=5).n_frames == 5 and opts.n_frames == 4
    assert {f.name for f in dataclasses.fields(DatasetOptions)} >= {"bands", "selection", "patches", "frame_order"}
