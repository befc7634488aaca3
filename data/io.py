"""Reading and writing scenes in the ESA Kelvin PROBA-V layout.

A dataset root looks like::

    root/norm.csv                          # "imgsetNNNN <baseline cPSNR>" per line
    root/{train,val,test}/{NIR,RED}/imgsetNNNN/
        LR000.png ... LRnnn.png            # 128x128, 16-bit
        QM000.png ... QMnnn.png            # 128x128, 1-bit, 1 = clear
        HR.png, SM.png                     # 384x384, 16-bit / 1-bit (test scenes: SM.png only)

``val/`` is optional: without it the validation split is carved from ``train/``
(see :mod:`data.dataset`). Every error names the file at fault.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from utils.files import atomic_path

__all__ = ["DataError", "DatasetNotFoundError", "read_scene", "read_png", "write_png", "read_norm", "norm_of",
           "list_scenes", "BANDS", "LR_SIZE", "HR_SIZE", "SCALE"]

BANDS = ("NIR", "RED")
LR_SIZE, HR_SIZE, SCALE = 128, 384, 3

_GET_DATA = (
    "The PROBA-V Kelvin dataset is published by ESA (https://kelvins.esa.int/proba-v-super-resolution/, "
    "archived at https://zenodo.org/records/6327426): unpack it so that the folder holds train/, test/ "
    "and norm.csv, and pass it as --data_dir. To try the code without it, generate synthetic scenes "
    "in the same layout: python -m data.synthetic --out=datasets/synthetic  (or run python train.py "
    "--preset=demo, which does this for you)."
)


class DataError(ValueError):
    """A file or folder of the dataset is missing or malformed; the message names it."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """The dataset root (or a split in it) does not exist; the message says how to get it."""


def read_png(path: str | os.PathLike, kind: str) -> np.ndarray:
    """Read one PNG of the dataset and check its type.

    Args:
        path: the file.
        kind: ``"image"`` for LR/HR (must be 16-bit, returns ``np.uint16``) or ``"mask"`` for
            QM/SM (1-bit or 8-bit, returns ``np.bool_``, True = clear).
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            mode = im.mode
            arr = np.asarray(im)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as e:  # PIL raises many types for truncated or non-image files
        raise DataError(f"{path}: not a readable PNG ({e})") from None
    if arr.ndim != 2:
        raise DataError(f"{path}: expected a single-channel image, got mode {mode} with shape {arr.shape}")
    if kind == "image":
        if mode not in ("I;16", "I;16B", "I;16L") and arr.dtype != np.uint16:
            raise DataError(f"{path}: expected a 16-bit greyscale PNG, got mode {mode} ({arr.dtype})")
        return arr.astype(np.uint16, copy=False)
    if kind == "mask":
        if arr.dtype == np.bool_:
            return arr.copy()
        if mode in ("L", "P") or arr.dtype == np.uint8:
            return arr > 0
        raise DataError(f"{path}: expected a 1-bit or 8-bit mask PNG, got mode {mode} ({arr.dtype})")
    raise ValueError(f"kind must be 'image' or 'mask', got {kind!r}")


def write_png(path: str | os.PathLike, arr: np.ndarray) -> None:
    """Write ``np.uint16 (H,W)`` as a 16-bit PNG or ``np.bool_ (H,W)`` as a 1-bit PNG, whole or not at
    all (:func:`utils.files.atomic_path`; a full disk raises :class:`utils.files.WriteError`)."""
    arr = np.ascontiguousarray(arr)
    if arr.dtype not in (np.bool_, np.uint16):
        raise TypeError(f"write_png: uint16 or bool expected, got {arr.dtype}")
    with atomic_path(path) as tmp:
        # PIL maps bool arrays to mode "1" and uint16 arrays to mode "I;16"
        Image.fromarray(arr).save(tmp, format="PNG")


_FRAME = re.compile(r"^LR(\d+)\.png$")


def read_scene(path: str | os.PathLike) -> dict:
    """Read one scene folder ``.../{NIR,RED}/imgsetNNNN``.

    Returns:
        dict with exactly the keys ``name`` (``"imgsetNNNN"``), ``band`` (``"NIR"``/``"RED"``,
        from the parent folder), ``lr`` (``np.uint16 (T,128,128)``, frames sorted by index),
        ``qm`` (``np.bool_ (T,128,128)``, True = clear), ``hr`` (``np.uint16 (384,384)`` or None
        for test scenes) and ``sm`` (``np.bool_ (384,384)`` or None where absent).

    Raises:
        DataError: missing folder, no LR frame, a QM missing for an LR, a non-16-bit image or a
            wrong shape; the message names the file.
    """
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: scene folder not found")
    band = path.parent.name
    if band not in BANDS:
        raise DataError(f"{path}: the parent folder must be NIR or RED to give the band, got {band!r}")
    frames = sorted((int(m.group(1)), f) for f in os.listdir(path) if (m := _FRAME.match(f)))
    if not frames:
        raise DataError(f"{path}: no LR frame (LR000.png, LR001.png, ...) in this scene")
    lrs, qms = [], []
    for _, fname in frames:
        lr_path = path / fname
        qm_path = path / f"QM{fname[2:]}"
        if not qm_path.exists():
            raise DataError(f"{qm_path}: quality map missing for {lr_path.name}")
        lr = read_png(lr_path, "image")
        qm = read_png(qm_path, "mask")
        for arr, p in ((lr, lr_path), (qm, qm_path)):
            if arr.shape != (LR_SIZE, LR_SIZE):
                raise DataError(f"{p}: expected shape ({LR_SIZE}, {LR_SIZE}), got {arr.shape}")
        lrs.append(lr)
        qms.append(qm)
    hr = sm = None
    if (path / "HR.png").exists():
        hr = read_png(path / "HR.png", "image")
        if hr.shape != (HR_SIZE, HR_SIZE):
            raise DataError(f"{path / 'HR.png'}: expected shape ({HR_SIZE}, {HR_SIZE}), got {hr.shape}")
    if (path / "SM.png").exists():
        sm = read_png(path / "SM.png", "mask")
        if sm.shape != (HR_SIZE, HR_SIZE):
            raise DataError(f"{path / 'SM.png'}: expected shape ({HR_SIZE}, {HR_SIZE}), got {sm.shape}")
    if hr is not None and sm is None:
        raise DataError(f"{path / 'SM.png'}: status map missing for HR.png")
    return {"name": path.name, "band": band, "lr": np.stack(lrs), "qm": np.stack(qms), "hr": hr, "sm": sm}


def read_norm(path: str | os.PathLike) -> dict[str, float]:
    """Read ``norm.csv`` (``imgsetNNNN value`` per line) into ``{name: baseline cPSNR in dB}``."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: norm.csv not found (the baseline cPSNR of each scene is needed for "
                        f"the Kelvin score)")
    out = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.replace(",", " ").split()
        if not parts:
            continue
        try:
            out[parts[0]] = float(parts[1])
        except (IndexError, ValueError):
            raise DataError(f"{path}:{i}: expected 'imgsetNNNN value', got {line!r}") from None
    return out


def norm_of(root: str | os.PathLike) -> dict[str, float]:
    """The baseline cPSNR of each scene of a dataset root, from its ``norm.csv``; empty when the root
    has none (then scores are cPSNR only: no Kelvin score). The scripts' one reader of norm.csv."""
    path = Path(root) / "norm.csv"
    return read_norm(path) if path.exists() else {}


def list_scenes(root: str | os.PathLike, split: str, band: str) -> list[Path]:
    """Scene folders of ``root/split/band`` sorted by name (``imgset*`` only)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(f"dataset root {root} does not exist. {_GET_DATA}")
    d = root / split / band
    if not d.is_dir():
        raise DatasetNotFoundError(f"{d}: split folder not found under dataset root {root}. {_GET_DATA}")
    scenes = sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith("imgset"))
    if not scenes:
        raise DataError(f"{d}: empty split, no imgsetNNNN scene folder in it")
    return scenes
