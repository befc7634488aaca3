"""A torch ``Dataset`` over a PROBA-V root: splits, frame selection, patches, and a scene cache.

Samples are dicts (float32, values in [0, 1]):

- ``lr`` ``(T,h,w)``: the selected frames, uint16 / 65535;
- ``lr_mask`` ``(T,h,w)``: their quality maps, 1 = clear;
- ``alphas`` ``(T,)``: 1 for a real frame, 0 for a padding frame (zeros, mask 0; only with
  ``padding="zeros"`` or a ``views`` recipe, and always after the real frames);
- ``hr`` ``(1,H,W)`` and ``hr_mask`` ``(1,H,W)``: target and status map (``hr`` absent for test
  scenes, ``hr_mask`` absent where the scene has no SM.png);
- ``name`` (``"imgsetNNNN"``), ``band`` (``"NIR"``/``"RED"``), ``index`` (scene index, int).

Decoded scenes are cached on disk as ``.npz`` next to a signature of the source files (size and
modification time of every PNG), so a scene is decoded from PNG once and again only when a file
of it changes; the cache also stores each frame's clearance (its fraction of clear pixels), and,
in a file of its own, the choice of an authors' view recipe (:mod:`data.views`: frames and shifts).
"""
from __future__ import annotations

import hashlib
import math
import os
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from utils.files import WriteError, atomic_path, sweep_temporaries

from .io import BANDS, SCALE, DataError, DatasetNotFoundError, list_scenes, read_scene
from .registration import REGISTRATION_VERSION, register_frames
from .views import RECIPES, assemble_views

__all__ = ["ProbaVDataset", "augment_sample", "fill_clouds", "split_scenes", "select_frames", "scene_signature",
           "load_scene_cached", "load_views_cached", "CacheWarning", "CACHE_VERSION", "VAL_FRACTION", "VAL_SEED",
           "SELECTIONS", "PATCHES", "FRAME_ORDERS", "PADDINGS"]

VAL_FRACTION = 0.1  # share of train/ scenes held out per band when the root has no val/
VAL_SEED = 0  # the carve is a seeded permutation of the sorted scene names: the same on every machine
SELECTIONS = ("clearest", "weighted", "coverage", "all")
PATCHES = ("random", "grid", "windows")
FRAME_ORDERS = ("selection", "shuffled", "clearest_first")
PADDINGS = ("repeat", "zeros")  # a scene with fewer frames than asked: repeat its clearest, or zero frames
VIEWS_VERSION = "v1"  # part of the view cache's key: change it whenever a recipe changes


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
    if split not in ("train", "holdout", "val", "test"):
        raise ValueError(f"split must be one of train, holdout, val, test; got {split!r}")
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


def scene_signature(path: Path) -> str:
    """A digest of the names, sizes and modification times of a scene's PNG files."""
    h = hashlib.sha1()
    for f in sorted(os.listdir(path)):
        if f.endswith(".png"):
            st = os.stat(path / f)
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def _decode(path: Path, register: bool) -> dict:
    """:func:`data.io.read_scene`, frames registered when ``register``, plus ``clearance``."""
    scene = read_scene(path)
    if register:
        scene["lr"], scene["qm"], scene["shifts"] = register_frames(scene["lr"], scene["qm"], name=str(path))
    scene["clearance"] = scene["qm"].mean((1, 2))  # of the registered masks, as the authors select on
    return scene


def _cache_stem(path: Path, register: bool) -> str:
    """The cache file name (without suffix) of a scene: its band, name, a digest of its full path and
    how its frames are registered."""
    variant = f"_{REGISTRATION_VERSION}" if register else ""
    return f"{path.parent.name}_{path.name}_{zlib.crc32(str(path.resolve()).encode()):08x}{variant}"


CACHE_VERSION = 1  # the layout of a cache entry; an entry of another version is rebuilt
_cache_unwritable: set[str] = set()  # cache folders this process could not write to (warned once each)


class CacheWarning(UserWarning):
    """A scene cache entry was unreadable and rebuilt, or the cache cannot be written."""


def load_scene_cached(path: Path, cache_dir: Path | None, register: bool = False, write: bool = True) -> dict:
    """:func:`data.io.read_scene` plus ``clearance`` (``(T,)`` float64), through the disk cache.

    With ``register``, the frames and masks are aligned to the clearest frame
    (:func:`data.registration.register_frames`) and ``shifts`` ``(T,2)`` holds the applied shifts.
    The cache file is keyed by the scene's path and by whether and how frames are registered
    (:data:`data.registration.REGISTRATION_VERSION`), and holds the signature of the scene's files:
    a changed, added or removed PNG makes the entry stale and the scene is decoded again.
    ``write=False`` reads the cache but never writes it (``train.py --plan`` writes nothing).

    The cache never stops a run: an entry that cannot be read (cut short, garbage, wrong arrays,
    another :data:`CACHE_VERSION`) is rebuilt from the PNGs with one :class:`CacheWarning` naming
    it; a cache folder that cannot be written (a full disk, read-only) gets one warning per process
    and is then only read. Writes are atomic (:class:`ProbaVDataset` removes the temporary files of
    writers that were killed).
    """
    path = Path(path)
    if cache_dir is None:
        return _decode(path, register)
    sig = scene_signature(path)
    cfile = Path(cache_dir) / f"{_cache_stem(path, register)}.npz"
    if cfile.exists():
        try:
            scene = _read_entry(cfile, sig, path, register)
            if scene is not None:
                return scene
        except Exception as e:  # numpy and zipfile raise many types for a damaged file
            warnings.warn(CacheWarning(f"scene cache entry {cfile} is unreadable ({type(e).__name__}: {e}): "
                                       f"rebuilding it from the PNGs"), stacklevel=2)
    scene = _decode(path, register)
    if not write:
        return scene
    if str(cache_dir) not in _cache_unwritable:
        try:
            _write_entry(cfile, sig, scene, register)
        except WriteError as e:
            _cache_unwritable.add(str(cache_dir))
            warnings.warn(CacheWarning(f"cannot write the scene cache in {cache_dir} ({e.reason}): going on "
                                       f"without it (scenes are decoded from their PNGs)"), stacklevel=2)
    return scene


def _read_entry(cfile: Path, sig: str, path: Path, register: bool) -> dict | None:
    """The scene in cache entry ``cfile``; None when it is stale (``sig`` differs). Raises (any
    type) when the entry is damaged: unreadable, another version, or arrays of the wrong kind."""
    with open(cfile, "rb") as f:  # opened here: np.load leaves its own file open when the zip is damaged
        if f.read(4) != b"PK\x03\x04":  # np.load would try it as a pickle and say so, misleadingly
            raise ValueError("not an .npz archive")
        f.seek(0)
        with np.load(f, allow_pickle=False) as z:
            version = int(z["version"]) if "version" in z.files else 1  # entries before the field were 1
            if version != CACHE_VERSION:
                raise ValueError(f"cache version {version}, this code writes {CACHE_VERSION}")
            if str(z["signature"]) != sig:
                return None
            scene = {"name": path.name, "band": path.parent.name, "lr": z["lr"], "qm": z["qm"],
                     "hr": z["hr"] if z["has_hr"] else None, "sm": z["sm"] if z["has_sm"] else None,
                     "clearance": z["clearance"]}
            if register:
                scene["shifts"] = z["shifts"]
    T, h, w = scene["lr"].shape
    want = {"lr": (np.uint16, (T, h, w)), "qm": (np.bool_, (T, h, w)), "clearance": (np.float64, (T,)),
            "hr": (np.uint16, (SCALE * h, SCALE * w)), "sm": (np.bool_, (SCALE * h, SCALE * w))}
    if register:
        want["shifts"] = (scene["shifts"].dtype, (T, 2))
    for k, (dtype, shape) in want.items():
        a = scene[k]
        if a is not None and (a.dtype != dtype or a.shape != shape):
            raise ValueError(f"{k} is {a.dtype} {a.shape}, expected {np.dtype(dtype)} {shape}")
    return scene


def _write_entry(cfile: Path, sig: str, scene: dict, register: bool) -> None:
    """Write a decoded scene as cache entry ``cfile`` (atomic: a concurrent reader sees the old entry
    or the new one). Raises :class:`utils.files.WriteError` when it cannot."""
    empty = np.zeros((0,), np.uint8)
    extra = {"shifts": scene["shifts"]} if register else {}
    with atomic_path(cfile) as tmp:
        np.savez(tmp, version=CACHE_VERSION, signature=sig, lr=scene["lr"], qm=scene["qm"],
                 clearance=scene["clearance"], hr=scene["hr"] if scene["hr"] is not None else empty,
                 has_hr=scene["hr"] is not None, sm=scene["sm"] if scene["sm"] is not None else empty,
                 has_sm=scene["sm"] is not None, **extra)


def load_views_cached(path: Path, scene: dict, recipe: str, n: int, cache_dir: Path | None,
                      register: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(frames (k,), shifts (k,2))``: the choice of view recipe ``recipe`` (a key of
    :data:`data.views.RECIPES`) with ``n`` views for ``scene`` (as loaded from ``path``, registered
    when ``register``), through the disk cache; stale when a PNG of the scene changes.

    TR-MISR's recipe registers up to 23 frames by masked phase correlation (about a second a scene
    on one core): cached, it is computed once per scene.
    """
    if cache_dir is None:
        views = RECIPES[recipe](scene["lr"], scene["qm"], n)
        return views.frames, views.shifts
    path = Path(path)
    sig = scene_signature(path)
    cfile = Path(cache_dir) / f"{_cache_stem(path, register)}_views-{recipe}-{n}-{VIEWS_VERSION}.npz"
    if cfile.exists():
        try:
            with np.load(cfile, allow_pickle=False) as z:
                if str(z["signature"]) == sig:
                    return z["frames"], z["shifts"]
        except (OSError, KeyError, ValueError):
            pass  # a damaged cache entry is rebuilt below
    views = RECIPES[recipe](scene["lr"], scene["qm"], n)
    with atomic_path(cfile) as tmp:
        np.savez(tmp, signature=sig, frames=views.frames, shifts=views.shifts)
    return views.frames, views.shifts


def select_frames(qm: np.ndarray, k: int, strategy: str, rng: np.random.Generator | None = None,
                  sm: np.ndarray | None = None, beta: float = 50.0, trials: int = 500,
                  clearance: np.ndarray | None = None, min_clearance: float = 0.0, pad: bool = True) -> np.ndarray:
    """Indices of ``k`` frames of a scene (repeats where it has fewer than ``k``, unless not ``pad``).

    Args:
        qm: ``(T,h,w)`` bool quality maps.
        k: frames wanted (``strategy="all"`` ignores it and returns every frame).
        strategy: ``"clearest"`` the k clearest (stable order, padding by repeating the clearest);
            ``"weighted"`` k drawn without replacement with probability ``exp(beta * c / max c)``
            (QA-Net's training sampler; ``rng`` required); ``"coverage"`` the k frames that maximise
            the worst-case count of clear observations over the LR pixels whose HR footprint has a
            clear pixel (sum of the 10 smallest counts, best of ``trials`` seeded draws plus the
            k clearest, as QA-Net's authors chose val/test frames).
        sm: ``(3h,3w)`` HR status map for ``"coverage"`` (all clear if None).
        clearance: ``(T,)`` per-frame clear fraction, computed from ``qm`` if None.
        min_clearance: when above 0, only frames whose clearance exceeds it are candidates
            (PIUnet's authors: 0.85), and the clearest frame alone when none does. ``"clearest"``
            then pads with candidates drawn at random (``rng``; seeded 0 if None), as the authors do.
        pad: fill up to ``k`` with repeated frames; False returns only the distinct frames chosen
            (fewer than ``k`` for a scene with fewer frames or candidates), for zero-frame padding.
    """
    T = qm.shape[0]
    c = qm.mean((1, 2)) if clearance is None else np.asarray(clearance, dtype=np.float64)
    order = np.argsort(-c, kind="stable")
    if min_clearance > 0:
        keep = np.flatnonzero(c > min_clearance)
        keep = keep if keep.size else order[:1]
        if strategy == "clearest":
            picked = keep[np.argsort(-c[keep], kind="stable")][:k]
            if len(picked) < k and pad:
                rng = rng if rng is not None else np.random.default_rng(0)
                picked = np.concatenate([picked, rng.choice(picked, size=k - len(picked))])
            return picked
        return keep[select_frames(qm[keep], k, strategy, rng, sm, beta, trials, c[keep], pad=pad)]
    if strategy == "all":
        return np.arange(T)
    if strategy == "clearest":
        idx = order[:k]
    elif strategy == "weighted":
        if rng is None:
            raise ValueError("select_frames: strategy 'weighted' needs an rng")
        cmax = c.max() if c.max() > 0 else 1.0
        logits = beta * (c / cmax - 1.0)  # shifted by the max: exp never overflows
        p = np.exp(logits)
        p /= p.sum()
        idx = rng.choice(T, size=min(k, T), replace=False, p=p)
    elif strategy == "coverage":
        rng = rng if rng is not None else np.random.default_rng(0)
        h, w = qm.shape[1:]
        if sm is None:
            keep = np.ones(h * w, bool)
        else:
            keep = sm.reshape(h, SCALE, w, SCALE).any((1, 3)).reshape(-1)
        q = qm.reshape(T, -1)[:, keep].astype(np.int32)  # (T, P)
        if T <= k or q.shape[1] == 0:
            idx = order[:k]
        else:
            cand = np.stack([order[:k]] + [rng.choice(T, size=k, replace=False) for _ in range(trials)])
            onehot = np.zeros((len(cand), T), np.int32)
            np.put_along_axis(onehot, cand, 1, axis=1)
            counts = onehot @ q  # (trials+1, P): clear observations per kept LR pixel
            m = min(10, counts.shape[1])
            worst = np.partition(counts, m - 1, axis=1)[:, :m].sum(1)
            # ties go to the larger total clearance, then to the earlier (clearest-first) candidate
            total = (onehot * c[None]).sum(1)
            best = np.lexsort((np.arange(len(cand)), -total, -worst))[0]
            idx = np.sort(cand[best])
    else:
        raise ValueError(f"unknown frame selection {strategy!r}; choose from {', '.join(SELECTIONS)}")
    if len(idx) < k and pad:
        idx = np.concatenate([idx, np.full(k - len(idx), order[0])])
    return np.asarray(idx)


def fill_clouds(lr: np.ndarray, qm: np.ndarray) -> np.ndarray:
    """``lr (T,h,w)`` float with cloudy pixels (``qm`` False) replaced by the per-pixel median of
    the clear ones (of all frames where no frame is clear at that pixel)."""
    clear = np.where(qm, lr, np.nan)
    with np.errstate(all="ignore"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels are handled below
            med = np.nanmedian(clear, axis=0)
    med = np.where(np.isnan(med), np.median(lr, axis=0), med)
    return np.where(qm, lr, med[None]).astype(lr.dtype)


def _hr_window(a: np.ndarray | None, y: int, x: int, p: int) -> np.ndarray | None:
    """The HR ``(3p, 3p)`` window of ``a`` under the LR patch at ``(y, x)`` of side ``p`` (None stays None)."""
    return None if a is None else a[SCALE * y:SCALE * (y + p), SCALE * x:SCALE * (x + p)]


def augment_sample(rng: np.random.Generator, lr: np.ndarray, qm: np.ndarray, hr: np.ndarray | None,
                   sm: np.ndarray | None, n_reorder: int | None = None) -> tuple:
    """One of the 8 flips/rotations of the pixel grid, drawn from ``rng``, applied alike to
    ``lr``/``qm`` ``(T,h,w)`` and ``hr``/``sm`` ``(H,W)`` (None stays None), and the first
    ``n_reorder`` frames (all when None, none when 0) put in a random order; the frames after them
    (zero padding) stay last. A x3 upscaling maps LR pixel ``i`` to HR pixels ``3i..3i+2``, so the
    transformed pair is again an exact LR/HR pair."""
    k, flip = int(rng.integers(4)), bool(rng.integers(2))
    t = lr.shape[0]
    n = t if n_reorder is None else n_reorder
    order = np.concatenate([rng.permutation(n), np.arange(n, t)]).astype(np.int64)

    def tf(a):
        if a is None:
            return None
        a = np.rot90(a[..., ::-1] if flip else a, k, axes=(-2, -1))
        return np.ascontiguousarray(a)

    return tf(lr[order]), tf(qm[order]), tf(hr), tf(sm)


class ProbaVDataset(Dataset):
    """Scenes of one split and one or both bands of a PROBA-V root.

    Args:
        root: dataset root (holds ``train/``, optionally ``val/``, ``test/``, ``norm.csv``).
        split: ``train``, ``val`` or ``test``.
        bands: ``"NIR"``, ``"RED"``, ``"all"`` or a sequence of bands.
        n_frames: frames per sample (k).
        selection: one of :data:`SELECTIONS` (see :func:`select_frames`).
        patch_size: LR patch side for random training crops; None gives full scenes.
        min_clear: a patch whose HR clear fraction is below this is redrawn (up to 50 times).
        beta: temperature of the ``weighted`` selection.
        seed: base seed; sample ``i`` of epoch ``e`` draws from ``(seed, e, i)`` so a run is
            reproducible whatever the worker count (set the epoch with :meth:`set_epoch`).
        cache_dir: on-disk decode cache (None: decode PNGs on every construction).
        val_fraction: the carve of ``val`` from ``train`` when the root has no ``val/`` (seeded with
            :data:`VAL_SEED`, the same on every machine).
        holdout_fraction: the carve of ``select`` (checkpoint selection) from ``train`` (see
            :func:`split_scenes`); ``train`` then leaves those scenes out.
        progress: show a tqdm bar while scenes load.
        cache_write: write decoded scenes into ``cache_dir`` (False: only read what is there).
        repeats: the dataset lists every scene this many times (several random patches per scene
            and epoch); item ``i`` is scene ``i % n_scenes``.
        fill_clouds: replace every cloudy LR pixel (QM 0) by the median of that pixel's clear
            values in the selected frames (by the median of all of them where none is clear). For
            models that do not read the quality maps (PIUnet); the masks are returned unchanged.
        register: align every frame and mask to the scene's clearest frame once, at loading
            (:func:`data.registration.register_frames`; cached with the scene).
        min_frame_clearance: frames must be clearer than this to be selected (see
            :func:`select_frames`); a ``train`` scene with no such frame is dropped (``dropped``
            lists them), a ``val``/``test`` scene falls back to its clearest frame, unless
            ``drop_unclear`` leaves such scenes of any split out too (PIUnet's preprocessing).
        augment: for training samples, a random flip/rotation by multiples of 90 degrees (the same
            for frames, masks and target: a x3 upscaling commutes with them exactly) and, unless
            ``keep_order``, a random order of the selected frames (see :func:`augment_sample`).
        patches: ``"random"`` crops (redrawn until ``min_clear`` holds); ``"grid"``: the fixed
            grid of non-overlapping patches whose HR clear fraction is at least ``min_clear``
            (PIUnet's authors); ``"windows"``: TR-MISR's sub-scenes, on which QA-Net's authors train:
            the LR windows of side ``window`` at stride ``window_stride`` where the mean of all the
            scene's quality maps is at least ``window_min_clear``, each giving one random crop per
            visit (frames drawn on the window's own clearance). ``grid`` and ``windows`` epochs visit
            every patch or window ``repeats`` times.
        window, window_stride, window_min_clear: the ``"windows"`` sub-scenes (64, 32, 0.85: the
            3x3 windows at offsets 0/32/64 of a 128x128 scene).
        frame_order: the order the selected frames are fed in. ``"selection"``: as
            :func:`select_frames` gives them; ``"shuffled"``: a random order, drawn per training
            sample and, for full scenes, fixed per scene by the seed (QA-Net's authors shuffle both);
            ``"clearest_first"``: by decreasing clearance. One rule for training and evaluation
            matters for models that depend on the frame order (QA-Net's per-position BatchNorms).
        padding: a scene with fewer frames than ``n_frames`` (or fewer candidates) is filled up by
            repeating its clearest frame (``"repeat"``) or with zero frames, mask 0 and alpha 0
            (``"zeros"``: the models whose spec says so mask them).
        keep_order: augmentation leaves the frames in the order ``frame_order`` gives (models whose
            output depends on it: :func:`data.build_dataset` sets it for every model that is not
            order-invariant, so they train on the order they are scored on).
        views: an authors' input recipe of :data:`data.views.RECIPES` (e.g. TR-MISR's 24 clearest
            frames registered to the first, zero-padded), applied to every scene with ``n_frames``
            views in place of ``selection``, ``min_frame_clearance`` and ``padding``; training
            patches are cut from its views. "" for none.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", bands: str | tuple = "all",
                 n_frames: int = 9, selection: str = "clearest", patch_size: int | None = None,
                 min_clear: float = 0.0, beta: float = 50.0, seed: int = 0,
                 cache_dir: str | os.PathLike | None = None, val_fraction: float = VAL_FRACTION,
                 progress: bool = True, repeats: int = 1, fill_clouds: bool = False,
                 register: bool = False, min_frame_clearance: float = 0.0, patches: str = "random",
                 augment: bool = False, holdout_fraction: float = 0.0, window: int = 64, window_stride: int = 32,
                 window_min_clear: float = 0.85, frame_order: str = "selection", cache_write: bool = True,
                 drop_unclear: bool = False, padding: str = "repeat", keep_order: bool = False, views: str = ""):
        root = Path(root)
        if not root.is_dir():
            # the same message as the reader's: how to get the data, how to run the demo
            list_scenes(root, split, "NIR")
        if selection not in SELECTIONS:
            raise ValueError(f"unknown frame selection {selection!r}; choose from {', '.join(SELECTIONS)}")
        bands = BANDS if bands == "all" else ((bands,) if isinstance(bands, str) else tuple(bands))
        self.root, self.split, self.bands = root, split, bands
        self.n_frames, self.selection, self.patch_size = n_frames, selection, patch_size
        self.min_clear, self.beta, self.seed, self.epoch = min_clear, beta, seed, 0
        if repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {repeats}")
        if patches not in PATCHES:
            raise ValueError(f"patches must be one of {', '.join(PATCHES)}, got {patches!r}")
        if frame_order not in FRAME_ORDERS:
            raise ValueError(f"frame_order must be one of {', '.join(FRAME_ORDERS)}, got {frame_order!r}")
        self.frame_order, self.window, self.window_stride = frame_order, window, window_stride
        self.window_min_clear = window_min_clear
        if padding not in PADDINGS or (views and views not in RECIPES):
            raise ValueError(f"padding must be one of {PADDINGS} (got {padding!r}) and views '' or one of "
                             f"{tuple(RECIPES)} (got {views!r})")
        self.repeats, self.fill_clouds, self.min_frame_clearance = repeats, fill_clouds, min_frame_clearance
        self.augment, self.padding, self.keep_order, self.views = augment, padding, keep_order, views
        paths = [p for b in bands for p in split_scenes(root, split, b, val_fraction, VAL_SEED, holdout_fraction)]
        if not paths:
            raise DatasetNotFoundError(f"{root}: no scene in split {split!r} for bands {bands}")
        cache = Path(cache_dir) if cache_dir is not None else None
        if cache is not None:
            sweep_temporaries(cache)  # what writers killed mid-write left
        it = tqdm(paths, desc=f"loading {split} scenes", disable=not progress, leave=False)
        self.scenes = [load_scene_cached(p, cache, register, cache_write) for p in it]
        if split != "test":
            for s, p in zip(self.scenes, paths, strict=True):
                if s["hr"] is None:
                    raise DataError(f"{p / 'HR.png'}: missing in a {split} scene")
        self.dropped: list[str] = []  # "BAND/imgsetNNNN" of scenes left out: no clear-enough frame
        if min_frame_clearance > 0 and (split == "train" or drop_unclear):
            self.dropped = [f"{s['band']}/{s['name']}" for s in self.scenes
                            if s["clearance"].max() <= min_frame_clearance]
            self.scenes = [s for s in self.scenes if s["clearance"].max() > min_frame_clearance]
            if not self.scenes:
                raise DataError(f"{root}: no {split} scene has a frame with more than "
                                f"{min_frame_clearance:.0%} clear pixels (min_frame_clearance)")
        self.keys = [(s["band"], s["name"]) for s in self.scenes]  # (band, name) of every scene, in order
        self._fixed_frames: dict[int, np.ndarray] = {}
        self._views = self._prepare_views(paths, cache, register, progress) if views else None
        # the fixed list of (scene, y, x) regions an epoch visits (None: one random crop per scene)
        self._regions, self._region_size = None, patch_size
        if patch_size is not None and patches == "grid":
            self._regions = self._grid_patches()
        elif patch_size is not None and patches == "windows":
            if window < patch_size:
                raise ValueError(f"window={window} is smaller than patch_size={patch_size}")
            self._regions, self._region_size = self._kept_windows(), window

    def _prepare_views(self, paths: list[Path], cache: Path | None, register: bool,
                       progress: bool) -> list[tuple[np.ndarray, np.ndarray]]:
        """The ``views`` recipe's ``(frames, shifts)`` of every scene, computed once (in this process,
        not per data-loader worker) and cached on disk."""
        by_key = {(p.parent.name, p.name): p for p in paths}
        it = tqdm(self.scenes, desc=f"preparing {self.views} views", disable=not progress, leave=False)
        return [load_views_cached(by_key[(s["band"], s["name"])], s, self.views, self.n_frames, cache, register)
                for s in it]

    def _grid_patches(self) -> list[tuple[int, int, int]]:
        """``(scene index, y, x)`` of the non-overlapping LR patches with enough clear HR pixels."""
        p, out = self.patch_size, []
        for i, s in enumerate(self.scenes):
            size = s["lr"].shape[-1]
            for y in range(0, size - p + 1, p):
                for x in range(0, size - p + 1, p):
                    hsm = _hr_window(s["sm"], y, x, p)
                    if hsm is None or hsm.mean() >= self.min_clear:
                        out.append((i, y, x))
        if not out:
            raise DataError(f"{self.root}: no {self.patch_size}x{self.patch_size} grid patch of the {self.split} "
                            f"scenes has an HR clear fraction of at least min_clear={self.min_clear}")
        return out

    def _kept_windows(self) -> list[tuple[int, int, int]]:
        """``(scene index, y, x)`` of the LR windows whose mean quality (over all the scene's frames)
        is at least ``window_min_clear``."""
        w, st, out = self.window, self.window_stride, []
        for i, s in enumerate(self.scenes):
            size = s["qm"].shape[-1]
            for y in range(0, size - w + 1, st):
                for x in range(0, size - w + 1, st):
                    if s["qm"][:, y:y + w, x:x + w].mean() >= self.window_min_clear:
                        out.append((i, y, x))
        if not out:
            raise DataError(f"{self.root}: no {w}x{w} window of the {self.split} scenes has a mean quality of at "
                            f"least window_min_clear={self.window_min_clear}")
        return out

    def __len__(self) -> int:
        return (len(self._regions) if self._regions is not None else len(self.scenes)) * self.repeats

    def set_epoch(self, epoch: int) -> None:
        """Make random draws depend on the epoch (call before each training epoch)."""
        self.epoch = epoch

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def frames_for(self, index: int, rng: np.random.Generator, window: tuple[int, int] | None = None) -> np.ndarray:
        """The frames of scene ``index`` (see :func:`select_frames`), in the order they are fed
        (``frame_order``); ``window`` ``(y, x)``: weighted draws use that window's clearance."""
        idx = self._select(index, rng, window)
        if self.frame_order == "shuffled":
            return rng.permutation(idx)
        if self.frame_order == "clearest_first":
            return idx[np.argsort(-self.scenes[index]["clearance"][idx], kind="stable")]
        return idx

    def _select(self, index: int, rng: np.random.Generator, window: tuple[int, int] | None) -> np.ndarray:
        """The indices ``selection`` picks for scene ``index`` (without repeats when ``padding="zeros"``)."""
        s = self.scenes[index]
        pad = self.padding == "repeat"
        if window is not None and self.selection == "weighted":
            (y, x), w = window, self.window
            return select_frames(s["qm"], self.n_frames, self.selection, rng, beta=self.beta,
                                 clearance=s["qm"][:, y:y + w, x:x + w].mean((1, 2)),
                                 min_clearance=self.min_frame_clearance, pad=pad)
        if self.selection in ("clearest", "coverage", "all"):  # deterministic: computed once
            if index not in self._fixed_frames:
                self._fixed_frames[index] = select_frames(
                    s["qm"], self.n_frames, self.selection, np.random.default_rng([self.seed, index]),
                    sm=s["sm"], beta=self.beta, clearance=s["clearance"], min_clearance=self.min_frame_clearance,
                    pad=pad)
            return self._fixed_frames[index]
        return select_frames(s["qm"], self.n_frames, self.selection, rng, sm=s["sm"], beta=self.beta,
                             clearance=s["clearance"], min_clearance=self.min_frame_clearance, pad=pad)

    def _frames(self, index: int, rng: np.random.Generator,
                window: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(lr, qm, alphas)`` of scene ``index``: ``(T,h,w)`` frames (uint16 as stored, or float32 in
        [0,1] from a ``views`` recipe), bool masks, float32 ``(T,)`` alphas (padding last);
        ``window``: see :meth:`frames_for`."""
        s = self.scenes[index]
        if self._views is not None:
            frames, shifts = self._views[index]
            v = assemble_views(s["lr"], s["qm"], frames, shifts, self.n_frames)
            return v.lrs, v.qms, v.alphas
        idx = self.frames_for(index, rng, window)
        lr, qm = s["lr"][idx], s["qm"][idx]
        alphas = np.ones(len(idx), np.float32)
        if len(idx) < self.n_frames:  # padding="zeros": zero frames, never clear, alpha 0
            pad = self.n_frames - len(idx)
            lr = np.concatenate([lr, np.zeros((pad, *lr.shape[1:]), lr.dtype)])
            qm = np.concatenate([qm, np.zeros((pad, *qm.shape[1:]), bool)])
            alphas = np.concatenate([alphas, np.zeros(pad, np.float32)])
        return lr, qm, alphas

    def _random_patch(self, sm: np.ndarray | None, size: int, rng: np.random.Generator,
                      origin: tuple[int, int] = (0, 0)) -> tuple[int, int]:
        """A random LR patch corner in the ``size`` square at ``origin``, redrawn (up to 50 times)
        until its HR clear fraction is at least ``min_clear``."""
        p = self.patch_size
        for _ in range(50):
            y, x = rng.integers(0, size - p + 1, size=2) + np.asarray(origin)
            hsm = _hr_window(sm, y, x, p)
            if hsm is None or self.min_clear <= 0 or hsm.mean() >= self.min_clear:
                break
        return int(y), int(x)

    def __getitem__(self, item: int) -> dict:
        if not 0 <= item < len(self):
            raise IndexError(f"item {item} out of range for {len(self)} samples")
        region = None
        if self._regions is not None:
            index, y, x = self._regions[item % len(self._regions)]
            region = (y, x)
        else:
            index = item % len(self.scenes)
        s = self.scenes[index]
        rng = self._rng(item)
        lr, qm, alphas = self._frames(index, rng, region if self._region_size != self.patch_size else None)
        hr, sm = s["hr"], s["sm"]
        if self.patch_size is not None:
            p = self.patch_size
            if p > lr.shape[-1]:
                raise ValueError(f"patch_size={p} exceeds the LR size {lr.shape[-1]}")
            if region is None:
                y, x = self._random_patch(sm, lr.shape[-1], rng)
            elif self._region_size > p:  # a window: a random crop inside it
                y, x = self._random_patch(sm, self._region_size, rng, region)
            lr, qm = lr[:, y:y + p, x:x + p], qm[:, y:y + p, x:x + p]
            hr, sm = _hr_window(hr, y, x, p), _hr_window(sm, y, x, p)
        real = int((alphas > 0).sum())  # the real frames come first
        if self.augment:
            lr, qm, hr, sm = augment_sample(rng, lr, qm, hr, sm, n_reorder=0 if self.keep_order else real)
        if np.issubdtype(lr.dtype, np.integer):  # a recipe's views are in [0,1] already
            lr = lr.astype(np.float32) / 65535.0
        if self.fill_clouds:
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
