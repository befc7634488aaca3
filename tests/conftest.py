"""Shared fixtures: the reference data in ../shared and tiny synthetic datasets made per session."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))


# what in a test's source runs a training loop: those tests are marked ``slow`` (``-m "not slow"`` skips them)
TRAINING_LOOPS = ("train.main(", "train_step(", "_train(", '"train.py"', "torch.distributed.run", '"gpu-check"')


def pytest_collection_modifyitems(config, items):
    """Mark every test whose function runs a training loop as ``slow`` (its source names one)."""
    import inspect

    def source(fn) -> str:
        try:
            return inspect.getsource(fn)
        except (OSError, TypeError):
            return ""

    for item in items:
        # the test itself and the fixtures it uses (a fixture may train the run a test reads)
        fixtures = getattr(item, "_fixtureinfo", None)
        defs = [d for ds in (fixtures.name2fixturedefs.values() if fixtures else ()) for d in ds]
        sources = [source(getattr(item, "function", None))] + [source(d.func) for d in defs]
        if any(s in text for text in sources for s in TRAINING_LOOPS):
            item.add_marker(pytest.mark.slow)


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test (with the reason) when it is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"reference data {p} is absent (the ../shared folder is not beside the project)")
    return p


@pytest.fixture(scope="session")
def probav_root() -> Path:
    return shared_path("probav")


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic dataset: 3 train, 2 val, 2 test scenes per band."""
    from data.synthetic import generate
    return generate(tmp_path_factory.mktemp("syn") / "root", n_train=3, n_val=2, n_test=2, seed=1)


# --- what the script tests share: tiny networks, a run's arguments, comparing two runs ---------------

TINY_QANET = ["--model=qanet", '--model_args={"n_modules": 1, "n_resblocks": 1, "n_feats": 8, "reduction": 4}',
              "--loss=cpsnr"]
TINY_PIUNET = ["--model=piunet", '--model_args={"n_feats": 8, "n_tefa": 1, "r_bneck": 4}',
               "--loss=l1u_reg", "--warmup_loss=l1_reg", "--warmup_epochs=1", "--train_selection=clearest",
               "--val_selection=clearest"]


def common_args(root: Path, tmp: Path) -> list[str]:
    """A short CPU run on ``root`` with its cache under ``tmp``: batch 2, 16x16 patches, 4 epochs."""
    return [f"--data_dir={root}", f"--cache_dir={tmp / 'cache'}", "--device=cpu", "--batch_size=2",
            "--patch_size=16", "--num_workers=0", "--val_scenes=1", "--n_images=1", "--val_every=1",
            "--epochs=4", "--lr=1e-3", "--lr_milestones=1", "--lr_gamma=0.5",
            "--patches=random"]  # one crop per scene, as these tests count steps (windows: test_presets.py)


def weights(path: Path) -> dict:
    from engine.checkpoint import load_checkpoint
    return load_checkpoint(path)["model"]


def assert_same_state(a: Path, b: Path) -> None:
    """Two checkpoints hold the same progress, weights, Adam moments and schedule."""
    from engine.checkpoint import load_checkpoint
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert (ca["epoch"], ca["step"], ca["step_in_epoch"]) == (cb["epoch"], cb["step"], cb["step_in_epoch"])
    for k, v in ca["model"].items():
        torch.testing.assert_close(v, cb["model"][k], rtol=0, atol=1e-6, msg=k)
    pairs = zip(ca["optimizer"]["state"].items(), cb["optimizer"]["state"].items(), strict=True)
    for (ka, va), (kb, vb) in pairs:
        assert ka == kb
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(va[name], vb[name], rtol=0, atol=1e-6)
    assert ca["scheduler"]["last_epoch"] == cb["scheduler"]["last_epoch"]
