"""The researcher's loop: train, resume, validate and predict, on tiny synthetic and real data."""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch

import engine.trainer
import predict
import train
import valid
from config import ConfigError
from conftest import ROOT, TINY_PIUNET, TINY_QANET, assert_same_state, common_args, shared_path, weights
from data import DatasetNotFoundError, read_png
from engine.checkpoint import load_checkpoint


@pytest.mark.parametrize("tiny", [TINY_QANET, TINY_PIUNET], ids=["qanet", "piunet"])
def test_resumed_run_equals_an_uninterrupted_one(synthetic_root, tmp_path, tiny):
    args = common_args(synthetic_root, tmp_path) + tiny
    # 6 train scenes, batch 2: 3 steps per epoch. Stop mid-epoch 1 and after the epoch-2 boundary.
    full = train.main(args + [f"--out_dir={tmp_path / 'full'}", "--max_steps=5"])
    part = tmp_path / "part"
    train.main(args + [f"--out_dir={part}", "--max_steps=2"])
    assert load_checkpoint(part / "checkpoints" / "last.pt")["step_in_epoch"] == 2
    train.main(args + [f"--out_dir={part}", "--resume", "--max_steps=5"])
    assert_same_state(full / "checkpoints" / "last.pt", part / "checkpoints" / "last.pt")
    # the run folder holds everything it promises
    cfg = json.loads((full / "config.json").read_text())
    assert cfg["max_steps"] == 5 and cfg["model"] == tiny[0].split("=")[1]
    assert (full / "checkpoints" / "best.pt").exists()
    assert list(full.glob("events.out.tfevents.*"))
    panels = list((full / "images").glob("*.png"))
    assert panels
    ckpt = load_checkpoint(full / "checkpoints" / "last.pt")
    assert {"model_name", "model_kwargs", "optimizer", "scheduler", "scaler", "epoch", "step", "rng",
            "best_score", "config"} <= set(ckpt)


def test_a_finished_run_is_not_overwritten_and_resume_needs_a_run(synthetic_root, tmp_path):
    args = common_args(synthetic_root, tmp_path) + TINY_QANET + [f"--out_dir={tmp_path / 'r'}", "--max_steps=1"]
    train.main(args)
    with pytest.raises(ConfigError, match="--resume"):
        train.main(args)
    with pytest.raises(ConfigError, match="cannot change the model"):
        train.main(args[:-1] + ["--resume", "--model=piunet"])


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(synthetic_root, tmp_path, monkeypatch):
    run = tmp_path / "r"
    args = common_args(synthetic_root, tmp_path) + TINY_QANET + [f"--out_dir={run}"]
    train.main(args + ["--max_steps=1"])
    before = weights(run / "checkpoints" / "last.pt")

    def nan_loss(name, out, hr, hr_mask):
        return out["sr"].sum() * float("nan")

    monkeypatch.setattr(engine.trainer, "compute_loss", nan_loss)
    with pytest.raises(train.TrainingDiverged, match="loss is nan.*last good checkpoint"):
        train.main(args + ["--resume", "--max_steps=3"])
    after = weights(run / "checkpoints" / "last.pt")
    for k in before:
        assert torch.equal(before[k], after[k])


def test_missing_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="kelvins.*synthetic"):
        train.main([f"--data_dir={tmp_path / 'nowhere'}", f"--out_dir={tmp_path / 'r'}", "--device=cpu"])


def test_valid_and_predict_from_a_checkpoint(synthetic_root, tmp_path, capsys):
    run = train.main(common_args(synthetic_root, tmp_path) + TINY_PIUNET + [f"--out_dir={tmp_path / 'r'}",
                                                                         "--max_steps=2"])
    ckpt = run / "checkpoints" / "last.pt"
    # valid.py takes the data directory from the checkpoint
    summary = valid.main([f"--checkpoint={ckpt}", f"--out_dir={tmp_path / 'v'}", "--save_png"])
    rows = list(csv.DictReader(open(tmp_path / "v" / "per_scene.csv")))
    assert list(rows[0]) == ["scene", "band", "cpsnr", "cssim", "norm", "score"]
    assert len(rows) == 4 and {r["band"] for r in rows} == {"NIR", "RED"}
    for band in ("NIR", "RED"):
        vals = [float(r["cpsnr"]) for r in rows if r["band"] == band]
        assert summary[band]["cpsnr"] == pytest.approx(np.mean(vals), abs=1e-5)
        scores = [float(r["norm"]) / float(r["cpsnr"]) for r in rows if r["band"] == band]
        assert summary[band]["score"] == pytest.approx(np.mean(scores), abs=1e-5)
    png = read_png(tmp_path / "v" / "sr" / "NIR" / f"{rows[0]['scene']}.png", "image")
    assert png.shape == (384, 384) and png.dtype == np.uint16
    out = capsys.readouterr().out
    assert "Kelvin score" in out

    # predict.py: a checked zip, a note on the count, and no silent overwrite
    zpath = predict.main([f"--checkpoint={ckpt}", f"--out_dir={tmp_path / 'p'}", "--export_uncertainty"])
    with zipfile.ZipFile(zpath) as z:
        names = sorted(z.namelist())
    assert len(names) == 4 and all(n.startswith("imgset") and n.endswith(".png") for n in names)
    assert "expects 290" in capsys.readouterr().out
    assert len(list((tmp_path / "p" / "uncertainty").glob("*.npy"))) == 4
    stamp = zpath.stat().st_mtime_ns
    with pytest.raises(ConfigError, match="--force"):
        predict.main([f"--checkpoint={ckpt}", f"--out_dir={tmp_path / 'p'}"])
    assert zpath.stat().st_mtime_ns == stamp
    predict.main([f"--checkpoint={ckpt}", f"--out_dir={tmp_path / 'p'}", "--force"])
    # one checkpoint per band
    zb = predict.main([f"--checkpoint_nir={ckpt}", f"--checkpoint_red={ckpt}", f"--out_dir={tmp_path / 'q'}"])
    with zipfile.ZipFile(zb) as z:
        assert sorted(z.namelist()) == names


def test_valid_baseline_scores_one_and_skips_scenes_without_clear_pixels(synthetic_root, tmp_path, capsys):
    summary = valid.main(["--model=baseline", f"--data_dir={synthetic_root}", f"--out_dir={tmp_path / 'b'}",
                          f"--cache_dir={tmp_path / 'cache'}", "--device=cpu"])
    # norm.csv of the synthetic root is the baseline's own cPSNR
    assert summary["all"]["score"] == pytest.approx(1.0, abs=1e-5)
    assert summary["all"]["n"] == 4 and not summary["all"]["skipped"]

    # a scene whose status map is all cloud is listed as skipped, never averaged
    import shutil
    root = tmp_path / "cloudy"
    shutil.copytree(synthetic_root, root)
    scene = sorted((root / "val" / "NIR").iterdir())[0]
    from data import write_png
    write_png(scene / "SM.png", np.zeros((384, 384), bool))
    summary = valid.main(["--model=baseline", f"--data_dir={root}", f"--out_dir={tmp_path / 'c'}",
                          "--cache_dir=", "--device=cpu"])
    assert summary["all"]["skipped"] == [scene.name] and summary["all"]["n"] == 3
    assert all(math.isfinite(summary[b]["cpsnr"]) for b in ("NIR", "RED", "all"))
    rows = {r["scene"]: r for r in csv.DictReader(open(tmp_path / "c" / "per_scene.csv"))}
    assert rows[scene.name]["cpsnr"] == "" and "skipped" in capsys.readouterr().out


def test_self_ensemble_undoes_every_transform():
    """The ESA baseline commutes with flips and rotations (symmetric kernel), so its self-ensemble
    equals its plain output; a wrong inverse transform would not."""
    from engine.evaluate import super_resolve
    from models import build_model
    g = torch.Generator().manual_seed(0)
    lr = torch.rand(2, 5, 12, 12, generator=g)
    mask = (torch.rand(2, 5, 12, 12, generator=g) < 0.8).float()
    base = build_model("baseline")
    plain = super_resolve(base, lr, mask)["sr"]
    ens = super_resolve(base, lr, mask, ensemble=True)["sr"]
    torch.testing.assert_close(ens, plain, atol=1e-6, rtol=0)
    # and a frame-order-dependent model still gives a finite SR of the right shape
    from models import build_model as bm
    q = bm("qanet", n_modules=1, n_resblocks=1, n_feats=8, reduction=4, n_frames=5).eval()
    out = super_resolve(q, lr, mask, ensemble=True)["sr"]
    assert out.shape == (2, 1, 36, 36) and torch.isfinite(out).all()


def test_self_ensemble_rolls_frames_only_for_models_trained_on_shuffled_frames():
    """A model trained on one frame order (QA-Net with clearest_first) is ensembled over flips and
    rotations only, in that order; one trained on shuffled frames also over cyclic frame orders."""
    from engine.evaluate import _dihedral, _undo_dihedral, super_resolve
    from models import build_model
    g = torch.Generator().manual_seed(1)
    lr = torch.rand(1, 5, 12, 12, generator=g)
    mask = (torch.rand(1, 5, 12, 12, generator=g) < 0.8).float()
    torch.manual_seed(0)
    q = build_model("qanet", n_modules=1, n_resblocks=1, n_feats=8, reduction=4, n_frames=5).eval()
    for name, buf in q.named_buffers():  # per-position BatchNorm statistics: what makes the order matter
        if name.endswith("running_mean"):
            buf.normal_(0, 0.5)
        elif name.endswith("running_var"):
            buf.uniform_(0.5, 2.0)
    transforms = [(k, f) for f in (False, True) for k in range(4)]

    def by_hand(roll: bool) -> torch.Tensor:
        outs = []
        for i, (k, f) in enumerate(transforms):
            x, m = _dihedral(lr, k, f), _dihedral(mask, k, f)
            if roll:
                x, m = x.roll(i % 5, 1), m.roll(i % 5, 1)
            outs.append(_undo_dihedral(q(x, m), k, f))
        return torch.stack(outs).mean(0).clamp(0, 1)

    with torch.no_grad():
        fixed, rolled = by_hand(False), by_hand(True)
        torch.testing.assert_close(super_resolve(q, lr, mask, ensemble=True)["sr"], fixed, atol=1e-6, rtol=0)
        torch.testing.assert_close(super_resolve(q, lr, mask, ensemble=True, roll_frames=True)["sr"], rolled,
                                   atol=1e-6, rtol=0)
    assert (fixed - rolled).abs().max() > 1e-4  # the two differ: the test can tell them apart
    # valid.py and predict.py go through iterate, which takes the rule from the dataset's frame_order
    from engine.evaluate import iterate

    class Scenes(list):  # a dataset of one scene that says its frame order
        def __init__(self, scenes: list, frame_order: str):
            super().__init__(scenes)
            self.frame_order = frame_order

    for order, want in (("shuffled", rolled), ("clearest_first", fixed)):
        ds = Scenes([{"lr": lr[0], "lr_mask": mask[0]}], order)
        _, out = next(iterate(q, ds, torch.device("cpu"), ensemble=True, progress=False))
        torch.testing.assert_close(out["sr"], want, atol=1e-6, rtol=0)


def test_ctrl_c_saves_last_checkpoint(synthetic_root, tmp_path):
    run = tmp_path / "r"
    cmd = [sys.executable, str(ROOT / "train.py")] + common_args(synthetic_root, tmp_path) + TINY_QANET + [
        f"--out_dir={run}", "--epochs=100000", "--val_every=100000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run / "checkpoints" / "last.pt").exists():  # written after the first epoch
            assert proc.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted: saved" in out and "--resume" in out
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["step"] >= 3


def test_cycle_on_real_scenes(tmp_path):
    """Two steps of QA-Net on a few real scenes, resumed, validated and predicted."""
    src = shared_path("probav")
    root = tmp_path / "real"
    # a small root of links to real scenes: 3 train and 1 val scene per band, 1 test scene per band
    for split, n in (("train", 3), ("val", 1), ("test", 1)):
        for band in ("NIR", "RED"):
            (root / split / band).mkdir(parents=True)
            for scene in sorted((src / split / band).iterdir())[:n]:
                os.symlink(scene, root / split / band / scene.name)
    os.symlink(src / "norm.csv", root / "norm.csv")
    args = common_args(root, tmp_path) + TINY_QANET + [f"--out_dir={tmp_path / 'r'}"]
    train.main(args + ["--max_steps=1"])
    run = train.main(args + ["--resume", "--max_steps=2"])
    ckpt = run / "checkpoints" / "last.pt"
    assert load_checkpoint(ckpt)["step"] == 2
    summary = valid.main([f"--checkpoint={ckpt}", f"--out_dir={tmp_path / 'v'}"])
    assert summary["all"]["n"] == 2 and math.isfinite(summary["all"]["score"])
    zpath = predict.main([f"--checkpoint={ckpt}", f"--out_dir={tmp_path / 'p'}"])
    with zipfile.ZipFile(zpath) as z:
        assert len(z.namelist()) == 2


QUALITY = ["--augment", "--ema=0.9", "--holdout_fraction=0.25",
           '--model_args={"n_feats": 8, "n_tefa": 1, "r_bneck": 4, "skip": "baseline"}']


def test_resume_is_exact_with_ema_augmentation_and_a_holdout_split(synthetic_root, tmp_path, monkeypatch):
    args = common_args(synthetic_root, tmp_path) + TINY_PIUNET + QUALITY
    chooser = []
    real = engine.trainer.validate
    monkeypatch.setattr(engine.trainer, "validate",
                        lambda *a, **k: chooser.append(k.get("tag", "val")) or real(*a, **k))
    # 2 of 3 train scenes per band left (one held out to choose best.pt), batch 2: 2 steps per epoch
    full = train.main(args + [f"--out_dir={tmp_path / 'full'}", "--max_steps=5"])
    assert "holdout" in chooser and "val" in chooser
    part = tmp_path / "part"
    train.main(args + [f"--out_dir={part}", "--max_steps=3"])
    train.main(args + [f"--out_dir={part}", "--resume", "--max_steps=5"])
    assert_same_state(full / "checkpoints" / "last.pt", part / "checkpoints" / "last.pt")
    a, b = load_checkpoint(full / "checkpoints" / "last.pt"), load_checkpoint(part / "checkpoints" / "last.pt")
    assert a["ema_updates"] == b["ema_updates"] == 5
    for k, v in a["raw_model"].items():
        torch.testing.assert_close(v, b["raw_model"][k], rtol=0, atol=1e-6, msg=k)
    # the saved model is the moving average, not the last weights
    assert any(not torch.equal(v, a["raw_model"][k]) for k, v in a["model"].items() if v.is_floating_point())
    # valid.py rebuilds the baseline-skip model from the checkpoint alone
    summary = valid.main([f"--checkpoint={full / 'checkpoints' / 'last.pt'}", f"--out_dir={tmp_path / 'v'}"])
    assert math.isfinite(summary["all"]["cpsnr"])


def test_max_minutes_stops_training_then_validates_and_saves(synthetic_root, tmp_path):
    run = train.main(common_args(synthetic_root, tmp_path) + TINY_QANET + [f"--out_dir={tmp_path / 'r'}",
                                                                       "--max_minutes=0.0001"])
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (ckpt["epoch"], ckpt["step"], ckpt["step_in_epoch"]) == (0, 1, 1)  # stopped after its first step
    assert (run / "checkpoints" / "best.pt").exists()
