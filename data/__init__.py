"""PROBA-V scenes: the reader, frame registration, the torch dataset, and a synthetic scene generator."""
from .builder import build_dataset
from .dataset import SELECTIONS, CacheWarning, ProbaVDataset, load_scene_cached, select_frames, split_scenes
from .io import BANDS, DataError, DatasetNotFoundError, list_scenes, read_norm, read_png, read_scene, write_png
from .registration import RegistrationWarning, register_frames

__all__ = ["build_dataset", "read_scene", "read_png", "write_png", "read_norm", "list_scenes", "split_scenes",
           "select_frames", "load_scene_cached", "register_frames", "RegistrationWarning", "CacheWarning",
           "ProbaVDataset", "DataError", "DatasetNotFoundError", "BANDS", "SELECTIONS"]
