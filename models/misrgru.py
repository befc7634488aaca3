"""MISR-GRU: multi-image super-resolution with convolutional GRUs (Rifat Arefin et al., CVPRW 2020).

Frames and their anchor (the pixel-wise median of the first 9 frames) are encoded by one shared
residual CNN (``unit1``); each frame's features, concatenated with the anchor's, are co-registered
by a second one (``unit2``). A stack of convolutional GRUs runs over the frames in their given
order, and the outputs of the last GRU at the real frames (alpha 1) are averaged. The decoder of
HighRes-net (:class:`models.highresnet.Decoder`) upscales the result.

Checkpoint-compatible with the authors' implementation (rarefin/MISR-GRU, ``MISRGRU``): same
parameter names, shapes and numerics. Their released ``MISR-GRU.pth`` was saved from an older
layout (``encode.unit1.*``); :func:`convert_released_state` maps it to the repository's (``unit1.*``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from .highresnet import Decoder, Encoder, ViewsModel, check_alphas, map_reference_config, median_reference

__all__ = ["MISRGRU", "ConvGRUCell", "kwargs_from_reference", "convert_released_state"]


class ConvGRUCell(nn.Module):
    """Convolutional GRU cell (the authors' ``ConvGRUUnit``).

    ``forward(x (N,c_in,H,W), h (N,c_h,H,W)) -> h' (N,c_h,H,W)``, where
    ``z = sigmoid(W_z [x,h])``, ``r = sigmoid(W_r [x,h])``, ``h' = (1-z) h + z tanh(W_o [x, r*h])``.
    """

    def __init__(self, in_channels: int, hidden_channels: int, kernel_size: int):
        super().__init__()
        self.hidden_channels = hidden_channels
        pad = kernel_size // 2
        self.reset_gate = nn.Conv2d(in_channels + hidden_channels, hidden_channels, kernel_size, padding=pad)
        self.update_gate = nn.Conv2d(in_channels + hidden_channels, hidden_channels, kernel_size, padding=pad)
        self.out_gate = nn.Conv2d(in_channels + hidden_channels, hidden_channels, kernel_size, padding=pad)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        xh = torch.cat([x, h], 1)
        update = torch.sigmoid(self.update_gate(xh))
        reset = torch.sigmoid(self.reset_gate(xh))
        candidate = torch.tanh(self.out_gate(torch.cat([x, reset * h], 1)))
        return (1 - update) * h + update * candidate


class GRUFusion(nn.Module):
    """Stacked ConvGRUs over the frame axis, then the alpha-weighted mean of the last layer's outputs.

    ``forward(x (B,L,C,H,W), alphas (B,L)) -> (B,c_h,H,W)``.
    """

    def __init__(self, in_channels: int, hidden_channels: Sequence[int], kernel_sizes: Sequence[int]):
        super().__init__()
        ins = [in_channels, *hidden_channels[:-1]]
        self.gru_units = nn.ModuleList([ConvGRUCell(c_in, c_h, k)
                                        for c_in, c_h, k in zip(ins, hidden_channels, kernel_sizes, strict=True)])

    def forward(self, x: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
        b, t, _, h, w = x.shape
        for cell in self.gru_units:
            state = x.new_zeros(b, cell.hidden_channels, h, w)  # the authors start every layer from zeros
            outs = []
            for i in range(t):
                state = cell(x[:, i], state)
                outs.append(state)
            x = torch.stack(outs, 1)
        # padded frames still run through the GRUs; they are causal, so trailing padding never
        # reaches a real frame's output, and the mean leaves the padded outputs out
        a = alphas[:, :, None, None, None]
        return (x * a).sum(1) / a.sum(1)


class MISRGRU(ViewsModel):
    """MISR-GRU.

    Args (the authors' ``config.json`` keys in brackets; defaults are their published configuration):
        n_feats (encoder.channel_size = fusion.in_channels): encoder channels.
        n_resblocks (encoder.num_res_blocks): residual blocks in each encoder unit.
        kernel_size (encoder.kernel_size): encoder convolutions.
        gru_channels (fusion.hidden_channels; its length is fusion.num_hidden_layers): the GRU layers.
        gru_kernel_sizes (fusion.kernel_sizes): their convolutions, one per layer.
        deconv_channels (deconv.out_channels = final.in_channels): channels after the transposed convolution.
        scale (deconv.stride = deconv.kernel_size): upscaling factor.
        final_kernel_size (final.kernel_size): the last convolution.

    ``forward(lrs (B,L,h,w) in [0,1] (uint16/65535), alphas (B,L) in {0,1}, 1 = real frame, None = all)
    -> (B,1,scale*h,scale*w)``, SR in [0,1] units, not clamped (the authors clip to [0,1] to score).
    Frames are expected clearest first with padding last: the anchor is the median of the first 9
    frames and the GRUs read the frames in order. Any ``L >= 1`` with at least one real frame.
    """

    registry_name = "misrgru"

    def __init__(self, n_feats: int = 64, n_resblocks: int = 2, kernel_size: int = 3,
                 gru_channels: Sequence[int] = (64, 64), gru_kernel_sizes: Sequence[int] = (3, 3),
                 deconv_channels: int = 64, scale: int = 3, final_kernel_size: int = 1):
        super().__init__()
        gru_channels, gru_kernel_sizes = [int(c) for c in gru_channels], [int(k) for k in gru_kernel_sizes]
        if not gru_channels or len(gru_channels) != len(gru_kernel_sizes):
            raise ValueError(f"misrgru: gru_channels {gru_channels} and gru_kernel_sizes {gru_kernel_sizes} "
                             "must be non-empty and of one length")
        # registered in the authors' order, so that state_dict() lists the keys as theirs does
        self.unit1 = Encoder(1, n_feats, n_resblocks, kernel_size)
        self.fuse = GRUFusion(n_feats, gru_channels, gru_kernel_sizes)
        self.decode = Decoder(gru_channels[-1], deconv_channels, scale, final_kernel_size)
        self.unit2 = Encoder(2 * n_feats, n_feats, n_resblocks, kernel_size)  # frame and anchor features

    def forward(self, lrs: torch.Tensor, alphas: torch.Tensor | None = None) -> torch.Tensor:
        b, t, h, w = lrs.shape
        alphas = check_alphas(lrs, alphas, "MISRGRU")
        frames = self.unit1(lrs.reshape(b * t, 1, h, w))  # (B*L, C, h, w)
        anchor = self.unit1(median_reference(lrs))  # (B, C, h, w): encoded once, shared by the frames
        anchor = anchor.unsqueeze(1).expand(b, t, *anchor.shape[1:]).flatten(0, 1)
        x = self.unit2(torch.cat([frames, anchor], 1)).unflatten(0, (b, t))
        return self.decode(self.fuse(x, alphas.to(x.dtype)))


_RELEASED_PREFIXES = {"encode.unit1.": "unit1.", "encode.unit2.": "unit2."}


def convert_released_state(state_dict: dict) -> dict:
    """The released ``MISR-GRU.pth`` keys (``encode.unit1.*``, ``encode.unit2.*``) -> the repository's
    (``unit1.*``, ``unit2.*``); other keys unchanged. A state dict already in the repository's
    layout comes back as it is."""
    out = {}
    for key, value in state_dict.items():
        for old, new in _RELEASED_PREFIXES.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


MISRGRU_NAMES = {
    "encoder.channel_size": "n_feats", "encoder.num_res_blocks": "n_resblocks", "encoder.kernel_size": "kernel_size",
    "fusion.hidden_channels": "gru_channels", "fusion.kernel_sizes": "gru_kernel_sizes",
    "decoder.deconv.out_channels": "deconv_channels", "decoder.deconv.stride": "scale",
    "decoder.final.kernel_size": "final_kernel_size",
}
MISRGRU_TIED = {
    "encoder.in_channels": lambda k: 1,  # one frame per encoder call
    "fusion.in_channels": lambda k: k["n_feats"],
    "fusion.num_hidden_layers": lambda k: len(k["gru_channels"]),
    "decoder.deconv.in_channels": lambda k: list(k["gru_channels"])[-1],
    "decoder.deconv.kernel_size": lambda k: k["scale"],  # otherwise the output is not scale*h
    "decoder.final.in_channels": lambda k: k["deconv_channels"],
    "decoder.final.out_channels": lambda k: 1,
}


def kwargs_from_reference(config: dict) -> dict:
    """The authors' nested ``network`` config (``encoder``, ``fusion``, ``decoder``) -> :class:`MISRGRU`
    keyword arguments; unknown keys are a ``KeyError`` naming them."""
    return map_reference_config(MISRGRU, config, MISRGRU_NAMES, MISRGRU_TIED)


def authors_network(checkout: str) -> nn.Module:
    """The authors' own MISR-GRU (``src/DeepNetworks/MISRGRU.py``) at their ``config.json``, from a local
    checkout of rarefin/MISR-GRU, behind ``forward(lr)`` (every view real); for benchmarks against
    their code. Their code is executed: use a checkout you trust. Never shipped here."""
    from .authors import views_network
    return views_network(checkout, "src/DeepNetworks/MISRGRU.py", "MISRGRU", "config.json", "misrgru_authors")
