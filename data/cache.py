"""The disk caches of the dataset: decoded scenes, and the choice of an authors' view recipe.

A decoded scene is cached as one ``.npz`` next to a signature of its source files (name, size and
modification time of every PNG), so a scene is decoded from PNG once and again only when a file of
it changes; the entry also holds each frame's clearance (its fraction of clear pixels) and, for
registered scenes, the applied shifts. The choice of a view recipe (:mod:`data.views`: frames and
shifts) has a file of its own, keyed like the scene's entry plus the recipe, its view count and
:data:`VIEWS_VERSION`.

Both caches are keyed by the scene's full path; entries of different roots never collide.
"""
from __future__ import annotations

import hashlib
import os
import warnings
import zlib
from pathlib import Path

import numpy as np

from utils.files import WriteError, atomic_path

from .io import SCALE, read_scene
from .registration import REGISTRATION_VERSION, register_frames
from .views import RECIPES

__all__ = ["scene_signature", "load_scene_cached", "load_views_cached", "CacheWarning", "CACHE_VERSION",
           "VIEWS_VERSION"]

CACHE_VERSION = 1  # the layout of a cache entry; an entry of another version is rebuilt
VIEWS_VERSION = "v1"  # part of the view cache's key: change it whenever a recipe changes
_cache_unwritable: set[str] = set()  # cache folders this process could not write to (warned once each)


class CacheWarning(UserWarning):
    """A scene cache entry was unreadable and rebuilt, or the cache cannot be written."""


def scene_signature(path: Path) -> str:
    """A digest of the names, sizes and modification times of a scene's PNG files (40 hex digits)."""
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


def load_scene_cached(path: Path, cache_dir: Path | None, register: bool = False, write: bool = True) -> dict:
    """:func:`data.io.read_scene` plus ``clearance`` (``(T,)`` float64 in [0, 1]), through the disk cache.

    With ``register``, the frames and masks are aligned to the clearest frame
    (:func:`data.registration.register_frames`) and ``shifts`` ``(T,2)`` holds the applied shifts.
    The cache file is keyed by the scene's path and by whether and how frames are registered
    (:data:`data.registration.REGISTRATION_VERSION`), and holds the signature of the scene's files:
    a changed, added or removed PNG makes the entry stale and the scene is decoded again.
    ``write=False`` reads the cache but never writes it (``train.py --plan`` writes nothing).

    The cache never stops a run: an entry that cannot be read (cut short, garbage, wrong arrays,
    another :data:`CACHE_VERSION`) is rebuilt from the PNGs with one :class:`CacheWarning` naming
    it; a cache folder that cannot be written (a full disk, read-only) gets one warning per process
    and is then only read. Writes are atomic (:class:`data.ProbaVDataset` removes the temporary
    files of writers that were killed).
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
        views = RECIPES[recipe].views(scene["lr"], scene["qm"], n)
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
    views = RECIPES[recipe].views(scene["lr"], scene["qm"], n)
    with atomic_path(cfile) as tmp:
        np.savez(tmp, signature=sig, frames=views.frames, shifts=views.shifts)
    return views.frames, views.shifts
