"""Where training patches are cut: the table :data:`PATCHES` and the crop helpers.

A patch is an LR square of side ``p`` at corner ``(y, x)`` and the HR square of side ``3p`` under
it (:func:`hr_window`), so LR and HR stay aligned by the x3 scale. :data:`PATCHES` maps each
``patches`` option to the fixed list of regions an epoch visits:

- ``"random"``: none; every visit of a scene crops at random (:func:`random_corner`);
- ``"grid"``: the non-overlapping grid of ``patch_size`` patches whose HR clear fraction is at
  least ``min_clear`` (PIUnet's authors), each a crop of its own;
- ``"windows"``: TR-MISR's sub-scenes, on which QA-Net's authors train: the LR windows of side
  ``window`` at stride ``window_stride`` where the mean of all the scene's quality maps is at least
  ``window_min_clear``; each visit crops at random inside the window.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Protocol

import numpy as np

from .io import SCALE, DataError


class PatchOptions(Protocol):
    """The options the patch tables read (a :class:`data.DatasetOptions` has them; this module does not
    import the dataset, which imports it)."""

    patch_size: int | None
    min_clear: float
    window: int
    window_stride: int
    window_min_clear: float

__all__ = ["Regions", "PATCHES", "hr_window", "random_corner", "crop", "random_crops", "grid_patches",
           "kept_windows"]


class Regions(NamedTuple):
    """The fixed regions an epoch visits: ``corners`` ``(scene index, y, x)`` of LR squares of side ``size``."""

    corners: list[tuple[int, int, int]]
    size: int


def hr_window(a: np.ndarray | None, y: int, x: int, p: int) -> np.ndarray | None:
    """The HR ``(3p, 3p)`` window of ``a`` under the LR patch at ``(y, x)`` of side ``p`` (None stays None)."""
    return None if a is None else a[SCALE * y:SCALE * (y + p), SCALE * x:SCALE * (x + p)]


def crop(lr: np.ndarray, qm: np.ndarray, hr: np.ndarray | None, sm: np.ndarray | None, y: int, x: int,
         p: int) -> tuple:
    """``(lr, qm, hr, sm)`` cut to the LR patch ``(T,p,p)`` at ``(y, x)`` and the HR ``(3p,3p)`` under it (views)."""
    return lr[:, y:y + p, x:x + p], qm[:, y:y + p, x:x + p], hr_window(hr, y, x, p), hr_window(sm, y, x, p)


def random_corner(sm: np.ndarray | None, size: int, p: int, min_clear: float, rng: np.random.Generator,
                  origin: tuple[int, int] = (0, 0)) -> tuple[int, int]:
    """A random corner of a ``p`` LR patch in the ``size`` square at ``origin``, redrawn (up to 50
    times, then the last draw is kept) until its HR clear fraction in ``sm`` is at least ``min_clear``."""
    for _ in range(50):
        y, x = rng.integers(0, size - p + 1, size=2) + np.asarray(origin)
        hsm = hr_window(sm, y, x, p)
        if hsm is None or min_clear <= 0 or hsm.mean() >= min_clear:
            break
    return int(y), int(x)


def random_crops(scenes: list[dict], o: PatchOptions, source: str) -> Regions | None:
    """No fixed regions: one random crop per scene and visit."""
    return None


def grid_patches(scenes: list[dict], o: PatchOptions, source: str) -> Regions:
    """The non-overlapping LR patches of side ``o.patch_size`` with enough clear HR pixels
    (``o.min_clear``); ``source`` names the scenes in the error when there is none."""
    p, out = o.patch_size, []
    for i, s in enumerate(scenes):
        size = s["lr"].shape[-1]
        for y in range(0, size - p + 1, p):
            for x in range(0, size - p + 1, p):
                hsm = hr_window(s["sm"], y, x, p)
                if hsm is None or hsm.mean() >= o.min_clear:
                    out.append((i, y, x))
    if not out:
        raise DataError(f"{source}: no {p}x{p} grid patch of the scenes has an HR clear fraction of at "
                        f"least min_clear={o.min_clear}")
    return Regions(out, p)


def kept_windows(scenes: list[dict], o: PatchOptions, source: str) -> Regions:
    """The LR windows of side ``o.window`` at stride ``o.window_stride`` whose mean quality (over all
    the scene's frames) is at least ``o.window_min_clear``."""
    w, st, out = o.window, o.window_stride, []
    for i, s in enumerate(scenes):
        size = s["qm"].shape[-1]
        for y in range(0, size - w + 1, st):
            for x in range(0, size - w + 1, st):
                if s["qm"][:, y:y + w, x:x + w].mean() >= o.window_min_clear:
                    out.append((i, y, x))
    if not out:
        raise DataError(f"{source}: no {w}x{w} window of the scenes has a mean quality of at least "
                        f"window_min_clear={o.window_min_clear}")
    return Regions(out, w)


# the ``patches`` options: (scenes, options, a name for the scenes in errors) -> the regions, or None
PATCHES: dict[str, Callable[[list[dict], PatchOptions, str], Regions | None]] = {
    "random": random_crops,
    "grid": grid_patches,
    "windows": kept_windows,
}
