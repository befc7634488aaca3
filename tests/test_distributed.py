"""Distributed training with torchrun on CPU (gloo): 2 processes equal 1 process accumulating."""
from __future__ import annotations

import subprocess
import sys

import torch

from conftest import ROOT, TINY_PIUNET, TINY_QANET, common_args
from engine.checkpoint import load_checkpoint


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def test_two_processes_equal_one_process_with_gradient_accumulation(synthetic_root, tmp_path):
    # QA-Net for BatchNorm over frames (per-process statistics on gloo), PIUnet for its head that the
    # warm-up loss leaves unused; 6 scenes, micro-batches of 2: one optimizer step per epoch
    for name, tiny in (("qanet", TINY_QANET), ("piunet", TINY_PIUNET)):
        args = common_args(synthetic_root, tmp_path) + tiny + ["--max_steps=3", "--batch_size=2"]
        ddp, single = tmp_path / f"{name}-ddp", tmp_path / f"{name}-single"
        _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              str(ROOT / "train.py")] + args + [f"--out_dir={ddp}"])
        _run([sys.executable, str(ROOT / "train.py")] + args + ["--accum_steps=2", f"--out_dir={single}"])
        a, b = load_checkpoint(ddp / "checkpoints" / "last.pt"), load_checkpoint(single / "checkpoints" / "last.pt")
        assert a["step"] == b["step"] == 3
        params = dict(torch.nn.Module.named_parameters(__import__("models").build_model(name, **a["model_kwargs"])))
        for key in params:
            torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=1e-5, msg=f"{name} {key}")
        # one set of outputs, written by rank 0 only
        assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
        assert len(list(ddp.glob("events.out.tfevents.*"))) == 1
        assert not list(ddp.glob("**/*.tmp*"))
