"""Checkpoints load with weights_only: a file that would run code is refused, and resume stays exact."""
from __future__ import annotations

import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import predict
import train
import valid
from conftest import ROOT, TINY_PIUNET, common_args
from engine.checkpoint import CheckpointError, load_checkpoint
from utils.runtime import rng_state, set_rng_state


class _CreatesMarker:
    """Unpickling this calls ``open(marker, "w")``: the file appears if the loader runs pickled code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def evil(tmp_path):
    """A checkpoint-shaped file (our keys, real weights) that carries one code-running object."""
    from models import build_model
    net = build_model("piunet", n_feats=8, n_tefa=1, r_bneck=4)
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"format": 2, "model_name": "piunet", "model_kwargs": dict(net.kwargs), "model": net.state_dict(),
                "config": None, "payload": _CreatesMarker(marker)}, path)
    return path, marker


def test_valid_and_predict_refuse_a_checkpoint_that_runs_code(evil, tmp_path):
    path, marker = evil
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused.*run code.*\(io\.open\)"):
        valid.main([f"--checkpoint={path}", f"--out_dir={tmp_path / 'v'}"])
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused"):
        predict.main([f"--checkpoint={path}", f"--out_dir={tmp_path / 'p'}"])
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused"):
        predict.main([f"--checkpoint_nir={path}", f"--out_dir={tmp_path / 'q'}"])
    assert not marker.exists()


def test_train_refuses_a_checkpoint_that_runs_code(evil, synthetic_root, tmp_path):
    path, marker = evil
    run = tmp_path / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(path.read_bytes())
    args = common_args(synthetic_root, tmp_path) + TINY_PIUNET
    with pytest.raises(CheckpointError, match=r"last\.pt: refused"):
        train.main(args + [f"--out_dir={run}", "--resume"])
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused"):
        train.main(args + [f"--out_dir={tmp_path / 'init'}", f"--checkpoint={path}"])
    assert not marker.exists()


def test_checkpoints_hold_only_weights_only_types(synthetic_root, tmp_path):
    run = train.main(common_args(synthetic_root, tmp_path) + TINY_PIUNET + [f"--out_dir={tmp_path / 'r'}",
                                                                        "--max_steps=1"])
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=True)  # no allow-list
        assert ckpt["format"] == 2 and torch.is_tensor(ckpt["rng"]["numpy"]["key"])


def test_format1_rng_state_still_loads_and_restores(tmp_path):
    """Checkpoints written before this format held NumPy's legacy RNG tuple (an ndarray)."""
    np.random.seed(3)
    legacy = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    want = np.random.rand(4)
    torch.save({"format": 1, "model_name": "baseline", "rng": legacy}, tmp_path / "old.pt")
    np.random.seed(99)
    set_rng_state(load_checkpoint(tmp_path / "old.pt")["rng"])
    assert np.array_equal(np.random.rand(4), want)
    # and the new form round-trips through a weights_only load
    state = rng_state()
    want = (np.random.rand(3), torch.rand(3), random.random())
    torch.save({"rng": state}, tmp_path / "new.pt")
    np.random.seed(5)
    set_rng_state(torch.load(tmp_path / "new.pt", weights_only=True)["rng"])
    got = (np.random.rand(3), torch.rand(3), random.random())
    assert np.array_equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] == want[2]


def test_kill_9_then_resume_is_bit_identical(synthetic_root, tmp_path):
    """SIGKILL at any moment (even while last.pt is written) loses nothing: resuming from last.pt
    gives exactly the weights of a run that was never stopped."""
    run = tmp_path / "killed"
    args = common_args(synthetic_root, tmp_path) + TINY_PIUNET + ["--val_every=100000"]
    cmd = [sys.executable, str(ROOT / "train.py")] + args + [f"--out_dir={run}", "--epochs=100000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run / "checkpoints" / "last.pt").exists():
            assert proc.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.05)
        time.sleep(0.3)  # a little into the next epoch
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    epoch = load_checkpoint(run / "checkpoints" / "last.pt")["epoch"]
    target = epoch + 2
    train.main(args + [f"--out_dir={run}", "--resume", f"--epochs={target}"])
    full = train.main(args + [f"--out_dir={tmp_path / 'full'}", f"--epochs={target}"])
    a, b = load_checkpoint(run / "checkpoints" / "last.pt"), load_checkpoint(full / "checkpoints" / "last.pt")
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (target, 3 * target)
    for k, v in b["model"].items():
        assert torch.equal(a["model"][k], v), k
