"""PROBA-V scenes: the reader, frame registration, the torch dataset, and a synthetic scene generator.

The choice lists of the dataset's options are the keys of its tables: ``SPLITS``, ``BANDS``,
``tuple(SELECTIONS)``, ``tuple(FRAME_ORDERS)``, ``tuple(PADDINGS)``, ``tuple(PATCHES)``.
"""
from .builder import build_dataset, dataset_options
from .cache import CacheWarning, load_scene_cached
from .dataset import SPLITS, DatasetOptions, ProbaVDataset, split_scenes
from .io import BANDS, DataError, DatasetNotFoundError, list_scenes, norm_of, read_norm, read_png, read_scene, write_png
from .patches import PATCHES
from .registration import RegistrationWarning, register_frames
from .selection import FRAME_ORDERS, PADDINGS, SELECTIONS, select_frames

__all__ = ["build_dataset", "dataset_options", "read_scene", "read_png", "write_png", "read_norm", "norm_of",
           "list_scenes",
           "split_scenes", "select_frames", "load_scene_cached", "register_frames", "RegistrationWarning",
           "CacheWarning", "ProbaVDataset", "DatasetOptions", "DataError", "DatasetNotFoundError", "BANDS", "SPLITS",
           "SELECTIONS", "PATCHES", "FRAME_ORDERS", "PADDINGS"]
