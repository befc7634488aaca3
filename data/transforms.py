"""Transforms of a sample's arrays: cloud filling and the flip/rotation augmentation.

Pure NumPy on one sample; ``lr``/``qm`` are ``(T,h,w)`` (frames, quality maps with True = clear),
``hr``/``sm`` ``(3h,3w)`` (target, status map), any of ``hr``/``sm`` may be None.
"""
from __future__ import annotations

import warnings

import numpy as np

__all__ = ["fill_clouds", "augment_sample"]


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


def augment_sample(rng: np.random.Generator, lr: np.ndarray, qm: np.ndarray, hr: np.ndarray | None,
                   sm: np.ndarray | None, n_reorder: int | None = None) -> tuple:
    """One of the 8 flips/rotations of the pixel grid, drawn from ``rng``, applied alike to
    ``lr``/``qm`` ``(T,h,w)`` and ``hr``/``sm`` ``(H,W)`` (None stays None), and the first
    ``n_reorder`` frames (all when None, none when 0) put in a random order; the frames after them
    (zero padding) stay last. A x3 upscaling maps LR pixel ``i`` to HR pixels ``3i..3i+2``, so the
    transformed pair is again an exact LR/HR pair.

    Returns ``(lr, qm, hr, sm)``, contiguous, same dtypes. Draws from ``rng`` in a fixed order
    (rotation, flip, permutation) so a sample is the same whatever the worker that makes it."""
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
