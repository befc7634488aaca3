"""A torch ``Dataset`` over a PROBA-V root: the splits, and :class:`ProbaVDataset` with its options.

Samples are dicts (float32, values in [0, 1]):

- ``lr`` ``(T,h,w)``: the selected frames, uint16 / 65535;
- ``lr_mask`` ``(T,h,w)``: their quality maps, 1 = clear;
- ``alphas`` ``(T,)``: 1 for a real frame, 0 for a padding frame (zeros, mask 0; only with
  ``padding="zeros"`` or a ``views`` recipe, and always after the real frames);
- ``hr`` ``(1,H,W)`` and ``hr_mask`` ``(1,H,W)``: target and status map (``hr`` absent for test
  scenes, ``hr_mask`` absent where the scene has no SM.png);
- ``name`` (``"imgsetNNNN"``), ``band`` (``"NIR"``/``"RED"``), ``index`` (scene index, int).

The parts live in their own modules, each a table where there is a choice: the disk caches
(:mod:`data.cache`), frame selection, order and padding (:mod:`data.selection`), where patches are
cut (:mod:`data.patches`), and the sample transforms (:mod:`data.transforms`). This module wires
them together for one split of one root; a second dataset reuses them the same way.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from utils.files import sweep_temporaries

from .cache import load_scene_cached, load_views_cached
from .io import BANDS, DataError, DatasetNotFoundError, list_scenes
from .patches import PATCHES, crop, random_corner
from .selection import FRAME_ORDERS, PADDINGS, SELECTIONS, select_frames
from .transforms import augment_sample, fill_clouds
from .views import RECIPES, assemble_views

__all__ = ["ProbaVDataset", "DatasetOptions", "split_scenes", "SPLITS", "VAL_FRACTION", "VAL_SEED"]

SPLITS = ("train", "holdout", "val", "test")
VAL_FRACTION = 0.1  # share of train/ scenes held out per band when the root has no val/
VAL_SEED = 0  # the carve is a seeded permutation of the sorted scene names: the same on every machine


def _carve(scenes: list[Path], fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """``(rest, carved)``: ``ceil(fraction*n)`` scenes picked by a permutation seeded with ``seed``."""
    n = math.ceil(fraction * len(scenes))
    picked = set(np.random.default_rng(seed).permutation(len(scenes))[:n].tolist())
    return ([s for i, s in enumerate(scenes) if i not in picked], [s for i, s in enumerate(scenes) if i in picked])


def split_scenes(root: str | os.PathLike, split: str, band: str, val_fraction: float = VAL_FRACTION,
                 seed: int = VAL_SEED, holdout_fraction: float = 0.0) -> list[Path]:
    """Scene folders of one split and band.

    ``train``/``val`` use ``root/val`` when it exists. Without it, ``val`` is ``ceil(val_fraction*n)``
    scenes of ``root/train/band`` picked by a permutation seeded with ``seed`` and ``train`` is the
    rest, so the two never overlap. With ``holdout_fraction > 0``, ``holdout`` (for choosing
    checkpoints) is ``ceil(holdout_fraction*n)`` of those training scenes, picked by a permutation
    seeded with ``seed + 1``, and ``train`` is what remains.
    """
    root = Path(root)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    if band not in BANDS:
        raise ValueError(f"band must be one of {', '.join(BANDS)}; got {band!r}")
    if split == "holdout" and holdout_fraction <= 0:
        raise ValueError("the holdout split needs holdout_fraction > 0")
    if split == "test" or (split == "val" and (root / "val").is_dir()):
        return list_scenes(root, split, band)
    pool = list_scenes(root, "train", band)
    if not (root / "val").is_dir():
        pool, val = _carve(pool, val_fraction, seed)
        if split == "val":
            picked, how = val, f"val_fraction={val_fraction}"
    if split != "val":
        pool, holdout = _carve(pool, holdout_fraction, seed + 1) if holdout_fraction > 0 else (pool, [])
        picked, how = (holdout, f"holdout_fraction={holdout_fraction}") if split == "holdout" else (pool, "the carves")
    if not picked:
        raise DataError(f"{root / 'train' / band}: the {split} split left by {how} is empty "
                        f"({len(list_scenes(root, 'train', band))} scenes in train/)")
    return picked


@dataclass(frozen=True, kw_only=True)
class DatasetOptions:
    """How :class:`ProbaVDataset` prepares the scenes of a split (:func:`data.build_dataset` fills it
    from a config). The choices are the keys of the tables :data:`data.SELECTIONS`,
    :data:`data.FRAME_ORDERS`, :data:`data.PADDINGS`, :data:`data.PATCHES` and :data:`data.views.RECIPES`.
    """

    # the scenes
    bands: str | tuple[str, ...] = "all"  # "NIR", "RED", "all" or a sequence of bands
    val_fraction: float = VAL_FRACTION  # the carve of val from train/ when the root has no val/ (split_scenes)
    holdout_fraction: float = 0.0  # the carve of holdout (checkpoint choice) from train; train leaves it out
    min_frame_clearance: float = 0.0  # frames must be clearer than this; a train scene without one is dropped
    drop_unclear: bool = False  # drop such scenes of every split, not only train (PIUnet's preprocessing)
    # loading
    cache_dir: str | os.PathLike | None = None  # the disk cache of decoded scenes and views (None: none)
    cache_write: bool = True  # write decoded scenes into cache_dir (False: only read what is there)
    register: bool = False  # align every frame to the scene's clearest at loading (data.registration)
    progress: bool = True  # a tqdm bar while scenes load
    # the frames of a sample
    n_frames: int = 9  # frames per sample (T)
    selection: str = "clearest"  # a key of SELECTIONS (see select_frames)
    beta: float = 50.0  # the temperature of the "weighted" selection
    frame_order: str = "selection"  # a key of FRAME_ORDERS: the order the selected frames are fed in
    padding: str = "repeat"  # a key of PADDINGS: a scene with fewer frames repeats its clearest, or "zeros"
    views: str = ""  # an authors' recipe of RECIPES in place of selection and padding ("" for none)
    seed: int = 0  # base seed: sample i of epoch e draws from (seed, e, i), whatever the worker count
    # training patches
    patch_size: int | None = None  # LR patch side; None gives full scenes
    patches: str = "random"  # a key of PATCHES: random crops, the clear grid, or TR-MISR's windows
    min_clear: float = 0.0  # a patch needs this HR clear fraction (random crops: redrawn up to 50 times)
    repeats: int = 1  # every scene (or grid patch, window) is visited this many times per epoch
    window: int = 64  # the side of a "windows" sub-scene (LR pixels)
    window_stride: int = 32  # their stride: 3x3 windows at offsets 0/32/64 of a 128x128 scene
    window_min_clear: float = 0.85  # a window is kept when its frames' mean quality reaches this
    # transforms
    augment: bool = False  # a random flip/rotation per sample, and a random frame order unless keep_order
    keep_order: bool = False  # augmentation keeps frame_order's order (models whose output depends on it)
    fill_clouds: bool = False  # cloudy LR pixels take the median of their clear values (models without QMs)

    def __post_init__(self):
        if self.selection not in SELECTIONS:
            raise ValueError(f"unknown frame selection {self.selection!r}; choose from {', '.join(SELECTIONS)}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {self.repeats}")
        if self.patches not in PATCHES:
            raise ValueError(f"patches must be one of {', '.join(PATCHES)}, got {self.patches!r}")
        if self.frame_order not in FRAME_ORDERS:
            raise ValueError(f"frame_order must be one of {', '.join(FRAME_ORDERS)}, got {self.frame_order!r}")
        if self.padding not in PADDINGS or (self.views and self.views not in RECIPES):
            raise ValueError(f"padding must be one of {tuple(PADDINGS)} (got {self.padding!r}) and views '' or "
                             f"one of {tuple(RECIPES)} (got {self.views!r})")
        if self.patch_size is not None and self.patches == "windows" and self.window < self.patch_size:
            raise ValueError(f"window={self.window} is smaller than patch_size={self.patch_size}")


_OPTION_NAMES = frozenset(f.name for f in fields(DatasetOptions))


class ProbaVDataset(Dataset):
    """Scenes of one split and one or both bands of a PROBA-V root, as samples (see the module docstring).

    Args:
        root: dataset root (holds ``train/``, optionally ``val/``, ``test/``, ``norm.csv``).
        split: one of :data:`SPLITS` (see :func:`split_scenes`).
        options: everything else (:class:`DatasetOptions`); its fields also read as attributes
            (``ds.frame_order``).

    Attributes:
        scenes: the loaded scenes (:func:`data.cache.load_scene_cached`), ``keys`` their
            ``(band, name)``, ``dropped`` the ``"BAND/imgsetNNNN"`` left out by ``min_frame_clearance``,
            ``bands`` the bands as a tuple, ``epoch`` the epoch of the random draws (:meth:`set_epoch`).

    Item ``i`` is scene ``i % n_scenes`` (or region ``i % n_regions`` for grid patches and windows);
    its draws come from ``(seed, epoch, i)``, so a run is reproducible whatever the worker count.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", options: DatasetOptions = DatasetOptions()):
        root, o = Path(root), options
        if not root.is_dir():
            # the same message as the reader's: how to get the data, how to run the demo
            list_scenes(root, split, "NIR")
        bands = BANDS if o.bands == "all" else ((o.bands,) if isinstance(o.bands, str) else tuple(o.bands))
        self.root, self.split, self.bands, self.options, self.epoch = root, split, bands, o, 0
        paths = [p for b in bands for p in split_scenes(root, split, b, o.val_fraction, VAL_SEED,
                                                        o.holdout_fraction)]
        if not paths:
            raise DatasetNotFoundError(f"{root}: no scene in split {split!r} for bands {bands}")
        cache = Path(o.cache_dir) if o.cache_dir is not None else None
        if cache is not None:
            sweep_temporaries(cache)  # what writers killed mid-write left
        it = tqdm(paths, desc=f"loading {split} scenes", disable=not o.progress, leave=False)
        self.scenes = [load_scene_cached(p, cache, o.register, o.cache_write) for p in it]
        if split != "test":
            for s, p in zip(self.scenes, paths, strict=True):
                if s["hr"] is None:
                    raise DataError(f"{p / 'HR.png'}: missing in a {split} scene")
        self.dropped: list[str] = []  # "BAND/imgsetNNNN" of scenes left out: no clear-enough frame
        if o.min_frame_clearance > 0 and (split == "train" or o.drop_unclear):
            self._drop_unclear()
        self.keys = [(s["band"], s["name"]) for s in self.scenes]  # (band, name) of every scene, in order
        self._fixed_frames: dict[int, np.ndarray] = {}  # the frames of per-scene selections, once computed
        self._views = self._prepare_views(paths, cache) if o.views else None
        # the fixed list of (scene, y, x) regions an epoch visits (None: one random crop per scene)
        regions = PATCHES[o.patches](self.scenes, o, f"{root}, {split} split") if o.patch_size is not None else None
        self._regions, self._region_size = (None, o.patch_size) if regions is None else regions

    def __getattr__(self, name: str):
        # the options read as attributes, as when they were the constructor's arguments; only called
        # for names not found otherwise (never for the dataset's own attributes)
        options = self.__dict__.get("options")
        if options is not None and name in _OPTION_NAMES:
            return getattr(options, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _drop_unclear(self) -> None:
        """Leave out the scenes with no frame clearer than ``min_frame_clearance`` (listed in ``dropped``)."""
        m = self.options.min_frame_clearance
        self.dropped = [f"{s['band']}/{s['name']}" for s in self.scenes if s["clearance"].max() <= m]
        self.scenes = [s for s in self.scenes if s["clearance"].max() > m]
        if not self.scenes:
            raise DataError(f"{self.root}: no {self.split} scene has a frame with more than "
                            f"{m:.0%} clear pixels (min_frame_clearance)")

    def _prepare_views(self, paths: list[Path], cache: Path | None) -> list[tuple[np.ndarray, np.ndarray]]:
        """The ``views`` recipe's ``(frames, shifts)`` of every scene, computed once (in this process,
        not per data-loader worker) and cached on disk."""
        o = self.options
        by_key = {(p.parent.name, p.name): p for p in paths}
        it = tqdm(self.scenes, desc=f"preparing {o.views} views", disable=not o.progress, leave=False)
        return [load_views_cached(by_key[(s["band"], s["name"])], s, o.views, o.n_frames, cache, o.register)
                for s in it]

    def __len__(self) -> int:
        return (len(self._regions) if self._regions is not None else len(self.scenes)) * self.options.repeats

    def set_epoch(self, epoch: int) -> None:
        """Make random draws depend on the epoch (call before each training epoch)."""
        self.epoch = epoch

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.options.seed, self.epoch, index])

    def frames_for(self, index: int, rng: np.random.Generator, window: tuple[int, int] | None = None) -> np.ndarray:
        """The frames of scene ``index`` (see :func:`data.select_frames`), in the order they are fed
        (``frame_order``); ``window`` ``(y, x)``: per-sample draws use that window's clearance."""
        idx = self._select(index, rng, window)
        return FRAME_ORDERS[self.options.frame_order](idx, self.scenes[index]["clearance"], rng)

    def _select(self, index: int, rng: np.random.Generator, window: tuple[int, int] | None) -> np.ndarray:
        """The indices ``selection`` picks for scene ``index`` (without repeats when ``padding="zeros"``)."""
        o, s = self.options, self.scenes[index]
        pad = PADDINGS[o.padding]
        if not SELECTIONS[o.selection].per_sample:  # the same for every visit: computed once per scene
            if index not in self._fixed_frames:
                self._fixed_frames[index] = select_frames(
                    s["qm"], o.n_frames, o.selection, np.random.default_rng([o.seed, index]), sm=s["sm"],
                    beta=o.beta, clearance=s["clearance"], min_clearance=o.min_frame_clearance, pad=pad)
            return self._fixed_frames[index]
        clearance, sm = s["clearance"], s["sm"]
        if window is not None:  # QA-Net's authors draw on the window's own clearance
            (y, x), w = window, o.window
            clearance, sm = s["qm"][:, y:y + w, x:x + w].mean((1, 2)), None
        return select_frames(s["qm"], o.n_frames, o.selection, rng, sm=sm, beta=o.beta, clearance=clearance,
                             min_clearance=o.min_frame_clearance, pad=pad)

    def _frames(self, index: int, rng: np.random.Generator,
                window: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(lr, qm, alphas)`` of scene ``index``: ``(T,h,w)`` frames (uint16 as stored, or float32 in
        [0,1] from a ``views`` recipe), bool masks, float32 ``(T,)`` alphas (padding last);
        ``window``: see :meth:`frames_for`."""
        s, n = self.scenes[index], self.options.n_frames
        if self._views is not None:
            frames, shifts = self._views[index]
            v = assemble_views(s["lr"], s["qm"], frames, shifts, n, fill=RECIPES[self.options.views].fill)
            return v.lrs, v.qms, v.alphas
        idx = self.frames_for(index, rng, window)
        lr, qm = s["lr"][idx], s["qm"][idx]
        alphas = np.ones(len(idx), np.float32)
        if len(idx) < n:  # padding="zeros": zero frames, never clear, alpha 0
            pad = n - len(idx)
            lr = np.concatenate([lr, np.zeros((pad, *lr.shape[1:]), lr.dtype)])
            qm = np.concatenate([qm, np.zeros((pad, *qm.shape[1:]), bool)])
            alphas = np.concatenate([alphas, np.zeros(pad, np.float32)])
        return lr, qm, alphas

    def _corner(self, region: tuple[int, int] | None, sm: np.ndarray | None, side: int,
                rng: np.random.Generator) -> tuple[int, int]:
        """The LR corner of this sample's patch: a random crop of the scene (of side ``side``) when
        there is no ``region``, a random crop inside a window region, or the grid region itself."""
        o = self.options
        if region is None:
            return random_corner(sm, side, o.patch_size, o.min_clear, rng)
        if self._region_size > o.patch_size:
            return random_corner(sm, self._region_size, o.patch_size, o.min_clear, rng, region)
        return region

    def __getitem__(self, item: int) -> dict:
        if not 0 <= item < len(self):
            raise IndexError(f"item {item} out of range for {len(self)} samples")
        o, region = self.options, None
        if self._regions is not None:
            index, y, x = self._regions[item % len(self._regions)]
            region = (y, x)
        else:
            index = item % len(self.scenes)
        s = self.scenes[index]
        rng = self._rng(item)  # every draw of this sample, in a fixed order: frames, crop, augmentation
        lr, qm, alphas = self._frames(index, rng, region if self._region_size != o.patch_size else None)
        hr, sm = s["hr"], s["sm"]
        if o.patch_size is not None:
            if o.patch_size > lr.shape[-1]:
                raise ValueError(f"patch_size={o.patch_size} exceeds the LR size {lr.shape[-1]}")
            y, x = self._corner(region, sm, lr.shape[-1], rng)
            lr, qm, hr, sm = crop(lr, qm, hr, sm, y, x, o.patch_size)
        real = int((alphas > 0).sum())  # the real frames come first
        if o.augment:
            lr, qm, hr, sm = augment_sample(rng, lr, qm, hr, sm, n_reorder=0 if o.keep_order else real)
        if np.issubdtype(lr.dtype, np.integer):  # a recipe's views are in [0,1] already
            lr = lr.astype(np.float32) / 65535.0
        if o.fill_clouds:
            lr[:real] = fill_clouds(lr[:real], qm[:real])  # padding stays zero
        out = {"lr": torch.from_numpy(np.ascontiguousarray(lr)),
               "lr_mask": torch.from_numpy(qm.astype(np.float32)),
               "alphas": torch.from_numpy(alphas),
               "name": s["name"], "band": s["band"], "index": index}
        if hr is not None:
            out["hr"] = torch.from_numpy(hr.astype(np.float32) / 65535.0)[None]
        if sm is not None:
            out["hr_mask"] = torch.from_numpy(sm.astype(np.float32))[None]
        return out
