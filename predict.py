"""Super-resolve the test scenes and write a Kelvin submission zip.

    python predict.py --checkpoint=results/run/checkpoints/best.pt         # one model, both bands
    python predict.py --checkpoint_nir=nir/best.pt --checkpoint_red=red/best.pt --data_dir=/data/probav
    python predict.py --model=baseline --data_dir=/data/probav

Writes ``out_dir/submission.zip``: one ``imgsetNNNN.png`` (16-bit, 3x the LR size) per test scene,
then reads the zip back and checks every entry. The competition expects 290 images; a different
count is reported. An existing zip is kept unless ``--force``. ``--export_uncertainty`` also writes
PIUnet's per-pixel Laplace scale (``exp(log_scale)``, [0,1] units) as ``uncertainty/NAME.npy``.
"""
from __future__ import annotations

import io
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from config import CommandLine, ConfigError, parse_command
from data import BANDS, DataError, build_dataset
from engine.checkpoint import CheckpointError, EvalSetup, load_for_eval
from engine.evaluate import iterate, to_uint16
from models import spec_of
from utils.files import WriteError, atomic_path, sweep_temporaries
from utils.runtime import open_device

EXPECTED_SCENES = 290  # test scenes of the Kelvin competition (NIR and RED)


def verify_zip(path: Path, expected: dict[str, tuple[int, int]]) -> None:
    """Read every entry back: the names are exactly ``expected``'s, each a 16-bit PNG of its shape."""
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        if sorted(names) != sorted(f"{n}.png" for n in expected):
            missing = sorted(set(f"{n}.png" for n in expected) - set(names))
            extra = sorted(set(names) - set(f"{n}.png" for n in expected))
            raise RuntimeError(f"{path}: entries differ from the scenes (missing {missing[:5]}, extra {extra[:5]})")
        for name in names:
            with Image.open(io.BytesIO(z.read(name))) as im:
                arr = np.asarray(im)
            shape = expected[name[:-4]]
            if arr.dtype != np.uint16 or arr.shape != shape:
                raise RuntimeError(f"{path}:{name} is {arr.dtype} {arr.shape}, expected uint16 {shape}")


def band_setups(command: CommandLine) -> dict[str, EvalSetup]:
    """``{band: (config, model, output folder, untrained-scale warning)}``: one shared checkpoint (or a model without
    weights), or one checkpoint per band (``--checkpoint_nir`` / ``--checkpoint_red``)."""
    cfg = command.config
    per_band = {"NIR": cfg.checkpoint_nir, "RED": cfg.checkpoint_red}
    untrained = "model" in command.explicit and not spec_of(cfg.model).trainable
    setups = {}
    for band in BANDS:
        if per_band[band]:
            setups[band] = load_for_eval(command, "predict", checkpoint=per_band[band])
        elif cfg.checkpoint or untrained:
            setups[band] = load_for_eval(command, "predict")
    if not setups:
        raise ConfigError("say what to run: --checkpoint=PATH, --checkpoint_nir=PATH/--checkpoint_red=PATH, "
                          "or a model without weights (e.g. the ESA baseline: --model=NAME)")
    return setups


def write_zip(target: Path, setups: dict, bands: list[str], out: Path) -> dict[str, tuple[int, int]]:
    """Super-resolve the test scenes of ``bands`` into ``target`` (written whole or not at all) and
    check every entry; returns ``{scene: image shape}``."""
    expected: dict[str, tuple[int, int]] = {}
    with atomic_path(target) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:  # PNGs are compressed already
            for band in bands:
                cfg, model, _, scale_warning = setups[band]
                if cfg.export_uncertainty and scale_warning:
                    print(f"{band}: {scale_warning}", file=sys.stderr)
                device = open_device(cfg.device)
                model = model.to(device)
                ds = build_dataset(cfg, "test", band)
                for batch, result in iterate(model, ds, device, cfg.amp, cfg.val_batch_size, cfg.ensemble,
                                             desc=f"predicting {band}"):
                    for i, name in enumerate(batch["name"]):
                        img = to_uint16(result["sr"][i])
                        buf = io.BytesIO()
                        Image.fromarray(img).save(buf, format="PNG")
                        z.writestr(f"{name}.png", buf.getvalue())
                        expected[name] = img.shape
                        if cfg.export_uncertainty and "log_scale" in result:
                            with atomic_path(out / "uncertainty" / f"{name}.npy") as npy:
                                np.save(npy, np.exp(result["log_scale"][i, 0].float().cpu().numpy()))
        verify_zip(tmp, expected)
    return expected


def main(argv: list[str] | None = None) -> Path:
    """Write the submission as the command line (``sys.argv[1:]`` when None) says; returns the zip."""
    setups = band_setups(parse_command(argv))
    wanted = {b for cfg, *_ in setups.values() for b in (BANDS if cfg.band == "all" else (cfg.band,))}
    bands = [b for b in BANDS if b in setups and b in wanted]
    if not bands:
        raise ConfigError("no band left to predict: check --band against the checkpoints given")
    out = next(iter(setups.values()))[2]
    target = out / "submission.zip"
    for folder in (out, out / "uncertainty"):
        sweep_temporaries(folder)  # what a run killed while writing left
    force = any(cfg.force for cfg, *_ in setups.values())
    if target.exists() and not force:
        raise ConfigError(f"{target} exists; pass --force to replace it (or choose another --out_dir)")
    expected = write_zip(target, setups, bands, out)
    print(f"wrote {target}: {len(expected)} scenes ({', '.join(bands)}), every entry read back and checked")
    if len(expected) != EXPECTED_SCENES:
        print(f"note: the Kelvin competition expects {EXPECTED_SCENES} test images; this test split has "
              f"{len(expected)}, so the zip is not a complete submission")
    return target


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError, CheckpointError, WriteError) as e:
        sys.exit(f"error: {e}")
