"""The GPU paths proven on a CPU, with stand-ins for what only a GPU has: a dispatch-mode scan for what
CUDA-graph capture forbids, an emulated graphed backward, a process group that records the device of
each reduced tensor, SyncBatchNorm conversion, bf16 autocast, and checkpoints written on a GPU read
here. ``tests/test_cuda.py`` and ``python bench.py gpu-check`` run the same paths on a real GPU."""
from __future__ import annotations

import copy
import json
import traceback

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel
from torch.utils._python_dispatch import TorchDispatchMode

import predict
import train
import valid
from config import PRESETS, Config, ConfigError, parse_args
from conftest import TINY_PIUNET, TINY_QANET, common_args
from engine.checkpoint import load_checkpoint
from engine.keeper import CheckpointKeeper
from engine.trainer import Trainer
from models import TRAINABLE, build_model, model_kwargs, request_channels_last
from utils.runtime import Dist, atomic_torch_save, open_device

# small configurations of every trainable model, with BatchNorms where the model has them
SMALL = {"qanet": dict(n_modules=1, n_resblocks=1, n_feats=8, reduction=4, n_frames=4, rcab_bn=True),
         "piunet": dict(n_feats=8, r_bneck=4, n_tefa=1),
         "highresnet": dict(n_feats=8, deconv_channels=8),
         "misrgru": dict(n_feats=8, gru_channels=(8,), gru_kernel_sizes=(3,), deconv_channels=8),
         "trmisr": dict(n_feats=8, depth=1, n_heads=2, mlp_dim=8, dropout=0.0),
         "wdsr3d": dict(n_feats=8, n_resblocks=1, expansion=2, n_frames=7)}


def _small(name: str) -> nn.Module:
    return build_model(name, **SMALL[name])


def _inputs(batch: int, frames: int, side: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    lr = torch.rand(batch, frames, side, side, generator=g) * 0.3 + 0.1
    mask = (torch.rand(batch, frames, side, side, generator=g) > 0.2).float()
    alphas = torch.ones(batch, frames)
    alphas[-1, frames // 2:] = 0  # padding views in the last sample (read by the zoo models)
    return lr, mask, alphas


def _randomize_batchnorms(net: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return net


# --- 1. capture safety -------------------------------------------------------------------------------

# what CUDA-graph capture forbids: host data copied in (torch.tensor of a NumPy array or a list),
# and anything that makes the host wait for the device (a value read back, a data-dependent shape)
FORBIDDEN = {"lift_fresh", "lift_fresh_copy", "_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero",
             "masked_select"}


def _boolean_index(name: str, args) -> bool:
    """``x[mask]`` and ``x[mask] = v``: a data-dependent shape, computed with a hidden ``nonzero``."""
    return name in ("index", "index_put", "index_put_") and any(
        isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) or ())


class CaptureGuard(TorchDispatchMode):
    """Fails on the first operation that CUDA-graph capture forbids, naming it and where it was called."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in FORBIDDEN or _boolean_index(name, args):
            where = "".join(traceback.format_stack(limit=6)[:-1])
            raise AssertionError(f"aten.{name} cannot be captured in a CUDA graph; called from\n{where}")
        return func(*args, **(kwargs or {}))


def test_capture_guard_catches_host_copies_and_syncs():
    """The guard itself can fail: each forbidden pattern a model could contain is caught."""
    x = torch.rand(3)
    for bad in (lambda: x + torch.tensor(np.ones(3)), lambda: x.sum().item(), lambda: x[x > 0.5],
                lambda: bool(x.sum() > 0), lambda: x.nonzero(),
                lambda: x.clone().__setitem__(x > 0.5, 0.0)):
        with pytest.raises(AssertionError, match="cannot be captured"), CaptureGuard():
            bad()
    with CaptureGuard():  # factory functions on a device are fine
        torch.arange(3, dtype=torch.float64) * x.double()


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_model_is_capture_safe(preset):
    """Forward and backward of the preset's model at the preset's size (its model arguments, batch,
    frames and patch side, channels-last as trained) run nothing that CUDA-graph capture forbids (e.g.
    the ESA-baseline residual once copied its kernel in from NumPy). On the meta device: every
    operation is dispatched, none computed, so the full-size models take seconds."""
    cfg = Config(preset=preset).replace(**PRESETS[preset])
    with torch.device("meta"):
        net = build_model(cfg.model, **model_kwargs(cfg.model, cfg.model_args, cfg.n_frames)).train()
    request_channels_last(net, cfg.channels_last)
    lr, mask, alphas = (x.to("meta") for x in _inputs(cfg.batch_size, cfg.n_frames, cfg.patch_size))
    with CaptureGuard():
        out = net.super_resolve(lr, mask, alphas)
        sum(v.float().mean() for v in out.values()).backward()
    assert out["sr"].shape == (cfg.batch_size, 1, 3 * cfg.patch_size, 3 * cfg.patch_size)
    assert all(p.grad is not None for p in net.parameters())


# --- 9. float32 SR under bf16 autocast ---------------------------------------------------------------------

@pytest.mark.parametrize("name", TRAINABLE)
def test_sr_is_float32_under_bf16_autocast(name):
    """bf16 is used inside the network, but the SR (and PIUnet's scale) leave it in float32: not
    quantised to bf16's 8-bit mantissa (64 DN near 13,000 DN)."""
    torch.manual_seed(0)
    net = _small(name).eval()
    frames = SMALL.get(name, {}).get("n_frames", 4)
    lr, mask, alphas = _inputs(2, frames, 8)
    used = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: used.append(o.dtype) if isinstance(o, torch.Tensor) else None)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = net.super_resolve(lr, mask, alphas)
    finally:
        hook.remove()
    assert torch.bfloat16 in used, "autocast did not reach the network"
    for key, v in out.items():
        assert v.dtype == torch.float32, f"{name} {key} is {v.dtype}"
        assert not torch.equal(v, v.to(torch.bfloat16).float()), f"{name} {key} lies on the bf16 grid"


# --- 4. SyncBatchNorm --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TRAINABLE)
def test_sync_batchnorm_conversion_keeps_every_model(name):
    """``convert_sync_batchnorm`` (what DDP recipes call) changes no output, in eval mode and (one
    process: batch statistics) in training mode, and the EMA copy of the converted network too.
    QA-Net's per-frame BatchNorms once lost their reshape in the conversion."""
    torch.manual_seed(0)
    net = _randomize_batchnorms(_small(name))
    frames = SMALL.get(name, {}).get("n_frames", 4)
    lr, mask, alphas = _inputs(2, frames, 8)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(net))
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) or not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    ema = AveragedModel(synced, use_buffers=True)
    with torch.no_grad():
        for mode in ("eval", "train"):
            outs = [m.train(mode == "train").super_resolve(lr, mask, alphas)["sr"]
                    for m in (copy.deepcopy(net), copy.deepcopy(synced), copy.deepcopy(ema.module))]
            for other in outs[1:]:
                torch.testing.assert_close(other, outs[0], rtol=1e-5, atol=1e-6, msg=f"{name} {mode}")


def test_qanet_per_frame_norm_survives_conversion_when_features_equal_frames():
    """With n_feats == n_frames a dropped reshape would normalise the channel axis silently."""
    net = _randomize_batchnorms(build_model("qanet", n_modules=1, n_resblocks=1, n_feats=4, reduction=2, n_frames=4))
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(net)).eval()
    lr, mask, _ = _inputs(2, 4, 8)
    with torch.no_grad():
        torch.testing.assert_close(synced.super_resolve(lr, mask)["sr"], net.eval().super_resolve(lr, mask)["sr"])


# --- 2 and 7. the training loop under an emulated CUDA graph ------------------------------------------------

def emulated_capture(module: nn.Module, sample_args: tuple, amp: str) -> nn.Module:
    """A CPU stand-in for :func:`utils.runtime.cuda_graphed`, with the two behaviours of
    ``torch.cuda.make_graphed_callables`` that reach the training loop: its backward writes every
    parameter's gradient into a static buffer, overwritten by the next replay, and hands autograd
    that buffer (detached); and a parameter the loss does not reach gets zeros, not None."""
    params = [p for p in module.parameters() if p.requires_grad]
    static = [torch.zeros_like(p) for p in params]
    n_args = len(sample_args)

    class Replay(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            with torch.enable_grad():
                out = module(*inputs[:n_args])
            ctx.keys, ctx.outputs = list(out), tuple(out.values())
            Replay.keys = ctx.keys
            return tuple(o.detach() for o in ctx.outputs)

        @staticmethod
        def backward(ctx, *grads):
            found = torch.autograd.grad(ctx.outputs, params, grads, allow_unused=True)
            for buf, g in zip(static, found, strict=True):
                buf.copy_(g) if g is not None else buf.zero_()
            return (None,) * n_args + tuple(b.detach() for b in static)

    class Graphed(nn.Module):
        def forward(self, *args):
            outs = Replay.apply(*args, *params)
            return dict(zip(Replay.keys, outs, strict=True))

    return Graphed()


def _batches(cfg: Config, n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    b, t, p = cfg.batch_size, cfg.n_frames, cfg.patch_size
    out = []
    for i in range(n):
        lr, mask, alphas = _inputs(b, t, p, seed=seed * 100 + i)
        hr = torch.nn.functional.interpolate(lr[:, :1], scale_factor=3, mode="bilinear") + 0.01 * torch.rand(
            b, 1, 3 * p, 3 * p, generator=g)
        out.append(dict(lr=lr, lr_mask=mask, alphas=alphas, hr=hr, hr_mask=(torch.rand(hr.shape, generator=g) > 0.1)
                        .float(), name=[f"s{i}"] * b))
    return out


def _train(cfg: Config, batches: list[dict], steps: int, tmp_path, graphed: bool) -> Trainer:
    torch.manual_seed(cfg.seed)
    trainer = Trainer(cfg, Dist(), torch.device("cpu"))
    if graphed:
        trainer.capture = emulated_capture
    keeper = CheckpointKeeper(tmp_path, 0, 0.0)
    it = iter(batches)
    for _ in range(steps):
        trainer.train_step(it, keeper)
    return trainer


def _config(tiny: list[str], **kw) -> Config:
    return parse_args(tiny + ["--device=cpu", "--batch_size=2", "--patch_size=8", "--lr=1e-2", "--grad_clip=0",
                              "--channels_last=false"]).replace(**kw)


@pytest.mark.parametrize("tiny", [TINY_QANET, TINY_PIUNET], ids=["qanet", "piunet"])
def test_accumulation_under_graphs_equals_eager(tiny, tmp_path):
    """Two micro-batches per step: the graphed loop sums both micro-batches' gradients as eager
    autograd does (a replay once overwrote the first: the sum read twice the last)."""
    cfg = _config(tiny + ["--n_frames=4"], accum_steps=2, weight_decay=0.0)
    batches = _batches(cfg, 6)
    eager = _train(cfg, batches, 3, tmp_path / "e", graphed=False)
    graphed = _train(cfg, batches, 3, tmp_path / "g", graphed=True)
    assert graphed.graphed is not None
    for (k, a), b in zip(eager.net.state_dict().items(), graphed.net.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=k)


def test_parameters_the_loss_never_reaches_stay_untouched_under_graphs(tmp_path):
    """PIUnet's uncertainty head under the registered-L1 warm-up: no gradient, no Adam step, no
    weight decay, no optimizer state, as in eager training (a replay gives zeros, not None)."""
    cfg = _config(TINY_PIUNET + ["--n_frames=4"], loss="l1_reg", warmup_loss="", weight_decay=1e-2)
    batches = _batches(cfg, 3)
    eager = _train(cfg, batches, 3, tmp_path / "e", graphed=False)
    graphed = _train(cfg, batches, 3, tmp_path / "g", graphed=True)
    torch.manual_seed(cfg.seed)
    initial = dict(Trainer(cfg, Dist(), torch.device("cpu")).net.named_parameters())
    head = [k for k in initial if "sigma" in k]
    assert head and all(torch.equal(graphed.net.state_dict()[k], initial[k]) for k in head)
    for net_e, net_g, opt_e, opt_g in ((eager.net, graphed.net, eager.optimizer, graphed.optimizer),):
        for pe, pg in zip(net_e.parameters(), net_g.parameters(), strict=True):
            assert (pe in opt_e.state) == (pg in opt_g.state)
            torch.testing.assert_close(pg, pe, rtol=1e-4, atol=1e-6)


# --- 3. collectives on the training device -------------------------------------------------------------

class RecordingDist(Dist):
    """One process that records every tensor handed to a collective, as a stand-in for NCCL, which
    refuses a tensor on another device than the training device."""

    def __init__(self):
        super().__init__()
        object.__setattr__(self, "reduced", [])

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        self.reduced.append(t.device)
        return t


def test_every_reduced_tensor_is_on_the_training_device(tmp_path):
    """The loop's one all-reduce (loss, stop and time-up flags) uses the training device. On this CPU
    the training device is the default one, so the loop runs with ``meta`` as the default device:
    a tensor made without naming the training device would land there (and be recorded)."""
    cfg = _config(TINY_QANET + ["--n_frames=4"])
    trainer = Trainer(cfg, Dist(), torch.device("cpu"))
    trainer.dist = RecordingDist()
    keeper = CheckpointKeeper(tmp_path, 0, 0.0)
    batches = iter(_batches(cfg, 2))
    with torch.device("meta"):
        trainer.train_step(batches, keeper)
    assert trainer.dist.reduced == [torch.device("cpu")]


# --- 8. --device=cuda:N --------------------------------------------------------------------------------

def test_opening_a_cuda_device_makes_it_current(monkeypatch):
    """``--device=cuda:1`` in one process: graph capture and the pinned-memory thread follow the
    current device, so it must be set (it once stayed GPU 0)."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(torch.device(d)))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    assert open_device("cuda:1") == torch.device("cuda:1") and current == [torch.device("cuda:1")]
    assert open_device("cuda", local_rank=2) == torch.device("cuda:2") and current[-1] == torch.device("cuda:2")


# --- 5 and 6. checkpoints trained on a GPU, read on a CPU ---------------------------------------------------

@pytest.fixture(scope="module")
def gpu_checkpoint(synthetic_root, tmp_path_factory):
    """A tiny PIUnet run whose checkpoints say they were trained on a GPU with fp16 and CUDA graphs."""
    tmp = tmp_path_factory.mktemp("gpu_ckpt")
    run = train.main(common_args(synthetic_root, tmp) + TINY_PIUNET + [f"--out_dir={tmp / 'r'}", "--max_steps=2"])
    for name in ("last.pt", "best.pt"):
        path = run / "checkpoints" / name
        ckpt = load_checkpoint(path)
        ckpt["config"].update(amp="fp16", cuda_graphs=True, device="cuda", compile=False)
        atomic_torch_save(ckpt, path)
    return run


def test_gpu_checkpoint_scores_and_predicts_on_a_cpu(gpu_checkpoint, tmp_path, capsys):
    ckpt = gpu_checkpoint / "checkpoints" / "best.pt"
    summary = valid.main([f"--checkpoint={ckpt}", f"--out_dir={tmp_path / 'v'}", "--device=cpu"])
    assert np.isfinite(summary["all"]["cpsnr"])
    assert json.loads((tmp_path / "v" / "summary.json").read_text())["all"]["n"] == summary["all"]["n"]
    predict.main([f"--checkpoint={ckpt}", f"--out_dir={tmp_path / 'p'}"])
    assert (tmp_path / "p" / "submission.zip").exists()
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        valid.main([f"--checkpoint={ckpt}", f"--out_dir={tmp_path / 'v2'}", "--amp=fp16"])


def test_resume_across_precisions(synthetic_root, tmp_path):
    """A run saved without fp16 (an empty gradient-scaler state) resumes with bf16, and back."""
    run = tmp_path / "r"
    args = common_args(synthetic_root, tmp_path) + TINY_QANET + [f"--out_dir={run}"]
    train.main(args + ["--max_steps=1"])
    train.main(args + ["--resume", "--amp=bf16", "--max_steps=2"])
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 2
    train.main(args + ["--resume", "--amp=off", "--max_steps=3"])
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 3


def test_scaler_state_restores_only_where_both_sides_use_it():
    from utils.runtime import load_scaler_state
    on = torch.amp.GradScaler("cpu", enabled=True, init_scale=64.0)
    off = torch.amp.GradScaler("cpu", enabled=False)
    load_scaler_state(on, off.state_dict())  # saved without fp16: starts afresh
    assert on.get_scale() == 64.0
    saved = torch.amp.GradScaler("cpu", enabled=True, init_scale=8.0).state_dict()
    load_scaler_state(on, saved)
    assert on.get_scale() == 8.0
    load_scaler_state(off, saved)  # resumed without fp16: nothing to restore
    assert not off.is_enabled()


@pytest.mark.parametrize("flag", ["--amp=fp16", "--cuda_graphs=true"])
def test_gpu_only_settings_are_refused_before_any_data_loads(flag, tmp_path):
    """fp16 autocast and CUDA graphs on a CPU: one line saying what to use instead, once the device
    is open (``--device=auto`` may land on either), before the data is read (it does not exist here)."""
    with pytest.raises(ConfigError, match="needs a (single )?CUDA"):
        train.main(["--device=cpu", flag, f"--data_dir={tmp_path / 'absent'}", f"--out_dir={tmp_path / 'r'}"])
