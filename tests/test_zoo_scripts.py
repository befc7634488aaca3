"""The zoo through the scripts: train, resume, validate, predict, released weights.

TR-MISR's own inference (../shared/fixtures/trmisr_pipeline.pt) must come out of valid.py unchanged;
bare state dicts in the authors' layouts load directly; weights that fit no layout are refused with
the file and the keys named, before anything is written.
"""
from __future__ import annotations

import csv
import math
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import predict
import train
import valid
from conftest import assert_same_state, common_args, shared_path
from engine.checkpoint import CheckpointError, load_checkpoint
from models import MODELS

# the registry's small networks of the zoo models (ModelSpec.smoke_args)
TINY = {name: MODELS[name].smoke_args for name in ("highresnet", "misrgru", "trmisr", "wdsr3d")}
NAMES = sorted(TINY)


def _tiny(name: str) -> list[str]:
    """The authors' preset with a tiny network on both bands; min_clear and min_frame_clearance 0:
    synthetic patches and frames are rarely 85% clear."""
    import json
    return [f"--preset={name}", f"--model_args={json.dumps(TINY[name])}", "--min_clear=0", "--min_frame_clearance=0",
            "--band=all"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()  # small tensors: OpenMP synchronisation would cost more than it saves
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("name", NAMES)
def test_train_validate_and_submit(synthetic_root, tmp_path, name, capsys):
    run = train.main(common_args(synthetic_root, tmp_path) + _tiny(name) + [f"--out_dir={tmp_path / 'r'}",
                                                                      "--max_steps=2"])
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["model_name"] == name and ckpt["step"] == 2 and ckpt["model_kwargs"].items() >= TINY[name].items()
    summary = valid.main([f"--checkpoint={run / 'checkpoints' / 'last.pt'}", f"--out_dir={tmp_path / 'v'}"])
    assert summary["all"]["n"] == 4 and math.isfinite(summary["all"]["score"])
    zpath = predict.main([f"--checkpoint={run / 'checkpoints' / 'last.pt'}", f"--out_dir={tmp_path / 'p'}"])
    with zipfile.ZipFile(zpath) as z:
        assert len(z.namelist()) == 4
    if name == "trmisr":  # its output step: minus the minimum, at most 14 bits
        from data import read_png
        valid.main([f"--checkpoint={run / 'checkpoints' / 'last.pt'}", f"--out_dir={tmp_path / 'w'}", "--save_png"])
        img = read_png(next((tmp_path / "w" / "sr" / "NIR").glob("*.png")), "image")
        assert img.min() == 0 and img.max() <= 16383


def test_plateau_schedule_and_padding_resume_exactly(synthetic_root, tmp_path):
    # HighRes-net's recipe: weighted views padded with zeros, ReduceLROnPlateau on each validation
    args = common_args(synthetic_root, tmp_path) + _tiny("highresnet") + ["--lr_patience=0", "--lr_gamma=0.5"]
    full = train.main(args + [f"--out_dir={tmp_path / 'full'}", "--max_steps=8"])
    part = tmp_path / "part"
    train.main(args + [f"--out_dir={part}", "--max_steps=4"])
    train.main(args + [f"--out_dir={part}", "--resume", "--max_steps=8"])
    assert_same_state(full / "checkpoints" / "last.pt", part / "checkpoints" / "last.pt")
    a, b = load_checkpoint(full / "checkpoints" / "last.pt"), load_checkpoint(part / "checkpoints" / "last.pt")
    assert a["scheduler"] == b["scheduler"] and a["scheduler"]["patience"] == 0
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]


def test_trmisr_transformer_trains_at_half_rate(synthetic_root, tmp_path):
    run = train.main(common_args(synthetic_root, tmp_path) + _tiny("trmisr") + [f"--out_dir={tmp_path / 'r'}",
                                                                          "--max_steps=1", "--lr=1e-3"])
    groups = load_checkpoint(run / "checkpoints" / "last.pt")["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == [1e-3, 5e-4]


def _fixture_root(tmp_path: Path, cases: list[dict]) -> Path:
    """A root with only the fixture's val scenes (links) and norm.csv."""
    src, root = shared_path("probav"), tmp_path / "root"
    for case in cases:
        (root / "val" / case["band"]).mkdir(parents=True, exist_ok=True)
        os.symlink(src / "val" / case["band"] / case["scene"], root / "val" / case["band"] / case["scene"])
    os.symlink(src / "norm.csv", root / "norm.csv")
    return root


def test_trmisr_pipeline_fixture_through_valid(tmp_path, monkeypatch):
    """TR-MISR's val.py on two real scenes (19 and 22 frames: zero views up to 24; non-zero shifts),
    with random weights: our valid.py gives its SR and cPSNR."""
    fixture = torch.load(shared_path("fixtures", "trmisr_pipeline.pt"), weights_only=True)
    root = _fixture_root(tmp_path, fixture["cases"])
    weights = tmp_path / "TRNet.pth"
    torch.save(fixture["state_dict"], weights)  # a bare state dict, as the authors save theirs
    srs, real = [], valid.to_uint16

    def keep(sr: torch.Tensor) -> np.ndarray:  # the float SR that valid.py writes as a PNG
        srs.append(sr.clone())
        return real(sr)

    monkeypatch.setattr(valid, "to_uint16", keep)
    valid.main(["--model=trmisr", f"--checkpoint={weights}", f"--data_dir={root}", "--device=cpu", "--save_png",
                f"--cache_dir={tmp_path / 'cache'}", f"--out_dir={tmp_path / 'v'}"])
    rows = {r["scene"]: r for r in csv.DictReader(open(tmp_path / "v" / "per_scene.csv"))}
    for i, case in enumerate(fixture["cases"]):  # NIR first, then RED: the order of the dataset
        assert float(rows[case["scene"]]["cpsnr"]) == pytest.approx(case["cpsnr"], abs=1e-4), case["scene"]
        assert (srs[i][0] - case["sr"]).abs().max().item() < 1e-5, case["scene"]


def test_bare_state_dicts_load_directly(synthetic_root, tmp_path):
    import json

    from models import build_model
    nets = {name: build_model(name, **TINY[name]) for name in NAMES}
    paths = {}
    for name, net in nets.items():
        paths[name] = tmp_path / f"{name}.pth"
        torch.save(net.state_dict(), paths[name])
    # MISR-GRU's released layout (encode.unit1.*) and one checkpoint per band
    state = {("encode." + k if k.startswith(("unit1.", "unit2.")) else k): v
             for k, v in nets["misrgru"].state_dict().items()}
    torch.save(state, tmp_path / "released.pth")
    common = [f"--data_dir={synthetic_root}", f"--cache_dir={tmp_path / 'cache'}", "--device=cpu"]
    summary = valid.main(["--model=trmisr", f"--checkpoint={paths['trmisr']}", "--band=NIR",
                          f"--model_args={json.dumps(TINY['trmisr'])}", f"--out_dir={tmp_path / 'v'}"] + common)
    assert summary["all"]["n"] == 2 and set(summary) == {"NIR", "all"}
    zpath = predict.main(["--model=misrgru", f"--checkpoint_nir={tmp_path / 'released.pth'}",
                          f"--checkpoint_red={paths['misrgru']}", f"--model_args={json.dumps(TINY['misrgru'])}",
                          f"--out_dir={tmp_path / 'p'}"] + common)
    with zipfile.ZipFile(zpath) as z:
        assert len(z.namelist()) == 4


def test_the_released_misrgru_weights_load(tmp_path):
    from engine.checkpoint import model_from_checkpoint
    path = shared_path("weights", "misrgru", "MISR-GRU.pth")
    model, ckpt = model_from_checkpoint(path, "misrgru")
    assert ckpt["config"] is None and sum(p.numel() for p in model.parameters()) == 923_468


def test_weights_that_fit_no_layout_are_refused_and_nothing_is_written(synthetic_root, tmp_path):
    from models import build_model
    torch.save(build_model("trmisr").state_dict(), tmp_path / "TRNet.pth")
    common = [f"--data_dir={synthetic_root}", f"--cache_dir={tmp_path / 'cache'}", "--device=cpu",
              f"--out_dir={tmp_path / 'out'}"]
    # a --model that is not the file's: the keys named, and the model they fit
    with pytest.raises(CheckpointError, match=r"TRNet\.pth: the weights do not fit highresnet.*missing key.*"
                                              r"fuse\.fuse\.0.*unexpected key.*superres\..*use --model=trmisr"):
        valid.main(["--model=highresnet", f"--checkpoint={tmp_path / 'TRNet.pth'}"] + common)
    # a state dict of nothing we know
    torch.save({"conv.weight": torch.zeros(3, 3), "encode.unit9.bias": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"other\.pth: the weights do not fit misrgru.*first: unit1\.init_layer"
                                              r".*unexpected key\(s\), first: conv\.weight, encode\.unit9\.bias"):
        predict.main(["--model=misrgru", f"--checkpoint_nir={tmp_path / 'other.pth'}",
                      f"--checkpoint_red={tmp_path / 'other.pth'}"] + common)
    # the right model with other hyper-parameters: the misshapen keys named
    with pytest.raises(CheckpointError, match=r"of another shape, first: encode\.init_layer\.0\.weight \(64, 2, 3, 3\) "
                                              r"\(expected \(8, 2, 3, 3\)\)"):
        valid.main(["--model=trmisr", f"--checkpoint={tmp_path / 'TRNet.pth'}",
                    '--model_args={"n_feats": 8, "n_heads": 2}'] + common)
    # no --model at all: which one it looks like
    with pytest.raises(CheckpointError, match=r"a bare state dict \(its keys are a trmisr's\)"):
        valid.main([f"--checkpoint={tmp_path / 'TRNet.pth'}"] + common)
    # one of our checkpoints with another --model
    from config import parse_args
    from engine.checkpoint import save_checkpoint
    save_checkpoint(tmp_path / "ours.pt", model=build_model("highresnet", **TINY["highresnet"]),
                    config=parse_args(["--preset=highresnet"]).to_dict())
    with pytest.raises(CheckpointError, match=r"ours\.pt: holds a highresnet, not a trmisr"):
        valid.main(["--model=trmisr", f"--checkpoint={tmp_path / 'ours.pt'}"] + common)
    assert not (tmp_path / "out").exists()


def _fixture_scenes(tmp: Path, cases: list[dict]) -> Path:
    """A root holding the reference's scenes (one per band) as val and as test scenes, and norm.csv."""
    src, root = shared_path("probav"), tmp / "root"
    for case in cases:
        for split in ("val", "test"):
            (root / split / case["band"]).mkdir(parents=True, exist_ok=True)
            os.symlink(src / "val" / case["band"] / case["scene"], root / split / case["band"] / case["scene"])
    os.symlink(src / "norm.csv", root / "norm.csv")
    return root


def test_wdsr3d_released_weights_give_the_authors_sr(tmp_path):
    """3DWDSRNet's released TensorFlow checkpoints (as released: the folder, or a ckpt-N.index) through
    valid.py and predict.py give the author's SR (../shared/fixtures/wdsr3d_reference.pt: their code
    run unchanged) to the last DN and its cPSNR."""
    from data import read_png
    from utils.metrics import cpsnr
    ref = torch.load(shared_path("fixtures", "wdsr3d_reference.pt"), weights_only=True)
    cases = [next(c for c in ref["cases"] if c["band"] == band) for band in ("NIR", "RED")]
    root = _fixture_scenes(tmp_path, cases)
    folders = {b: shared_path("weights", "wdsr3d", f"wdsr-32-8-6-7-{b.lower()}-all") for b in ("NIR", "RED")}
    index = next(folders["RED"].glob("ckpt-*.index"))
    common = [f"--data_dir={root}", f"--cache_dir={tmp_path / 'cache'}", "--model=wdsr3d", "--device=cpu"]
    for case, ckpt in zip(cases, (folders["NIR"], index), strict=True):
        out = tmp_path / f"v-{case['band']}"
        valid.main(common + [f"--checkpoint={ckpt}", f"--band={case['band']}", f"--out_dir={out}", "--save_png"])
        ours = read_png(out / "sr" / case["band"] / f"{case['scene']}.png", "image").astype(np.int64)
        author = case["sr"].numpy().astype(np.int64)
        # float32 rounding before the final rounding: a few pixels that sit on .5 DN round the other way
        assert np.abs(ours - author).max() <= 1 and (ours != author).mean() < 1e-3
        hr = torch.from_numpy(read_png(root / "val" / case["band"] / case["scene"] / "HR.png", "image") / 65535.0)
        sm = torch.from_numpy(read_png(root / "val" / case["band"] / case["scene"] / "SM.png", "mask"))
        expected = float(cpsnr(torch.from_numpy(author / 65535.0)[None], hr[None], sm[None]))
        with open(out / "per_scene.csv") as f:
            row = next(csv.DictReader(f))
        assert abs(float(row["cpsnr"]) - expected) < 1e-3
    zpath = predict.main(common + [f"--checkpoint_nir={folders['NIR']}", f"--checkpoint_red={folders['RED']}",
                                   f"--out_dir={tmp_path / 'p'}"])
    with zipfile.ZipFile(zpath) as z:
        for case in cases:
            with z.open(f"{case['scene']}.png") as f:
                from PIL import Image
                img = np.array(Image.open(f)).astype(np.int64)
            assert np.abs(img - case["sr"].numpy().astype(np.int64)).max() <= 1


def test_wdsr3d_checkpoint_folder_needs_its_model_and_damage_is_named(tmp_path):
    folder = shared_path("weights", "wdsr3d", "wdsr-32-8-6-7-nir-all")
    args = [f"--data_dir={shared_path('probav')}", f"--out_dir={tmp_path / 'v'}", "--device=cpu"]
    with pytest.raises(CheckpointError, match="--model=wdsr3d"):
        valid.main(args + [f"--checkpoint={folder}"])
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in folder.iterdir():
        data = f.read_bytes()
        if ".data-00001" in f.name:
            data = data[:1000] + bytes([data[1000] ^ 0xFF]) + data[1001:]
        (broken / f.name).write_bytes(data)
    with pytest.raises(CheckpointError, match=f"{broken}.*cannot read wdsr3d"):
        valid.main(args + [f"--checkpoint={broken}", "--model=wdsr3d"])
    assert not (tmp_path / "v").exists()
