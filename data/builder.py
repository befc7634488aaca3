"""From a config to a dataset: the one place that maps config fields to :class:`DatasetOptions`.

A new data option is a :class:`config.Config` field, a :class:`DatasetOptions` field, and one line
here; train.py, validation, valid.py and predict.py all build their scenes through this module.
What the model itself needs of its data (its padding, its frame order, its authors' view recipe)
comes from its registry entry (:class:`models.ModelSpec`), not from the config.
"""
from __future__ import annotations

from models import spec_of

from .dataset import DatasetOptions, ProbaVDataset

__all__ = ["build_dataset", "dataset_options"]


def _keeps_order(spec) -> bool:
    """Whether augmentation must leave the frames in the order ``frame_order`` gives, for ``spec``
    (a :class:`models.ModelSpec`): every model whose output can depend on that order."""
    return spec.frame_order_contract != "set"


def dataset_options(cfg, band: str | None = None, training: bool = False, progress: bool = True,
                    cache_write: bool = True) -> DatasetOptions:
    """The :class:`DatasetOptions` ``cfg`` (a :class:`config.Config`) asks for; arguments as
    :func:`build_dataset`'s."""
    spec = spec_of(cfg.model)
    common = dict(bands=band or cfg.band, n_frames=cfg.n_frames, seed=cfg.seed, cache_dir=cfg.cache_dir or None,
                  val_fraction=cfg.val_fraction, holdout_fraction=cfg.holdout_fraction, progress=progress,
                  fill_clouds=cfg.fill_clouds, register=cfg.register, min_frame_clearance=cfg.min_frame_clearance,
                  frame_order=cfg.frame_order, cache_write=cache_write, padding=spec.padding,
                  # augmentation reorders frames only where the output cannot depend on it: a model that
                  # is not order-invariant sees them in the one order frame_order gives, trained as scored
                  keep_order=_keeps_order(spec))
    if not training:
        if spec.views:  # scored and submitted as its authors feed it
            common.update(views=spec.views, n_frames=spec.n_views)
        return DatasetOptions(selection=cfg.val_selection, drop_unclear=cfg.drop_unclear_eval, **common)
    return DatasetOptions(selection=cfg.train_selection, patch_size=cfg.patch_size, min_clear=cfg.min_clear,
                          beta=cfg.beta, repeats=cfg.repeats, patches=cfg.patches, augment=cfg.augment,
                          window=cfg.window, window_stride=cfg.window_stride, window_min_clear=cfg.window_min_clear,
                          views=spec.views if spec.train_views else "", **common)


def build_dataset(cfg, split: str, band: str | None = None, training: bool = False,
                  progress: bool = True, cache_write: bool = True) -> ProbaVDataset:
    """The scenes of ``split`` prepared as ``cfg`` (a :class:`config.Config`) says.

    Args:
        cfg: the run's config.
        split: ``train``, ``holdout``, ``val`` or ``test`` (see :func:`data.split_scenes`).
        band: ``NIR``, ``RED`` or ``all``; default ``cfg.band``.
        training: training samples (random or grid patches, ``train_selection``, augmentation,
            ``repeats``); otherwise full scenes with ``val_selection`` for scoring and prediction, or
            with the model's authors' view recipe (``spec.views``, ``spec.n_views`` views) where it has one.
        progress: show a progress bar while scenes load.
        cache_write: write decoded scenes to ``cfg.cache_dir`` (False: read it only).
    """
    return ProbaVDataset(cfg.data_dir, split, dataset_options(cfg, band, training, progress, cache_write))
