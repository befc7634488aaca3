"""Score a checkpoint (or the ESA baseline) on a split with the competition's metrics.

    python valid.py --checkpoint=results/demo-all-.../checkpoints/best.pt
    python valid.py --model=baseline --data_dir=/data/probav --band=NIR
    python valid.py --checkpoint=PATH --ensemble --save_png

Writes ``out_dir/per_scene.csv`` (``scene,band,cpsnr,cssim,norm,score``; scenes whose status map
has no clear pixel are listed with empty metrics and left out of every mean) and
``out_dir/summary.json``, and prints per-band means and the overall Kelvin score. For a model with an
uncertainty output (PIUnet) it also evaluates the predicted Laplace scale against the registered
error on the clear pixels (Spearman per scene, a calibration table by decile of predicted scale:
``summary.json["uncertainty"]``) and draws ``out_dir/reliability.png``. Without
``--data_dir`` the data directory recorded in the checkpoint is used. Options: ``config.py``.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from config import ConfigError, parse_command
from data import BANDS, DataError, build_dataset, norm_of, write_png
from engine.checkpoint import CheckpointError, load_for_eval
from engine.evaluate import describe_gain, evaluate, summarize, to_uint16
from models import spec_of
from utils.files import WriteError, atomic_path, atomic_write_text, sweep_temporaries
from utils.runtime import open_device
from utils.uncertainty import UncertaintyReport, format_table, reliability_plot

HEADER = ["scene", "band", "cpsnr", "cssim", "norm", "score"]


def write_csv(path: Path, records: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        for r in records:
            if r["skipped"]:
                w.writerow([r["scene"], r["band"], "", "", f"{r['norm']:.6f}", ""])
            else:
                w.writerow([r["scene"], r["band"], f"{r['cpsnr']:.6f}", f"{r['cssim']:.6f}", f"{r['norm']:.6f}",
                            f"{r['score']:.6f}"])


def main(argv: list[str] | None = None) -> dict:
    """Score as the command line (``sys.argv[1:]`` when None) says; returns the summary."""
    command = parse_command(argv)
    cfg, model, out, scale_warning = load_for_eval(command, command.config.split)
    if cfg.split == "test":
        raise ConfigError("the test split has no HR images to score; use predict.py")
    device = open_device(cfg.device)
    model = model.to(device)
    ds = build_dataset(cfg, cfg.split)
    for folder in (out, *(out / "sr" / band for band in BANDS)):
        sweep_temporaries(folder)  # what a run killed while writing left
    norm = norm_of(cfg.data_dir)

    uncertainty = UncertaintyReport() if spec_of(model).uncertainty else None

    def on_batch(batch: dict, result: dict) -> None:
        if uncertainty is not None:  # the predicted scale against the error the metric sees
            uncertainty.add_batch(batch["name"], batch["band"], result["sr"], result["log_scale"], batch["hr"],
                                  batch["hr_mask"])
        for i, (name, band) in enumerate(zip(batch["name"], batch["band"], strict=True)):
            if cfg.save_png:
                (out / "sr" / band).mkdir(parents=True, exist_ok=True)
                write_png(out / "sr" / band / f"{name}.png", to_uint16(result["sr"][i]))

    records = evaluate(model, ds, device, norm, cfg.amp, cfg.val_batch_size, cfg.ensemble, on_batch=on_batch)
    summary = summarize(records)
    write_csv(out / "per_scene.csv", records)
    extra = {}
    if uncertainty is not None:
        extra["uncertainty"] = {**uncertainty.to_dict(), "trained": not scale_warning}
        with atomic_path(out / "reliability.png") as tmp:
            reliability_plot(uncertainty, tmp)
    atomic_write_text(out / "summary.json", json.dumps({**summary, **extra}, indent=2) + "\n")
    what = f"checkpoint {cfg.checkpoint}" if spec_of(model).trainable else spec_of(model).title
    print(f"{what} on {cfg.data_dir} ({cfg.split}{', self-ensemble' if cfg.ensemble else ''}):")
    for band, s in summary.items():
        gain = f"  {describe_gain(s)}" if describe_gain(s) else ""
        print(f"  {band:>4}: cPSNR {s['cpsnr']:.4f} dB  cSSIM {s['cssim']:.5f}  score {s['score']:.5f}  "
              f"({s['n']} scenes){gain}")
    if summary["all"]["skipped"]:
        print(f"  skipped (no clear HR pixel): {', '.join(summary['all']['skipped'])}")
    print(f"Kelvin score: {summary['all']['score']:.5f} (lower is better; the ESA baseline scores 1)\n"
          f"per-scene results: {out / 'per_scene.csv'}")
    if uncertainty is not None:
        print(f"\n{format_table(extra['uncertainty'])}\nreliability plot: {out / 'reliability.png'}")
        if scale_warning:  # last, where the figures it qualifies are read
            print(scale_warning, file=sys.stderr)
    return summary


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError, CheckpointError, WriteError) as e:
        sys.exit(f"error: {e}")
