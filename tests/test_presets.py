"""The presets' data flow: QA-Net's sub-scene windows and frame order, and ``train.py --plan``."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from scipy.stats import rankdata

import train
from config import parse_args
from conftest import ROOT
from data import DataError, DatasetNotFoundError, build_dataset, read_scene, split_scenes


def _plan(capsys, argv) -> dict:
    train.main(argv + ["--plan"])
    lines = capsys.readouterr().out.strip().splitlines()
    return json.loads(lines[-1])


def test_plan_figures_for_a_root_of_known_counts(synthetic_root, tmp_path, capsys):
    """3 train and 2 val scenes per band: the figures follow from the counts, and nothing is written."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    common = [f"--data_dir={synthetic_root}", f"--out_dir={out}", f"--cache_dir={cache}", "--device=cpu"]
    plan = _plan(capsys, common + ["--preset=qanet", "--patches=random", "--repeats=4", "--batch_size=5",
                                   "--epochs=10", "--lr_milestones=3,8", "--val_every=4"])
    assert plan["scenes"] == {"train": {"NIR": 3, "RED": 3}, "val": {"NIR": 2, "RED": 2}}
    assert (plan["samples_per_epoch"], plan["steps_per_epoch"], plan["total_steps"]) == (24, 4, 40)
    assert plan["lr_milestones_steps"] == [12, 32] and plan["lr_milestones_epochs"] == [3, 8]
    assert plan["val_every_epochs"] == 4 and plan["validations"] == 3  # epochs 4, 8 and the last
    step = _plan(capsys, common + ["--preset=qanet", "--patches=random", "--batch_size=2", "--epochs=5",
                                   "--lr_unit=step", "--lr_milestones=6", "--band=RED", "--holdout_fraction=0.5"])
    assert step["scenes"] == {"train": {"RED": 1}, "val": {"RED": 2}, "holdout": {"RED": 2}}
    assert (step["steps_per_epoch"], step["total_steps"], step["lr_milestones_steps"]) == (0, 0, [6])
    assert "holdout split" in step["best_pt_chosen_on"]
    assert not out.exists() and not cache.exists()


def test_plan_counts_the_kept_windows(synthetic_root, tmp_path, capsys):
    """QA-Net's samples per epoch are the 64x64 windows (stride 32) whose mean quality is >= 0.85."""
    expected = 0
    for band in ("NIR", "RED"):
        for path in split_scenes(synthetic_root, "train", band):
            qm = read_scene(path)["qm"]
            expected += sum(qm[:, y:y + 64, x:x + 64].mean() >= 0.85 for y in (0, 32, 64) for x in (0, 32, 64))
    plan = _plan(capsys, ["--preset=qanet", f"--data_dir={synthetic_root}", f"--cache_dir={tmp_path / 'c'}",
                          f"--out_dir={tmp_path / 'run'}", "--batch_size=2"])
    assert 0 < expected < 54 and plan["samples_per_epoch"] == expected
    assert plan["steps_per_epoch"] == expected // 2 and plan["total_steps"] == 520 * (expected // 2)


def test_plan_refuses_a_root_without_train_scenes_or_a_band(synthetic_root, tmp_path):
    empty = tmp_path / "empty"
    (empty / "val" / "NIR").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="train"):
        train.main(["--preset=qanet", f"--data_dir={empty}", f"--out_dir={tmp_path / 'run'}", "--plan"])
    nir_only = tmp_path / "nir_only"
    (nir_only / "train").mkdir(parents=True)
    (nir_only / "train" / "NIR").symlink_to(synthetic_root / "train" / "NIR")
    proc = subprocess.run([sys.executable, "train.py", "--preset=qanet", f"--data_dir={nir_only}",
                           f"--out_dir={tmp_path / 'run'}", f"--cache_dir={tmp_path / 'c'}", "--plan"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "RED" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "c").exists()


def _clearance_rank_by_position(ds, samples: int) -> np.ndarray:
    """Mean rank (0 = clearest, ties share their mean rank) of the window clearance of the frame fed
    at each position: the clearance the weighted draw uses."""
    ranks = []
    for i in range(samples):
        index, y, x = ds._regions[i]
        idx = ds.frames_for(index, ds._rng(i), (y, x))  # the frames __getitem__ feeds, in their order
        c = ds.scenes[index]["qm"][idx, y:y + 64, x:x + 64].mean((1, 2))
        ranks.append(rankdata(-c) - 1)
    return np.mean(ranks, 0)


def test_qanet_shuffles_its_training_frames_on_real_scenes(probav_root, tmp_path):
    """The weighted draw alone feeds the clearest frames first on average; the preset's shuffle
    leaves no position favoured."""
    cfg = parse_args(["--preset=qanet", f"--data_dir={probav_root}", f"--cache_dir={tmp_path / 'c'}", "--band=NIR"])
    shuffled = build_dataset(cfg, "train", training=True, progress=False)
    ranks = _clearance_rank_by_position(shuffled, len(shuffled))
    assert np.ptp(ranks) < 0.6, ranks
    drawn = build_dataset(cfg.replace(frame_order="selection"), "train", training=True, progress=False)
    assert np.ptp(_clearance_rank_by_position(drawn, len(drawn))) > 1.0


def test_qanet_feeds_frames_in_one_order_rule_for_training_and_evaluation(synthetic_root, tmp_path):
    cfg = parse_args(["--preset=qanet", f"--data_dir={synthetic_root}", f"--cache_dir={tmp_path / 'c'}",
                      "--n_frames=4", "--patch_size=32"])
    train_ds = build_dataset(cfg, "train", training=True, progress=False)
    val_ds = build_dataset(cfg, "val", progress=False)
    assert train_ds.frame_order == val_ds.frame_order == "shuffled"  # one rule, from one config field
    # evaluation: a seeded shuffle of the selected frames, the same on every construction
    again = build_dataset(cfg, "val", progress=False)
    plain = build_dataset(cfg.replace(frame_order="selection"), "val", progress=False)
    orders_differ = False
    for i in range(len(val_ds)):
        a, b, p = val_ds[i]["lr"], again[i]["lr"], plain[i]["lr"]
        assert (a == b).all()
        assert sorted(a.flatten(1).sum(1).tolist()) == sorted(p.flatten(1).sum(1).tolist())
        orders_differ |= not (a == p).all()
    assert orders_differ
    # clearest_first: both training and evaluation feed by decreasing clearance
    for ds in (build_dataset(cfg.replace(frame_order="clearest_first"), "train", training=True, progress=False),
               build_dataset(cfg.replace(frame_order="clearest_first"), "val", progress=False)):
        for i in range(len(ds)):
            idx = ds.frames_for(i % len(ds.scenes), ds._rng(i))
            c = ds.scenes[i % len(ds.scenes)]["clearance"][idx]
            assert (np.diff(c) <= 0).all()


def test_window_crops_stay_inside_their_window(synthetic_root, tmp_path):
    cfg = parse_args(["--preset=qanet", f"--data_dir={synthetic_root}", f"--cache_dir={tmp_path / 'c'}",
                      "--n_frames=4", "--min_clear=0"])
    ds = build_dataset(cfg, "train", training=True, progress=False)
    for item in range(len(ds)):
        index, wy, wx = ds._regions[item]
        s = ds[item]
        scene = ds.scenes[index]
        lr = (scene["lr"].astype(np.float32) / 65535.0)
        hits = [(y, x) for y in range(wy, wy + 64 - 32 + 1) for x in range(wx, wx + 64 - 32 + 1)
                if np.isin(s["lr"][0, 0, :4].numpy(), lr[:, y, x:x + 4]).all()
                and (lr[:, y:y + 32, x:x + 32] == s["lr"][0].numpy()).all(axis=(1, 2)).any()]
        assert hits, f"sample {item}: the crop is not inside window ({wy}, {wx})"


def test_piunet_preset_trains_one_band_and_chooses_on_its_cpsnr(synthetic_root, tmp_path):
    cfg = parse_args(["--preset=piunet", f"--data_dir={synthetic_root}"])
    assert cfg.band == "NIR" and cfg.best_metric == "cpsnr" and cfg.val_every == 1
    from engine.keeper import rank_value
    summary = {"all": {"cpsnr": 40.0, "score": 0.9}}
    assert rank_value(summary, "cpsnr") == -40.0 and rank_value(summary, "score") == 0.9
    with pytest.raises(DataError):
        build_dataset(cfg.replace(min_frame_clearance=1.0), "train", training=True, progress=False)


@pytest.mark.parametrize("preset", ["cpu_real_qanet", "cpu_real"])
def test_augmentation_reorders_frames_only_for_order_invariant_models(preset, synthetic_root, tmp_path):
    """QA-Net's layers depend on a frame's position: its augmented samples keep the order
    ``frame_order`` gives (clearest first, as evaluated); PIUnet's may be shuffled (it cannot tell)."""
    cfg = parse_args([f"--preset={preset}", f"--data_dir={synthetic_root}", f"--cache_dir={tmp_path / 'c'}",
                      "--n_frames=4", "--frame_order=clearest_first", "--min_clear=0"])
    side = build_dataset(cfg, "val", progress=False).scenes[0]["lr"].shape[-1]
    ds = build_dataset(cfg.replace(patch_size=side), "train", training=True, progress=False)  # whole scenes
    assert ds.augment
    orders = [np.diff(ds[i]["lr_mask"].flatten(1).sum(1).numpy()) for i in range(len(ds))]
    sorted_samples = sum(bool((d <= 0).all()) for d in orders)
    if preset == "cpu_real_qanet":
        assert sorted_samples == len(ds)  # flips and rotations keep each frame's clear count
    else:
        assert sorted_samples < len(ds)
