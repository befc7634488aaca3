"""TR-MISR: multi-image super-resolution with a transformer over the frames (An et al., IEEE JSTARS 2022).

Each frame, stacked with the pixel-wise median of the first 9 frames (its anchor), is encoded by
HighRes-net's residual CNN (:class:`models.highresnet.Encoder`). Every LR pixel then becomes a
sequence: one learned class token followed by that pixel's feature vector in each frame (no
positional encoding, so the frames form a set). A pre-norm transformer runs over each sequence,
with padded frames (alpha 0) masked out as keys, and the class token's output is the fused feature
of that pixel. A 1x1 convolution to ``scale**2`` channels, a PReLU and a pixel shuffle decode it.

Written from the authors' description and published configuration (Suanmd/TR-MISR); checkpoint-
compatible with their ``TRNet``: same parameter names, shapes and numerics. Their forward takes
``(lrs, alphas, maps, K)`` with ``K`` the (square) frame width; ours reads the frame size from the
input, works on non-square frames, and omits the optional per-pixel ``maps`` mask (their default
``maps=None``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .highresnet import Encoder, ViewsModel, check_alphas, map_reference_config, median_reference
from .layers import full_precision

__all__ = ["TRMISR", "kwargs_from_reference", "postprocess", "TRMISR_MAX"]

# TR-MISR truncates its output to the 14-bit range of the PROBA-V products, in [0, 1] units.
TRMISR_MAX = 16383 / 65535


def postprocess(sr):
    """TR-MISR's output step before scoring and submission (its ``val.py``/``test.py``): each SR
    image minus its own minimum, clipped to ``[0, 16383/65535]``.

    Args:
        sr: NumPy array or torch tensor ``(..., H, W)`` in [0,1] units; the minimum is taken per
            image (over the last two axes), as the authors do for their single ``(H, W)`` output.

    Returns:
        Same type, shape and dtype as ``sr``.
    """
    if isinstance(sr, torch.Tensor):
        return (sr - sr.amin(dim=(-2, -1), keepdim=True)).clamp(0, TRMISR_MAX)
    return (sr - sr.min(axis=(-2, -1), keepdims=True)).clip(0, TRMISR_MAX)  # NumPy


# Sequences (LR pixels) per attention kernel launch on CUDA. The fused SDPA kernels put the sequences
# on a grid axis of their own, and CUDA grids stop at 65535 there: a 128x128 scene is 16384 sequences,
# so full-scene validation at val_batch_size=4 makes 65536, one too many, and nothing verifies that
# torch splits them itself. (QA-Net's FrameAttention chunks the same way, models/layers.py.)
_ATTENTION_ROWS = 32768


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None, scale: float,
               rows: int) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)`` on ``(N, heads, n, d)``,
    run on at most ``rows`` sequences at a time and concatenated: the same values, and the gradients
    flow through ``torch.cat``.

    ``keep`` is ``(N,1,1,n)`` bool, sliced along with the sequences, or broadcastable with a leading
    dimension of 1 (or fewer dimensions), passed whole to every chunk.
    """
    n = q.shape[0]
    if n <= rows:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)
    per_sequence = keep is not None and keep.dim() == q.dim() and keep.shape[0] == n
    return torch.cat([
        F.scaled_dot_product_attention(q[i:i + rows], k[i:i + rows], v[i:i + rows],
                                       attn_mask=keep[i:i + rows] if per_sequence else keep, scale=scale)
        for i in range(0, n, rows)])


def _attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None,
                   scale: float) -> torch.Tensor:
    """:func:`_attention` on a CPU, as two batched matrix products around a softmax: with sequences
    this short (the frames, 25) oneDNN's fused kernel trains 1.2x slower, its backward recomputing
    what the products keep. ``keep`` None: every frame real, no mask."""
    logits = torch.matmul(q * scale, k.transpose(-1, -2))  # (N, heads, n, n)
    if keep is not None:
        logits = logits.masked_fill_(~keep, float("-inf"))  # the product's own output: free to overwrite
    return torch.matmul(logits.softmax(-1), v)


class FrameSelfAttention(nn.Module):
    """Multi-head self-attention over a sequence of frame tokens, padded frames masked as keys.

    ``forward(x (N,n,dim), keep (N,1,1,n) bool, True = may be attended to; None = every frame)
    -> (N,n,dim)``.
    """

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        # the authors scale the logits by the model width, 1/sqrt(dim), not by the head width
        self.scale = dim ** -0.5
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        # the projection holds q, k, v one after the other, each split into heads: (3, heads, d)
        q, k, v = self.to_qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # each (N,h,n,d)
        # masked logits become -inf (the authors: -float32 max); the same weights, as the class
        # token is never masked and no row is empty
        # on CUDA in chunks (see _ATTENTION_ROWS)
        if q.device.type == "cpu":
            out = _attention_cpu(q, k, v, keep, self.scale)
        else:
            out = _attention(q, k, v, keep, self.scale, _ATTENTION_ROWS if q.is_cuda else q.shape[0])
        return self.to_out(out.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    """Linear, GELU, dropout, linear, dropout; ``(N,n,dim) -> (N,n,dim)``."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn


class PreNormResidual(nn.Module):
    """``x + fn(LayerNorm(x), *args)``. Nested so that the parameters are named ``fn.norm.*`` and
    ``fn.fn.*``, the authors' keys."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.fn = _PreNorm(dim, fn)

    def forward(self, x: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        return x + self.fn.fn(self.fn.norm(x), *args)


class Transformer(nn.Module):
    """``depth`` pre-norm layers of attention and feed-forward; ``forward(x (N,n,dim), keep) -> (N,n,dim)``."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList([
            nn.ModuleList([PreNormResidual(dim, FrameSelfAttention(dim, heads, dropout)),
                           PreNormResidual(dim, FeedForward(dim, mlp_dim, dropout))])
            for _ in range(depth)])

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        for attention, feed_forward in self.layers:
            x = feed_forward(attention(x, keep))
        return x


class ClassTokenFusion(nn.Module):
    """The authors' ``SuperResTransformer``: prepend a learned token, run the transformer, keep the token.

    ``forward(tokens (N,L,dim), keep (N,L) bool) -> (N,dim)``.
    """

    def __init__(self, dim: int, depth: int, heads: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.transformer = Transformer(dim, depth, heads, mlp_dim, dropout)

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(n, -1, -1), tokens], 1)
        keep = F.pad(keep, (1, 0), value=True)[:, None, None, :]  # the class token is always attended to
        if keep.device.type == "cpu" and bool(keep.all()):  # on a CPU (no sync to avoid): skip the mask
            keep = None
        return self.transformer(x, keep)[:, 0]


class PixelShuffleDecoder(nn.Module):
    """Convolution to ``scale**2`` channels, PReLU, pixel shuffle; ``(N,c,h,w) -> (N,1,scale*h,scale*w)``."""

    def __init__(self, channels: int, scale: int, kernel_size: int):
        super().__init__()
        self.scale = scale
        self.final = nn.Sequential(nn.Conv2d(channels, scale * scale, kernel_size, padding=kernel_size // 2),
                                   nn.PReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(full_precision(self.final, x), self.scale)  # float32 under autocast


class TRMISR(ViewsModel):
    """TR-MISR.

    Args (the authors' ``config.json`` keys in brackets; defaults are their published configuration):
        median_reference (encoder.in_channels 2 / 1): stack each frame with the median of the first
            9 frames, or encode the frame alone.
        n_feats (encoder.channel_size = transformer.dim = final.in_channels): feature channels.
        n_resblocks (encoder.num_layers): residual blocks in the encoder.
        kernel_size (encoder.kernel_size): encoder convolutions.
        depth (transformer.depth), n_heads (transformer.heads), mlp_dim (transformer.mlp_dim),
        dropout (transformer.dropout): the transformer.
        final_kernel_size (final.kernel_size): the decoder's convolution.
        scale: upscaling factor (3, fixed in the authors' code).

    ``forward(lrs (B,L,h,w) in [0,1] (uint16/65535), alphas (B,L) in {0,1}, 1 = real frame, None = all)
    -> (B,1,scale*h,scale*w)``, SR in [0,1] units, not clamped; the last PReLU lets it go negative.
    (The authors' evaluation subtracts the image's minimum and clips to [0, 16383/65535].)
    Padded frames never reach the output as long as the first 9 frames (the anchor's) are real.
    """

    registry_name = "trmisr"

    def __init__(self, median_reference: bool = True, n_feats: int = 64, n_resblocks: int = 2, kernel_size: int = 3,
                 depth: int = 6, n_heads: int = 8, mlp_dim: int = 128, dropout: float = 0.1,
                 final_kernel_size: int = 1, scale: int = 3):
        super().__init__()
        self.median_reference = median_reference
        self.encode = Encoder(2 if median_reference else 1, n_feats, n_resblocks, kernel_size)
        self.superres = ClassTokenFusion(n_feats, depth, n_heads, mlp_dim, dropout)
        self.decode = PixelShuffleDecoder(n_feats, scale, final_kernel_size)

    def forward(self, lrs: torch.Tensor, alphas: torch.Tensor | None = None) -> torch.Tensor:
        b, t, h, w = lrs.shape
        alphas = check_alphas(lrs, alphas, "TRMISR")
        if self.median_reference:
            x = torch.stack([lrs, median_reference(lrs).expand(b, t, h, w)], 2).flatten(0, 1)
        else:
            x = lrs.reshape(b * t, 1, h, w)
        feats = self.encode(x)  # (B*L, C, h, w)
        c = feats.shape[1]
        # one sequence per LR pixel: (B,L,C,h,w) -> (B*h*w, L, C)
        tokens = feats.view(b, t, c, h, w).permute(0, 3, 4, 1, 2).reshape(b * h * w, t, c)
        keep = (alphas > 0).repeat_interleave(h * w, 0)  # (B*h*w, L), the scene's alphas at each of its pixels
        fused = self.superres(tokens, keep)  # (B*h*w, C)
        return self.decode(fused.view(b, h, w, c).permute(0, 3, 1, 2))


TRMISR_NAMES = {
    "encoder.channel_size": "n_feats", "encoder.num_layers": "n_resblocks", "encoder.kernel_size": "kernel_size",
    "transformer.depth": "depth", "transformer.heads": "n_heads", "transformer.mlp_dim": "mlp_dim",
    "transformer.dropout": "dropout", "decoder.final.kernel_size": "final_kernel_size",
}
TRMISR_TIED = {
    "transformer.dim": lambda k: k["n_feats"],
    "decoder.final.in_channels": lambda k: k["n_feats"],
}


def kwargs_from_reference(config: dict) -> dict:
    """The authors' nested ``network`` config (``encoder``, ``transformer``, ``decoder``) -> :class:`TRMISR`
    keyword arguments; unknown keys are a ``KeyError`` naming them."""
    in_channels = config.get("encoder", {}).get("in_channels", 2)
    if in_channels not in (1, 2):
        raise ValueError(f"TRMISR: reference config encoder.in_channels={in_channels!r} is not supported (1 or 2)")
    # encoder.in_channels is not a rename: it chooses median_reference
    kwargs = map_reference_config(TRMISR, config, TRMISR_NAMES, {**TRMISR_TIED, "encoder.in_channels": None})
    if "in_channels" in config.get("encoder", {}):
        kwargs["median_reference"] = in_channels == 2
    return kwargs


def authors_network(checkout: str) -> nn.Module:
    """The authors' own TR-MISR (``src/DeepNetworks/TRNet.py``, which needs ``einops``) at their
    ``config/config.json``, from a local checkout of Suanmd/TR-MISR, behind ``forward(lr)`` (every
    view real, no maps, ``K`` the frame side as their training and validation pass it); for benchmarks
    against their code. Their code is executed: use a checkout you trust. Never shipped here."""
    from .authors import views_network
    return views_network(checkout, "src/DeepNetworks/TRNet.py", "TRNet", "config/config.json", "trmisr_authors",
                         lambda lr: {"maps": None, "K": lr.shape[-1]})
