"""3DWDSRNet: a 3-D wide-activation network over registered frames (Dorr, 2020; frandorr/3DWDSRNet).

The frames of a scene, registered to the clearest one, are stacked as a volume ``(T, h, w)`` and
run through 3-D convolutions: a 3x3x3 head, WDSR-B blocks (Yu et al., "Wide Activation for
Efficient and Accurate Image Super-Resolution", 2018: a 1x1x1 expansion with ReLU, a low-rank
1x1x1 projection, a 3x3x3 convolution, a residual), then reducers that each remove two frames
(reflection padding in space, a 'valid' 3x3x3 convolution), a last 'valid' 3x3x3 convolution to
``scale**2`` channels and a depth-to-space. A 2-D path on the mean frame (two 'valid' 3x3
convolutions and a depth-to-space) is added. Every convolution is weight-normalised.

Written from the author's description and code; loads the author's released TensorFlow checkpoints
(:func:`load_released`, through :mod:`utils.tfcheckpoint`, no TensorFlow needed) and reproduces
their outputs to float32 rounding. The network works in standardised units (:mod:`utils.units`: the
author uses PIUnet's constants); ``forward`` and ``super_resolve`` take and give [0,1] units.

The 'valid' convolutions shrink the frame by one pixel on each side: the author pads the 128x128
scene by reflection to 130x130 and runs 34x34 patches at a stride of 32, each giving a 96x96 tile of
the 384x384 SR. :meth:`WDSR3D.super_resolve` does the same (``tile=32``) or runs the whole padded
scene at once (``tile=0``); the two differ near the tile seams, where the patches see zero padding.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.tfcheckpoint import list_tf_checkpoint, read_tf_checkpoint
from utils.units import FULL_SCALE, destandardize, standardize

from .layers import full_precision

__all__ = ["WDSR3D", "WNConv", "WideBlock", "state_from_tf", "tf_layer_order", "read_released", "load_released",
           "postprocess", "WDSR3D_MAX"]

# The author's output step: the SR in DN clipped to [0, 2**16] and rounded (predict.py), in [0,1] units.
WDSR3D_MAX = 65536 / FULL_SCALE


def postprocess(sr):
    """The author's output step before saving (``predict.py``): clip to [0, 65536] DN and round to
    whole DN. ``sr`` (NumPy array or torch tensor, any shape) in [0,1] units -> the same type, shape
    and dtype in [0,1] units. (Their ``astype(np.uint16)`` would then wrap 65536 to 0.)"""
    if isinstance(sr, torch.Tensor):
        return torch.round(sr.clamp(0, WDSR3D_MAX) * FULL_SCALE) / FULL_SCALE
    return (np.round(np.clip(sr, 0, WDSR3D_MAX) * FULL_SCALE) / FULL_SCALE).astype(sr.dtype, copy=False)


class WNConv(nn.Module):
    """A weight-normalised 2-D or 3-D convolution, ``kernel = g * v / ||v||`` with the norm over
    everything but the output channel, as TensorFlow Addons' ``WeightNormalization`` computes it
    (``l2_normalize(v) * g``, the squared norm floored at 1e-12).

    Parameters ``v (c_out, c_in, k, k[, k])``, ``g (c_out,)``, ``bias (c_out,)``; the kernel is
    recomputed from them on every call (no hooks, no cached weight), so training, ``deepcopy``
    and graph capture see plain tensor operations.
    ``forward(x (N, c_in, [T,] H, W)) -> (N, c_out, [T',] H', W')`` with zero ``padding``.
    """

    def __init__(self, dims: int, c_in: int, c_out: int, kernel_size: int, padding: int = 0):
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"WNConv: dims must be 2 or 3, got {dims}")
        self.dims, self.padding = dims, padding
        self.v = nn.Parameter(torch.empty(c_out, c_in, *[kernel_size] * dims))
        self.g = nn.Parameter(torch.empty(c_out))
        self.bias = nn.Parameter(torch.zeros(c_out))
        # the author's start: Keras's Glorot-uniform kernel, zero bias, and g = ||v|| (tfa with
        # data_init=False), so that the first kernel is v itself
        nn.init.xavier_uniform_(self.v)
        with torch.no_grad():
            self.g.copy_(self.v.flatten(1).norm(dim=1))

    def weight(self) -> torch.Tensor:
        """The kernel ``g * v / ||v||``, ``v``'s shape."""
        v = self.v
        sq = v.square().sum(dim=tuple(range(1, v.dim())), keepdim=True).clamp_min(1e-12)
        return v * sq.rsqrt() * self.g.view(-1, *[1] * (v.dim() - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = F.conv3d if self.dims == 3 else F.conv2d
        return conv(x, self.weight(), self.bias, padding=self.padding)


class WideBlock(nn.Module):
    """WDSR-B block on volumes: ``x + conv3(linear(relu(expand(x))))``.

    ``expand``: 1x1x1, ``n_feats`` -> ``n_feats * expansion`` (the wide activation); ``linear``:
    1x1x1 to ``int(n_feats * low_rank)`` (a low-rank bottleneck, no activation); ``conv``: 3x3x3
    back to ``n_feats``, zero 'same' padding in time and space. ``(B, C, T, H, W) -> same shape``.
    """

    def __init__(self, n_feats: int, expansion: int, low_rank: float):
        super().__init__()
        narrow = int(n_feats * low_rank)  # the author's int(): 32 * 0.8 -> 25
        self.expand = WNConv(3, n_feats, n_feats * expansion, 1)
        self.linear = WNConv(3, n_feats * expansion, narrow, 1)
        self.conv = WNConv(3, narrow, n_feats, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(self.linear(F.relu(self.expand(x), inplace=True)))


def _tile_starts(n: int, tile: int) -> list[int]:
    """Starts of tiles of ``tile`` pixels covering ``n``: stride ``tile``, the last one moved back to end at ``n``."""
    starts = list(range(0, n - tile + 1, tile))
    if starts[-1] + tile < n:
        starts.append(n - tile)
    return starts


class WDSR3D(nn.Module):
    """3DWDSRNet.

    Args (the author's ``wdsr_3d(scale, num_filters, num_res_blocks, res_block_expansion, res_block,
    channels)`` in brackets; defaults are the released networks', ``wdsr_3d(3, 32, 8, 6, res_block_b, 7)``):
        scale (scale): upscaling factor.
        n_feats (num_filters): feature channels of the 3-D path.
        n_resblocks (num_res_blocks): WDSR-B blocks.
        expansion (res_block_expansion): width factor of the blocks' first 1x1x1 convolution.
        low_rank: the blocks' bottleneck as a fraction of ``n_feats`` (0.8, fixed in ``res_block_b``).
        n_frames (channels): frames in the volume; ``n_frames // 3`` reducers take 2 frames each and
            the last convolution 2 more, which must leave exactly one: 5, 7 or 9.
        tile: LR pixels per tile in :meth:`super_resolve` (the author's 32); 0 runs the whole frame at once.

    ``forward(lrs (B,T,h,w), mean (B,1,h,w)) -> (B,1,scale*(h-2),scale*(w-2))``, all in [0,1] units
    (raw uint16 / 65535); standardised inside with PIUnet's constants (the author's too). The output
    is not clipped (the author clips to [0, 65536] DN and rounds: :func:`postprocess`).
    """

    has_uncertainty = False

    def __init__(self, scale: int = 3, n_feats: int = 32, n_resblocks: int = 8, expansion: int = 6,
                 low_rank: float = 0.8, n_frames: int = 7, tile: int = 32):
        super().__init__()
        if n_frames - 2 * (n_frames // 3) != 3:
            raise ValueError(f"WDSR3D: n_frames={n_frames} does not reduce to one frame "
                             f"({n_frames // 3} reducers of 2 frames and a last 3x3x3 convolution); use 5, 7 or 9")
        if tile < 0:
            raise ValueError(f"WDSR3D: tile must be >= 0 (0: whole frame), got {tile}")
        self.scale, self.n_frames, self.tile = scale, n_frames, tile
        self.head = WNConv(3, 1, n_feats, 3, padding=1)
        self.blocks = nn.ModuleList([WideBlock(n_feats, expansion, low_rank) for _ in range(n_resblocks)])
        self.reducers = nn.ModuleList([WNConv(3, n_feats, n_feats, 3) for _ in range(n_frames // 3)])
        self.tail = WNConv(3, n_feats, scale * scale, 3)
        self.skip1 = WNConv(2, 1, scale * scale, 3)  # the mean frame's path
        self.skip2 = WNConv(2, scale * scale, scale * scale, 3)

    def _volume_path(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised frames ``(B,1,T,h,w)`` -> ``(B,1,scale*(h-2),scale*(w-2))``."""
        x = F.relu(self.head(x))
        if getattr(self, "memory_format", torch.contiguous_format) == torch.channels_last:
            # NDHWC, oneDNN's own layout for 3-D convolutions: 1.4x faster blocks on a CPU (request_channels_last)
            x = x.contiguous(memory_format=torch.channels_last_3d)
        for block in self.blocks:
            x = block(x)
        for reducer in self.reducers:
            # reflection in space keeps h x w; the 'valid' convolution takes 2 frames
            x = F.relu(reducer(F.pad(x, (1, 1, 1, 1, 0, 0), mode="reflect")))
        x = full_precision(self.tail, x)  # (B, scale**2, 1, h-2, w-2); float32 under autocast: it is the SR
        # one output channel: TF's depth_to_space and torch's pixel_shuffle take the same order (i*scale + j)
        return F.pixel_shuffle(x[:, :, 0], self.scale)

    def _mean_path(self, m: torch.Tensor) -> torch.Tensor:
        """Standardised mean frame ``(B,1,h,w)`` -> ``(B,1,scale*(h-2),scale*(w-2))``."""
        y = F.relu(self.skip1(F.pad(m, (1, 1, 1, 1), mode="reflect")))
        return F.pixel_shuffle(full_precision(self.skip2, y), self.scale)

    def forward(self, lrs: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        if lrs.dim() != 4 or lrs.shape[1] != self.n_frames:
            raise ValueError(f"WDSR3D was built for {self.n_frames} frames: lrs must be (B,{self.n_frames},h,w), "
                             f"got {tuple(lrs.shape)}")
        if mean.shape != (lrs.shape[0], 1, *lrs.shape[2:]):
            raise ValueError(f"WDSR3D: mean must be (B,1,h,w) = {(lrs.shape[0], 1, *lrs.shape[2:])}, "
                             f"got {tuple(mean.shape)}")
        sr = self._volume_path(standardize(lrs)[:, None]) + self._mean_path(standardize(mean))
        return destandardize(sr.float() if sr.dtype != torch.float64 else sr)

    def super_resolve(self, lr: torch.Tensor, lr_mask: torch.Tensor | None = None,
                      alphas: torch.Tensor | None = None) -> dict:
        """``lr (B,T,h,w)`` in [0,1], the author's frames (registered, clearest first; fewer than
        ``n_frames`` clear frames are made up by repeating frames, not by zero padding) ->
        ``{"sr": (B,1,scale*h,scale*w)}`` in [0,1] units, not clipped.

        As the author: the mean frame is the plain mean of the ``T`` frames; frames and mean are
        padded by reflection (one pixel) and cut into tiles of ``tile + 2`` pixels at a stride of
        ``tile`` (a last tile moved back when ``tile`` does not divide the size; one tile when
        ``tile`` is 0 or larger than the frame). Masks and alphas are not read."""
        scale = self.scale
        b, _, h, w = lr.shape
        x = F.pad(torch.cat([lr, lr.mean(1, keepdim=True)], 1), (1, 1, 1, 1), mode="reflect")
        th, tw = (min(self.tile, h), min(self.tile, w)) if self.tile else (h, w)
        rows, cols = _tile_starts(h, th), _tile_starts(w, tw)
        if len(rows) * len(cols) == 1:
            return {"sr": self(x[:, :-1], x[:, -1:])}
        tiles = torch.stack([x[:, :, r:r + th + 2, c:c + tw + 2] for r in rows for c in cols], 1).flatten(0, 1)
        out_tiles = self(tiles[:, :-1], tiles[:, -1:]).unflatten(0, (b, -1))  # (B, n_tiles, 1, s*th, s*tw)
        sr = out_tiles.new_zeros(b, 1, scale * h, scale * w)
        for k, (r, c) in enumerate((r, c) for r in rows for c in cols):
            sr[:, :, scale * r:scale * (r + th), scale * c:scale * (c + tw)] = out_tiles[:, k]
        return {"sr": sr}


# --- the author's TensorFlow checkpoints ----------------------------------------------------------------------------

_TF_PREFIX = "model/layer_with_weights-"
_TF_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"


def tf_layer_order(n_resblocks: int = 8, n_frames: int = 7) -> list[str]:
    """Our module names in the order of the author's Keras layers with weights (``layer_with_weights-K``).

    Keras orders a functional model's layers by their depth from the output (deepest first). The
    3-D path is a chain; on the two parallel paths the mean frame's first convolution is as deep as
    the volume's last one, and comes first (the order Keras traced them), then the mean path's second.
    """
    blocks = [f"blocks.{i}.{name}" for i in range(n_resblocks) for name in ("expand", "linear", "conv")]
    return ["head", *blocks, *[f"reducers.{i}" for i in range(n_frames // 3)], "skip1", "tail", "skip2"]


def _tf_to_torch_kernel(v: np.ndarray) -> np.ndarray:
    # Keras kernels end with (in, out); their leading axes follow the data layout (B, H, W, T, C)
    if v.ndim == 5:  # Conv3D (kH, kW, kT, in, out) -> Conv3d over (B, C, T, H, W): (out, in, kT, kH, kW)
        return v.transpose(4, 3, 2, 0, 1)
    if v.ndim == 4:  # Conv2D (kH, kW, in, out) -> (out, in, kH, kW)
        return v.transpose(3, 2, 0, 1)
    raise ValueError(f"a convolution kernel must have 4 or 5 axes, got shape {v.shape}")


def state_from_tf(variables: dict[str, np.ndarray], n_resblocks: int = 8, n_frames: int = 7,
                  **kwargs) -> dict[str, torch.Tensor]:
    """The author's checkpoint variables -> a :class:`WDSR3D` state dict.

    Args:
        variables: ``model/layer_with_weights-K/{v,g,layer/bias}`` (with or without the bundle's
            ``/.ATTRIBUTES/VARIABLE_VALUE``), as :func:`utils.tfcheckpoint.read_tf_checkpoint`
            returns them; other keys (optimizer slots, ``initialized`` flags, counters) are ignored.
        n_resblocks, n_frames, kwargs: the :class:`WDSR3D` arguments the checkpoint was made with.

    Raises:
        KeyError: a layer's variable is missing. ValueError: a layer beyond the architecture or a
        shape that does not match (each named with the TF key and both shapes).
    """
    tf = {k.removesuffix(_TF_SUFFIX): v for k, v in variables.items()
          if k.startswith(_TF_PREFIX) and "/.OPTIMIZER_SLOT/" not in k}
    order = tf_layer_order(n_resblocks, n_frames)
    layers = {k.split("/")[1].removeprefix("layer_with_weights-") for k in tf}
    extra = sorted(layers - {str(k) for k in range(len(order))})
    if extra:
        raise ValueError(f"the checkpoint has layers {extra} beyond the {len(order)} of WDSR3D(n_resblocks="
                         f"{n_resblocks}, n_frames={n_frames})")
    expected = WDSR3D(n_resblocks=n_resblocks, n_frames=n_frames, **kwargs).state_dict()  # the shapes (a few ms)
    state = {}
    for k, name in enumerate(order):
        for ours, theirs in (("v", "v"), ("g", "g"), ("bias", "layer/bias")):
            key = f"{_TF_PREFIX}{k}/{theirs}"
            if key not in tf:
                raise KeyError(f"the checkpoint has no variable {key} (for {name}.{ours})")
            value = _tf_to_torch_kernel(tf[key]) if ours == "v" else tf[key]
            want = tuple(expected[f"{name}.{ours}"].shape)
            if value.shape != want:
                raise ValueError(f"{key}: shape {tf[key].shape} does not give {name}.{ours} of shape {want}")
            state[f"{name}.{ours}"] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    return state


def read_released(path: str | Path, n_resblocks: int = 8, n_frames: int = 7, **kwargs) -> dict[str, torch.Tensor]:
    """The author's released weights as a :class:`WDSR3D` state dict, from a checkpoint folder as
    released (its ``checkpoint`` file names the latest ``ckpt-N``), a ``ckpt-N.index`` or the prefix.

    Reads only the model's variables (not the optimizer's slots), checksums verified; nothing is
    executed. ``n_resblocks``, ``n_frames``, ``kwargs``: the :class:`WDSR3D` arguments (the released
    networks use the defaults). Errors: :class:`utils.tfcheckpoint.CheckpointError` (a damaged or
    foreign file), ``FileNotFoundError``, and those of :func:`state_from_tf`.
    """
    names = [n for n in list_tf_checkpoint(path)
             if n.startswith(_TF_PREFIX) and "/.OPTIMIZER_SLOT/" not in n and "/initialized/" not in n]
    return state_from_tf(read_tf_checkpoint(path, names), n_resblocks, n_frames, **kwargs)


def load_released(folder: str | Path, **kwargs) -> WDSR3D:
    """A :class:`WDSR3D` with the author's released weights (:func:`read_released`), e.g.
    ``load_released(".../wdsr-32-8-6-7-nir-all")``; ``kwargs``: :class:`WDSR3D` arguments (``tile``
    may be changed freely). Returns the model in eval mode, on the CPU."""
    model = WDSR3D(**kwargs)
    arch = {k: v for k, v in kwargs.items() if k not in ("tile",)}
    model.load_state_dict(read_released(folder, **arch))
    return model.eval()


def authors_network(checkout: str):
    """The author's own 3DWDSRNet (``WDSR3D/network.py``: ``wdsr_3d(3, 32, 8, 6, res_block_b, 7)`` as
    their ``train.py`` and ``predict.py`` build it) from a local checkout of frandorr/3DWDSRNet, as a
    :class:`models.authors.KerasNetwork`: its inputs are the 7 frames in DN ``(B,34,34,7,1)`` and their
    mean ``(B,34,34,1)``; its full-scene inference is their ``predict.py`` (``resolve`` on the 16
    reflect-padded 34x34 tiles, ``reconstruct_from_patches``). Needs TensorFlow with Keras 2 and
    TensorFlow Addons (``pip install tensorflow-cpu tf-keras tensorflow-addons click``), for
    benchmarks only. Their code is executed: use a checkout you trust. Never shipped here."""
    import os
    import sys

    from .authors import KerasNetwork, exec_source, legacy_keras
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before TensorFlow loads: tf.keras = Keras 2
    legacy_keras()
    root = Path(checkout)
    sys.path.insert(0, str(root))  # their predict.py imports WDSR3D.network
    network = exec_source(root / "WDSR3D" / "network.py", "WDSR3D.network")
    tf = sys.modules["tensorflow"]
    try:  # as many threads as torch uses, so that a comparison gives both sides the same cores
        tf.config.threading.set_intra_op_parallelism_threads(torch.get_num_threads())
        tf.config.threading.set_inter_op_parallelism_threads(torch.get_num_interop_threads())
    except RuntimeError:  # TensorFlow already started: its threads are set
        pass
    predict = exec_source(root / "predict.py", "wdsr3d_predict_authors")
    model = network.wdsr_3d(3, 32, 8, 6, network.res_block_b, 7)

    def inputs(lr: np.ndarray) -> list:
        frames = np.ascontiguousarray(lr.transpose(0, 2, 3, 1)[..., None] * FULL_SCALE, dtype=np.float32)
        return [frames, frames.mean(3)]

    def infer(lr: np.ndarray):
        padded = np.pad(lr[0], ((0, 0), (1, 1), (1, 1)), mode="reflect")  # (7, 130, 130)
        tiles = np.stack([padded[:, r:r + 34, c:c + 34] for r in range(0, 128, 32) for c in range(0, 128, 32)])
        frames, mean = inputs(tiles)
        return predict.reconstruct_from_patches(np.array(predict.resolve(model, frames, mean)))

    return KerasNetwork(model, inputs, infer)
