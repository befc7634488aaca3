"""CUDA-only paths: graph capture of the training step (with the zoo's alphas, the ESA-baseline residual,
the fp16 gradient scaler and the moving average of the weights), fused Adam, reduced-precision full
scenes. Skipped where there is no GPU; the rest of the suite covers the same code on CPU
(``tests/test_gpu_paths.py`` with stand-ins), and ``python bench.py gpu-check`` runs the scripts."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from models import build_model, request_channels_last
from utils.runtime import cuda_graphed, make_optimizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEV = torch.device("cuda")
TINY = {"qanet": dict(n_modules=2, n_resblocks=1, n_feats=8, reduction=4, n_frames=4),
        "piunet": dict(n_feats=8, r_bneck=4, n_tefa=1)}
# the zoo models read alphas (1: a real view, 0: padding) to leave padded views out of the fusion;
# TR-MISR without dropout: a replay and an eager pass would draw other dropout masks
ZOO = {"highresnet": dict(n_feats=8, n_resblocks=1, deconv_channels=4),
       "misrgru": dict(n_feats=8, n_resblocks=1, gru_channels=[8], gru_kernel_sizes=[3], deconv_channels=4),
       "trmisr": dict(n_feats=8, n_resblocks=1, depth=1, n_heads=2, mlp_dim=8, dropout=0.0)}
# skip="baseline": a residual on the ESA baseline of the input frames and their masks (the demo and
# cpu_real presets' PIUnet, cpu_real_qanet's QA-Net, which also standardises its frames)
BASELINE = {"qanet": dict(TINY["qanet"], skip="baseline", standardize=True),
            "piunet": dict(TINY["piunet"], skip="baseline")}


class _Core(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, lr, mask, alphas=None):
        return self.net.super_resolve(lr, mask, alphas)  # every output, as train.py's wrapper returns them


def _batches(n: int, frames: int = 4) -> list[tuple[torch.Tensor, ...]]:
    """``n`` training batches ``(lr, mask, hr)`` of 3 samples, 16x16 LR frames, on the CPU."""
    g = torch.Generator().manual_seed(1)
    return [(torch.rand(3, frames, 16, 16, generator=g), (torch.rand(3, frames, 16, 16, generator=g) > 0.2).float(),
             torch.rand(3, 1, 48, 48, generator=g)) for _ in range(n)]


def _net(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return request_channels_last(build_model(name, **kwargs)).to(DEV).train()


def _replays_equal_eager(eager: torch.nn.Module, batches: list[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
    """Train-mode forward and backward of ``eager`` and of a graph-captured copy on each batch
    ``(inputs..., hr)``, in float32: outputs, gradients and BatchNorm statistics agree batch after
    batch. Returns the eager outputs."""
    graph_net = copy.deepcopy(eager)
    outputs = []
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # float32 arithmetic, not TF32 choices
        graphed = cuda_graphed(_Core(graph_net), tuple(t.to(DEV) for t in batches[0][:-1]), "off")
        for a, b in zip(eager.state_dict().values(), graph_net.state_dict().values(), strict=True):
            assert torch.equal(a, b), "the capture changed the model's state"
        for *inputs, hr in batches:
            inputs, results = [t.to(DEV) for t in inputs], []
            for net, fwd in ((eager, _Core(eager)), (graph_net, graphed)):
                net.zero_grad(set_to_none=True)
                out = fwd(*inputs)["sr"]
                (out - hr.to(DEV)).abs().mean().backward()
                # a graph replay gives zeros where eager autograd leaves None (PIUnet's head under an L1 loss)
                grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in net.parameters()]
                results.append((out.detach().clone(), grads))
            (out_e, grads_e), (out_g, grads_g) = results
            torch.testing.assert_close(out_g, out_e, atol=1e-5, rtol=1e-4)
            for ge, gg in zip(grads_e, grads_g, strict=True):
                torch.testing.assert_close(gg, ge, atol=1e-5, rtol=1e-3)
            outputs.append(out_e)
    for (k, a), b in zip(eager.state_dict().items(), graph_net.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=k)
    return outputs


@pytest.mark.parametrize("name", ["qanet", "piunet"])
def test_cuda_graphed_training_matches_eager(name):
    """Outputs, gradients and BatchNorm statistics of graph replays equal eager runs, batch after batch."""
    _replays_equal_eager(_net(name, **TINY[name]), _batches(3))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_alphas_are_a_graph_input(name):
    """A replay reads each batch's alphas, not the ones it was captured with: the same frames with other
    padding give another output, equal to eager; then zero frames padded as the data pads them."""
    g = torch.Generator().manual_seed(2)
    lr, mask, hr = _batches(1)[0]
    real = torch.ones(3, 4)
    padded = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    other = torch.rand(3, 4, 16, 16, generator=g) * padded[:, :, None, None]  # padding views are zero frames
    batches = [(lr, mask, real, hr), (lr, mask, padded, hr), (other, mask, padded, hr)]
    out = _replays_equal_eager(_net(name, **ZOO[name]), batches)
    assert (out[0] - out[1]).abs().max() > 1e-4, "the alphas do not change the output: the test cannot tell"


@pytest.mark.parametrize("name", sorted(BASELINE))
def test_baseline_residual_is_captured_with_its_masks(name):
    """skip="baseline": the ESA baseline (float64 bicubic weights built on the GPU, the clearest frames
    picked by their masks) is part of the graph; other masks pick other frames, equal to eager."""
    lr, mask, hr = _batches(1)[0]
    other = mask.roll(1, dims=1)  # each frame gets its neighbour's mask: the clearest frame is another one
    batches = [(lr, mask, hr), (lr, other, hr), *_batches(2)]
    out = _replays_equal_eager(_net(name, **BASELINE[name]), batches)
    assert (out[0] - out[1]).abs().max() > 1e-4, "the masks do not change the output: the test cannot tell"


def test_gradient_scaler_around_graphed_backward():
    """fp16 as train.py runs it: the scaled loss's gradient flows through the graphed backward, then
    unscale_, clipping, the fused Adam step and the scale update. Graphs take the steps eager takes
    (skipped or not), all finite. Adam's first steps move each weight by about +-lr whatever the size of
    its gradient, so weights agree to a few lr (a rounding-noise gradient may take the other sign)."""
    eager = _net("qanet", **TINY["qanet"])
    graph_net, start = copy.deepcopy(eager), [p.detach().clone() for p in eager.parameters()]
    batches = [tuple(t.to(DEV) for t in b) for b in _batches(5)]
    graphed = cuda_graphed(_Core(graph_net), batches[0][:2], "fp16")
    runs = []
    for net, fwd in ((eager, _Core(eager)), (graph_net, graphed)):
        opt, scaler = make_optimizer(net.parameters(), 1e-5, 0.0, DEV), torch.amp.GradScaler("cuda")
        losses, scales = [], []
        for lr, mask, hr in batches:
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.float16):
                out = fwd(lr, mask)["sr"]
            loss = (out.float() - hr).abs().mean()
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.parameters(), 15.0)
            scaler.step(opt)
            scaler.update()
            losses.append(loss.item())
            scales.append(scaler.get_scale())
        runs.append((losses, scales, [p.detach().clone() for p in net.parameters()]))
    (losses_e, scales_e, params_e), (losses_g, scales_g, params_g) = runs
    assert all(math.isfinite(x) for x in losses_g) and scales_g == scales_e and scales_g[-1] > 0
    torch.testing.assert_close(losses_g, losses_e, rtol=1e-3, atol=1e-5)
    for pe, pg in zip(params_e, params_g, strict=True):
        assert torch.isfinite(pg).all()
        torch.testing.assert_close(pg, pe, atol=2e-4, rtol=0)
    assert any(not torch.equal(p, s) for p, s in zip(params_g, start, strict=True)), "no step was taken"


def test_moving_average_after_graphed_steps_equals_eager():
    """--ema: an AveragedModel of weights and BatchNorm statistics, made before the capture (as the
    trainer does) and updated after each graphed step, equals one updated after eager steps: replays
    change the live parameters and buffers the average reads. SGD: linear in the gradient."""
    eager = _net("qanet", **TINY["qanet"], rcab_bn=True)
    graph_net = copy.deepcopy(eager)
    emas = [AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True) for net in (eager, graph_net)]
    batches = [tuple(t.to(DEV) for t in b) for b in _batches(3)]
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        graphed = cuda_graphed(_Core(graph_net), batches[0][:2], "off")
        for net, fwd, ema in ((eager, _Core(eager), emas[0]), (graph_net, graphed, emas[1])):
            opt = torch.optim.SGD(net.parameters(), lr=1e-2)
            for lr, mask, hr in batches:
                opt.zero_grad(set_to_none=True)
                (fwd(lr, mask)["sr"] - hr).abs().mean().backward()
                opt.step()
                ema.update_parameters(net)
    assert int(emas[0].n_averaged) == int(emas[1].n_averaged) == 3
    for (k, a), b in zip(emas[0].module.state_dict().items(), emas[1].module.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=k)
    assert any(not torch.equal(a, b) for a, b in zip(emas[1].module.parameters(), graph_net.parameters(),
                                                     strict=True)), "the average is the live weights"


def test_fused_adam_on_cuda_follows_the_plain_update():
    torch.manual_seed(0)
    a = [torch.randn(5, 7, device=DEV, requires_grad=True) for _ in range(3)]
    b = [t.detach().clone().requires_grad_() for t in a]
    fused, plain = make_optimizer(a, 1e-2, 1e-5, DEV), torch.optim.Adam(b, lr=1e-2, weight_decay=1e-5, foreach=False)
    assert fused.defaults["fused"]
    for _ in range(4):
        grads = [torch.randn_like(t) for t in a]
        for ps, opt in ((a, fused), (b, plain)):
            for p, gr in zip(ps, grads, strict=True):
                p.grad = gr.clone()
            opt.step()
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_full_scene_batches_in_reduced_precision(amp):
    """A batch of 4 full 128x128 scenes is 65536 attention sequences: past one CUDA grid."""
    torch.manual_seed(0)
    net = build_model("qanet", **TINY["qanet"]).to(DEV).eval()
    lr = torch.rand(4, 4, 128, 128, device=DEV)
    mask = torch.ones_like(lr)
    with torch.no_grad():
        ref = net.super_resolve(lr, mask)["sr"]
        with torch.autocast("cuda", dtype=amp):
            out = net.super_resolve(lr, mask)["sr"]
    assert out.shape == (4, 1, 384, 384) and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()
