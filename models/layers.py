"""Building blocks shared by QA-Net and PIUnet, on a frame-batched layout.

Both networks work on a stack of frames per scene. The authors keep features as 5-D tensors
``(B, C, T, H, W)`` and move between that, ``(B*T, C, H, W)`` and ``(T, B*H*W, C)`` with many
reshapes. Here features stay ``(B*T, C, H, W)`` throughout: a ``1x3x3`` 3-D convolution is then a
plain 2-D convolution, a BatchNorm3d over channels is a BatchNorm2d, and only the attention over
the frame axis needs a transposed copy. Every block also works on channels-last tensors
(:func:`request_channels_last`), without extra copies. Parameter names and shapes are those of the authors'
modules, so their checkpoints load unchanged.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def full_precision(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` computed in float32 (or float64 for a float64 ``x``) even inside an autocast region.

    For the last layer of a network, whose output is the SR image itself: under bf16 autocast a
    convolution returns bf16, 8 bits of mantissa, which quantises an SR of about 13,000 DN to steps
    of 64 DN before the loss, the score and the submission. Everything before it keeps autocast's
    speed; this one layer (a few channels at most) costs little in float32."""
    kind = x.device.type
    if not (torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)):
        return layer(x)
    with torch.autocast(kind, enabled=False):
        return layer(x if x.dtype == torch.float64 else x.float())


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether a 4-D tensor is stored channels-last (and not also plainly contiguous, as when C=1)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def request_channels_last(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Ask QA-Net, PIUnet or 3DWDSRNet to lay out its features channels-last (NHWC; NDHWC for
    3DWDSRNet's volumes), the layout that oneDNN (CPU) and tensor cores (CUDA) convolve fastest.
    Only sets the flag ``model.memory_format`` that the forward reads: the weights stay as they are
    and nothing is copied now. The same numerics up to float rounding; returns ``model``."""
    model.memory_format = torch.channels_last if enabled else torch.contiguous_format
    return model


class FrameConv(nn.Module):
    """The authors' ``Conv3d(c_in, c_out, [1,3,3], padding=[0,1,1])``, applied as a 2-D convolution.

    Parameters keep the 3-D shape ``(c_out, c_in, 1, 3, 3)`` (checkpoint compatibility).
    ``forward(x (N, c_in, H, W)) -> (N, c_out, H, W)``.
    """

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        ref = nn.Conv3d(c_in, c_out, (1, 3, 3), padding=(0, 1, 1))  # for the default initialisation
        self.weight = nn.Parameter(ref.weight.detach().clone())
        self.bias = nn.Parameter(ref.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight[:, :, 0], self.bias, padding=1)


_ATTENTION_ROWS = 32768  # sequences per attention kernel launch on CUDA


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v`` on ``(N, heads, T, d)``, as ``nn.MultiheadAttention`` computes it."""
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1))
    return torch.matmul(scores.softmax(-1).to(v.dtype), v)


class FrameAttention(nn.Module):
    """Multi-head attention across the frames of each pixel, with ``nn.MultiheadAttention``'s
    parameters (``in_proj_weight (3C,C)``, ``in_proj_bias``, ``out_proj``) and numerics.

    Unlike ``nn.MultiheadAttention`` it never computes the averaged attention weights, and it works
    directly on frame-batched features: ``forward(query (B*T,C,H,W), key_value (B*T,C,H,W) or
    None for self-attention, frames=T) -> (B*T,C,H,W)``. No positional encoding: permuting the
    frames permutes the output the same way.
    """

    def __init__(self, channels: int, heads: int = 1):
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels={channels} is not divisible by heads={heads}")
        ref = nn.MultiheadAttention(channels, heads, bias=True)  # for the default initialisation
        self.heads = heads
        self.in_proj_weight = nn.Parameter(ref.in_proj_weight.detach().clone())
        self.in_proj_bias = nn.Parameter(ref.in_proj_bias.detach().clone())
        self.out_proj = nn.Linear(channels, channels)
        self.out_proj.load_state_dict(ref.out_proj.state_dict())

    @staticmethod
    def _to_seq(x: torch.Tensor, frames: int) -> torch.Tensor:
        # (B*T, C, H, W) -> (B*H*W, T, C): one sequence of T frames per pixel (one copy either layout)
        bt, c, h, w = x.shape
        if is_channels_last(x):
            return x.permute(0, 2, 3, 1).reshape(bt // frames, frames, h * w, c).transpose(1, 2).reshape(-1, frames, c)
        return x.view(bt // frames, frames, c, h * w).permute(0, 3, 1, 2).reshape(-1, frames, c)

    @staticmethod
    def _from_seq(y: torch.Tensor, shape: torch.Size, frames: int, channels_last: bool) -> torch.Tensor:
        # (B*H*W, T, C) -> (B*T, C, H, W), in the layout of the input
        bt, c, h, w = shape
        y = y.view(bt // frames, h * w, frames, c)
        if channels_last:
            return y.transpose(1, 2).reshape(bt, h, w, c).permute(0, 3, 1, 2)
        return y.permute(0, 2, 3, 1).reshape(bt, c, h, w)

    def forward(self, query: torch.Tensor, key_value: torch.Tensor | None = None, frames: int = 1) -> torch.Tensor:
        bt, c, h, w = query.shape
        if bt % frames:
            raise ValueError(f"FrameAttention: {bt} frames in the batch is not a multiple of T={frames}")
        heads, d = self.heads, c // self.heads
        q_in = self._to_seq(query, frames)
        if key_value is None:
            q, k, v = F.linear(q_in, self.in_proj_weight, self.in_proj_bias).chunk(3, -1)
        else:
            kv_in = self._to_seq(key_value, frames)
            q = F.linear(q_in, self.in_proj_weight[:c], self.in_proj_bias[:c])
            k, v = F.linear(kv_in, self.in_proj_weight[c:], self.in_proj_bias[c:]).chunk(2, -1)
        n = q.shape[0]
        q, k, v = (t.reshape(n, frames, heads, d).transpose(1, 2) for t in (q, k, v))
        # (N, heads, T, d). T is a handful of frames. On CUDA the attention is written out as three
        # small batched products, which train 1.2-1.6x faster there than the fused SDPA kernels (those
        # pad the head size to 64 and are built for long sequences); CUDA grids stop at 65535 rows and
        # a 128x128 scene has 16384 sequences, so full-scene batches go through in chunks. On CPU the
        # fused kernel is the faster one (PIUnet's step takes 1.2x longer with the products).
        step = max(1, _ATTENTION_ROWS // heads)
        if q.is_cuda and n > step:
            out = torch.cat([_attention(q[i:i + step], k[i:i + step], v[i:i + step]) for i in range(0, n, step)])
        elif q.is_cuda:
            out = _attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = self.out_proj(out.transpose(1, 2).reshape(n, frames, c))
        return self._from_seq(out, query.shape, frames, is_channels_last(query))


def frame_norm(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """The authors' ``BatchNorm3d(T)`` on ``(B, T, C, H, W)`` -- one statistic per frame index, over
    the batch, the channels and the pixels -- applied with ``bn`` (a ``BatchNorm2d(T)``, or the
    ``SyncBatchNorm(T)`` it becomes under DDP) to frame-batched features ``x (B*T,C,H,W)`` ->
    ``(B*T,C,H,W)``.

    A function, not a BatchNorm subclass with its own forward: ``SyncBatchNorm.convert_sync_batchnorm``
    (what DDP recipes call) replaces every BatchNorm module by a plain ``SyncBatchNorm`` and would
    drop a reshape that lived inside it. Kept here, the reshape survives the conversion and the
    state-dict keys stay the authors' (``tnorm1.weight``, ``tnorm1.running_mean``, ...).
    """
    bt, c, h, w = x.shape
    t = bn.num_features
    if bt % t:
        raise ValueError(f"this model was built for T={t} frames; got a batch of {bt} frames")
    if is_channels_last(x):  # physically (B*T, H, W, C): normalise (B, T, H*W*C, 1), a view
        y = bn(x.permute(0, 2, 3, 1).reshape(bt // t, t, h * w * c, 1))
        return y.reshape(bt, h, w, c).permute(0, 3, 1, 2)
    return bn(x.view(bt // t, t, c * h, w)).view(bt, c, h, w)


__all__ = ["FrameConv", "FrameAttention", "frame_norm", "full_precision", "is_channels_last", "request_channels_last"]
