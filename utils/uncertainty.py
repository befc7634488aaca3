"""Does PIUnet's predicted uncertainty track its actual error?

PIUnet predicts, with the SR mean, a per-pixel Laplace log-scale ``log_scale``; its scale
``b = exp(log_scale)`` (in [0,1] image units) is the expected absolute error: for a Laplace
distribution ``E|error| = b``. This module measures that claim on the errors the metric sees:

* :func:`scene_errors`: per scene, the absolute errors ``|HR - SR - bias|`` on the clear pixels after
  the cPSNR registration (the offset and brightness bias chosen by :mod:`utils.metrics`, the one
  cPSNR of the codebase), and the predicted scales at the same SR pixels.
* :func:`spearman`: rank correlation (do larger predicted scales go with larger errors?).
* :class:`UncertaintyReport`: collects scenes; per-scene Spearman, its mean per band, and a
  calibration table per band (deciles of the predicted scale: mean scale vs mean observed error).
* :func:`reliability_plot` / :func:`reliability_image`: that table as a reliability diagram, with the
  line ``y = x`` a calibrated Laplace scale lies on.

matplotlib and scipy are imported inside the functions that need them, so importing this module
(from the evaluation loop) stays as light as torch and numpy.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from .metrics import as_bhw, has_clear, registered_stats

__all__ = ["SceneErrors", "scene_errors", "spearman", "UncertaintyReport", "format_table",
           "reliability_plot", "reliability_image"]


class SceneErrors(NamedTuple):
    """One scene's clear pixels: ``errors`` = ``|HR - SR - bias|`` and ``scales`` = ``exp(log_scale)``,
    1-D float64 arrays of the same length ([0,1] units); ``offset`` = the HR window ``(u, v)`` kept."""

    errors: np.ndarray
    scales: np.ndarray
    offset: tuple[int, int]


@torch.no_grad()
def scene_errors(sr: torch.Tensor, log_scale: torch.Tensor, hr: torch.Tensor, hr_mask: torch.Tensor,
                 border: int = 3) -> list[SceneErrors | None]:
    """Registered absolute errors and predicted scales on the clear pixels of each scene of a batch.

    Args:
        sr: ``(B,1,H,W)`` or ``(B,H,W)`` SR mean in [0,1].
        log_scale: same shape, the Laplace log-scale in [0,1] units (scale ``exp(log_scale)``).
        hr: same shape, the target in [0,1].
        hr_mask: same shape, bool or {0,1}, True = clear.
        border: the cPSNR crop (3 for the competition: 49 offsets).

    Returns:
        One entry per scene: :class:`SceneErrors` (float64 arrays, one value per clear pixel of the
        kept HR window, at the matching pixel of the SR crop), or None for a scene the metric skips
        (no clear pixel in any window, :func:`utils.metrics.has_clear`).
    """
    sr3, s3 = as_bhw(sr, "sr").detach(), as_bhw(log_scale, "log_scale").detach()
    hr3, m3 = as_bhw(hr, "hr"), as_bhw(hr_mask, "hr_mask")
    if s3.shape != sr3.shape:
        raise ValueError(f"log_scale {tuple(log_scale.shape)} does not match sr {tuple(sr.shape)}")
    stats = registered_stats(sr3, hr3, m3, border)
    ok = has_clear(m3, border).tolist()
    s = 2 * border + 1
    H, W = sr3.shape[-2:]
    h, w = H - 2 * border, W - 2 * border
    # argmin of the row-major flattened cMSE: the offset whose cMSE cpsnr() keeps (its amin), the
    # first one on an exact tie.
    best = stats.cmse.flatten(1).argmin(1).tolist()
    out: list[SceneErrors | None] = []
    for i in range(sr3.shape[0]):
        if not ok[i]:
            out.append(None)
            continue
        u, v = divmod(best[i], s)
        clear = m3[i, u:u + h, v:v + w] != 0
        y = hr3[i, u:u + h, v:v + w].to(torch.float64)
        x = sr3[i, border:H - border, border:W - border].to(torch.float64)
        # float64 like the metric core: the errors are small differences of values near 0.5
        err = (y - x - stats.bias[i, u, v])[clear].abs()
        scale = s3[i, border:H - border, border:W - border][clear].to(torch.float64).exp()
        out.append(SceneErrors(err.cpu().numpy(), scale.cpu().numpy(), (u, v)))
    return out


def spearman(a, b) -> float:
    """Spearman rank correlation of two equal-length 1-D arrays (average ranks for ties).

    NaN when it is undefined: fewer than 2 values, or one array constant (scipy would warn).
    """
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"spearman: lengths differ ({a.size} vs {b.size})")
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    from scipy.stats import spearmanr
    return float(spearmanr(a, b).statistic)


def _num(x: float) -> float | None:
    """A float for JSON: None where undefined (NaN), so summary.json stays strict JSON."""
    x = float(x)
    return None if math.isnan(x) else x


class UncertaintyReport:
    """Collects per-scene errors and predicted scales; summarises rank correlation and calibration.

    Pixels are kept as float32 (a 384x384 scene has up to ~140k clear pixels; 300 scenes are ~40M
    values per array, 160 MB each in float32). The per-scene Spearman is computed when a scene is
    added, from the arrays as given (float64 from :func:`scene_errors`).

    Usage: ``add_batch(...)`` (or ``add(...)``) for every batch, then ``to_dict()`` for
    summary.json, ``table()`` for the console, :func:`reliability_plot` for a figure.
    """

    def __init__(self, n_bins: int = 10):
        if n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        self.n_bins = n_bins
        self.scenes: list[dict] = []  # scene, band, n_pixels, spearman, mean_scale, mean_error
        self.skipped: list[dict] = []  # scene, band: no clear pixel, as the metric skips them
        self._pixels: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}  # band -> [(errors, scales)]

    def add(self, name: str, band: str, errors, scales) -> None:
        """One scene: ``errors`` and ``scales`` 1-D of equal length ([0,1] units), or both None
        for a skipped scene."""
        if errors is None or scales is None:
            self.skipped.append({"scene": name, "band": band})
            return
        errors = np.asarray(errors, dtype=np.float64).ravel()
        scales = np.asarray(scales, dtype=np.float64).ravel()
        if errors.shape != scales.shape:
            raise ValueError(f"{name}: {errors.size} errors but {scales.size} scales")
        self.scenes.append({"scene": name, "band": band, "n_pixels": int(errors.size),
                            "spearman": _num(spearman(scales, errors)),
                            "mean_scale": _num(scales.mean()) if errors.size else None,
                            "mean_error": _num(errors.mean()) if errors.size else None})
        self._pixels.setdefault(band, []).append((errors.astype(np.float32), scales.astype(np.float32)))

    def add_batch(self, names, bands, sr: torch.Tensor, log_scale: torch.Tensor, hr: torch.Tensor,
                  hr_mask: torch.Tensor, border: int = 3) -> None:
        """A batch as the evaluation loop sees it: ``names``/``bands`` of length B, tensors as
        :func:`scene_errors` takes them."""
        for name, band, se in zip(names, bands, scene_errors(sr, log_scale, hr, hr_mask, border), strict=True):
            self.add(name, band, *((None, None) if se is None else (se.errors, se.scales)))

    def bands(self) -> list[str]:
        """The bands seen (with at least one scored scene), sorted."""
        return sorted(self._pixels)

    def _chunks(self, band: str) -> list[tuple[np.ndarray, np.ndarray]]:
        if band == "all":
            return [c for b in self.bands() for c in self._pixels[b]]
        return self._pixels.get(band, [])

    def calibration(self, band: str = "all") -> list[dict]:
        """Calibration table of ``band`` (or ``"all"``): the pooled clear pixels split into
        ``n_bins`` quantile bins of predicted scale.

        The edges are ``np.quantile`` of the pooled float32 scales at ``linspace(0, 1, n_bins+1)``;
        bin ``k`` holds ``edges[k] <= scale < edges[k+1]`` (the last also its upper edge), so tied
        scales share a bin and a bin can be empty. One dict per bin: ``bin`` (1-based),
        ``scale_lo``, ``scale_hi``, ``n`` (pixels), ``mean_scale``, ``mean_error`` (None when empty).
        """
        chunks = self._chunks(band)
        if not chunks or sum(s.size for _, s in chunks) == 0:
            return []
        pooled = np.concatenate([s for _, s in chunks])
        # overwrite_input: the pooled copy is ours, so the quantile may partition it in place
        edges = np.quantile(pooled, np.linspace(0.0, 1.0, self.n_bins + 1), overwrite_input=True).astype(np.float64)
        del pooled
        n = np.zeros(self.n_bins, dtype=np.int64)
        sum_s = np.zeros(self.n_bins)
        sum_e = np.zeros(self.n_bins)
        for e, s in chunks:  # bin scene by scene: no pooled index or float64 copy of 40M values
            k = np.searchsorted(edges[1:-1], s, side="right")
            n += np.bincount(k, minlength=self.n_bins)
            sum_s += np.bincount(k, weights=s, minlength=self.n_bins)
            sum_e += np.bincount(k, weights=e, minlength=self.n_bins)
        return [{"bin": k + 1, "scale_lo": float(edges[k]), "scale_hi": float(edges[k + 1]), "n": int(n[k]),
                 "mean_scale": float(sum_s[k] / n[k]) if n[k] else None,
                 "mean_error": float(sum_e[k] / n[k]) if n[k] else None} for k in range(self.n_bins)]

    def _group(self, band: str) -> dict:
        scenes = [r for r in self.scenes if band == "all" or r["band"] == band]
        rho = [r["spearman"] for r in scenes if r["spearman"] is not None]
        chunks = self._chunks(band)
        n_pix = sum(e.size for e, _ in chunks)
        # float64 sums: a float32 running sum over 40M values would lose digits
        sum_e = sum(float(e.sum(dtype=np.float64)) for e, _ in chunks)
        sum_s = sum(float(s.sum(dtype=np.float64)) for _, s in chunks)
        return {"n_scenes": len(scenes), "n_pixels": int(n_pix),
                "spearman_mean": float(np.mean(rho)) if rho else None, "spearman_n": len(rho),
                "mean_scale": sum_s / n_pix if n_pix else None, "mean_error": sum_e / n_pix if n_pix else None,
                "calibration": self.calibration(band),
                "skipped": [r["scene"] for r in self.skipped if band == "all" or r["band"] == band]}

    def to_dict(self) -> dict:
        """JSON-able summary (undefined values are None)::

            {"n_bins": 10, "units": "...",
             "bands": {"NIR": group, "RED": group, "all": group},
             "scenes": [{"scene", "band", "n_pixels", "spearman", "mean_scale", "mean_error"}, ...],
             "skipped": [{"scene", "band"}, ...]}

        ``group``: ``n_scenes, n_pixels, spearman_mean`` (mean of the per-scene Spearman over the
        ``spearman_n`` scenes where it is defined), ``mean_scale, mean_error`` (pooled over pixels),
        ``calibration`` (:meth:`calibration`), ``skipped`` (scene names).
        """
        bands = self.bands() + sorted({r["band"] for r in self.skipped} - set(self._pixels))
        return {"n_bins": self.n_bins,
                "units": "[0,1] image units; scale = exp(log_scale); error = |HR - SR - bias| after cPSNR "
                         "registration; a calibrated Laplace scale has mean_error == mean_scale",
                "bands": {b: self._group(b) for b in bands + ["all"]},
                "scenes": [dict(r) for r in self.scenes], "skipped": [dict(r) for r in self.skipped]}

    def table(self, summary: dict | None = None) -> str:
        """A text table for printing (from ``summary``, a :meth:`to_dict` result, when given)."""
        return format_table(self.to_dict() if summary is None else summary)


def _f(x, spec: str = "10.3e") -> str:
    return format(x, spec) if x is not None else format("-", ">" + spec.split(".")[0])


def format_table(summary: dict) -> str:
    """The text table of a :meth:`UncertaintyReport.to_dict` summary."""
    lines = ["Uncertainty: scale b = exp(log_scale), error = |HR - SR - bias| ([0,1] units; calibrated: err/b = 1)",
             f"{'band':<5} {'scenes':>6} {'pixels':>10} {'spearman':>8} {'mean b':>10} {'mean err':>10} {'err/b':>6}"]
    for band, g in summary["bands"].items():
        ratio = g["mean_error"] / g["mean_scale"] if g["mean_scale"] else None
        lines.append(f"{band:<5} {g['n_scenes']:>6} {g['n_pixels']:>10} {_f(g['spearman_mean'], '8.3f')} "
                     f"{_f(g['mean_scale'])} {_f(g['mean_error'])} {_f(ratio, '6.2f')}")
    for band, g in summary["bands"].items():
        if not g["calibration"]:
            continue
        lines += ["", f"{band}: calibration by quantile bin of predicted scale",
                  f"{'bin':>3} {'pixels':>10} {'mean b':>10} {'mean err':>10} {'err/b':>6}"]
        for c in g["calibration"]:
            ratio = c["mean_error"] / c["mean_scale"] if c["mean_scale"] else None
            lines.append(f"{c['bin']:>3} {c['n']:>10} {_f(c['mean_scale'])} {_f(c['mean_error'])} {_f(ratio, '6.2f')}")
    return "\n".join(lines)


def _figure(report):
    """The reliability diagram as a matplotlib Figure on an Agg canvas (no pyplot: no global state,
    no display needed, safe in a training process)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    summary = report.to_dict() if hasattr(report, "to_dict") else report
    fig = Figure(figsize=(5.5, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lo, hi = math.inf, 0.0
    for band, g in summary["bands"].items():
        pts = [(c["mean_scale"], c["mean_error"]) for c in g["calibration"] if c["n"]]
        if not pts:
            continue
        x, y = zip(*pts, strict=True)
        rho = g["spearman_mean"]
        label = f"{band} (Spearman {rho:.2f})" if rho is not None else band
        ax.plot(x, y, "o-" if band != "all" else "k--", ms=4, label=label, alpha=0.9 if band != "all" else 0.6)
        lo, hi = min(lo, *x, *y), max(hi, *x, *y)
    if hi > 0:
        # log axes when everything is positive: the scales span orders of magnitude
        if lo > 0:
            from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
            ax.set_xscale("log")
            ax.set_yscale("log")
            short = FuncFormatter(lambda val, _: f"{val:.0e}")  # compact labels that do not overlap
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_formatter(short)
                # within two decades label 2x and 5x too, or a narrow range gets one label
                axis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
                axis.set_minor_formatter(short if hi / lo < 100 else NullFormatter())
        else:
            lo = 0.0
        ax.plot([lo, hi], [lo, hi], color="0.5", lw=1, label="y = x (calibrated: E|err| = b)")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no scored scene", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("mean predicted scale b = exp(log_scale) per bin ([0,1] units)")
    ax.set_ylabel("mean observed |HR - SR - bias| ([0,1] units)")
    ax.set_title(f"Reliability: {summary['n_bins']} quantile bins of predicted scale", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig


def reliability_plot(report, path) -> None:
    """Write the reliability diagram of ``report`` (an :class:`UncertaintyReport` or its
    :meth:`~UncertaintyReport.to_dict` summary, e.g. read back from summary.json) as a PNG at ``path``:
    per band, mean predicted scale vs mean observed absolute error by bin, with ``y = x``."""
    _figure(report).savefig(path, format="png")


def reliability_image(report) -> np.ndarray:
    """The reliability diagram as an ``(H, W, 3)`` uint8 array, for TensorBoard's
    ``add_image(tag, img, step, dataformats="HWC")``."""
    fig = _figure(report)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
