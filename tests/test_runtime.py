"""Mixed precision and torch.compile paths of train.py, and the runtime helpers, on CPU."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

import train
from conftest import TINY_QANET, common_args
from engine.checkpoint import load_checkpoint
from engine.trainer import SuperResolveForward
from utils.runtime import atomic_torch_save, autocast, make_scaler


def test_autocast_and_scaler_choices():
    cpu = torch.device("cpu")
    assert isinstance(autocast(cpu, "off"), contextlib.nullcontext)
    with autocast(cpu, "bf16"):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        autocast(cpu, "fp16")
    assert not make_scaler(cpu, "bf16").is_enabled()


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_torch_save({"a": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        atomic_torch_save({"a": Unpicklable()}, path)
    assert torch.load(path) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_bf16_training_runs_on_cpu(synthetic_root, tmp_path):
    run = train.main(common_args(synthetic_root, tmp_path) + TINY_QANET + [f"--out_dir={tmp_path / 'r'}",
                                                                        "--max_steps=2", "--amp=bf16"])
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_compiled_model_matches_eager_and_trains(synthetic_root, tmp_path):
    # the compiled forward and backward equal the eager ones (Adam steps are not compared: a
    # gradient that is zero analytically, like the key bias of attention, is rounding noise whose
    # sign Adam's first step turns into +-lr)
    from models import build_model
    from utils.losses import compute_loss
    torch.manual_seed(0)
    net = build_model("qanet", n_modules=1, n_resblocks=1, n_feats=8, reduction=4)
    eager, compiled = SuperResolveForward(net), torch.compile(SuperResolveForward(net))
    lr, qm = torch.rand(2, 9, 16, 16), (torch.rand(2, 9, 16, 16) > 0.2).float()
    hr, hm = torch.rand(2, 1, 48, 48), torch.ones(2, 1, 48, 48)
    grads = []
    for model in (eager, compiled):
        net.zero_grad()
        out = model(lr, qm)
        compute_loss("cpsnr", out, hr, hm).backward()
        grads.append((out["sr"].detach(), {k: p.grad.clone() for k, p in net.named_parameters()}))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-4, atol=1e-5)
    for k, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][k], g, rtol=1e-3, atol=1e-5, msg=k)
    run = train.main(common_args(synthetic_root, tmp_path) + TINY_QANET + [f"--out_dir={tmp_path / 'c'}",
                                                                        "--max_steps=1", "--compile"])
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 1


_RSS_PROBE = """
import os, sys, torch
sys.path.insert(0, {root!r})
from utils.runtime import release_freed_memory, reuse_freed_memory
took = reuse_freed_memory() if {reuse} else None
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
before = rss()
x = torch.ones(64, 2**20)  # 256 MiB, touched
del x
kept = rss() - before
release_freed_memory()
print(took, kept, rss() - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc to read the resident memory")
def test_freed_memory_is_kept_for_reuse_until_released():
    import subprocess
    import sys
    root = str(Path(__file__).resolve().parents[1])

    def kept_mib(reuse: bool) -> tuple[str, float, float]:
        out = subprocess.run([sys.executable, "-c", _RSS_PROBE.format(root=root, reuse=reuse)], check=True,
                             capture_output=True, text=True).stdout.split()
        return out[0], float(out[1]), float(out[2])

    took, kept, released = kept_mib(True)
    if took != "True":
        pytest.skip("this C library has no glibc mallopt")
    _, kept_default, _ = kept_mib(False)
    assert kept > 200, f"with reuse_freed_memory() a freed 256 MiB block should stay resident; {kept:.0f} MiB did"
    assert released < 50, f"release_freed_memory() should return the kept block; {released:.0f} MiB stayed"
    assert kept_default < 50, f"glibc's default should return the block to the OS; {kept_default:.0f} MiB stayed"
