"""CUDA-only paths: graph capture of the training step, fused Adam, reduced-precision full scenes.
Skipped where there is no GPU; the rest of the suite covers the same code on CPU."""
from __future__ import annotations

import copy

import pytest
import torch

from models import build_model, request_channels_last
from utils.runtime import cuda_graphed, make_optimizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TINY = {"qanet": dict(n_modules=2, n_resblocks=1, n_feats=8, reduction=4, n_frames=4),
        "piunet": dict(n_feats=8, r_bneck=4, n_tefa=1)}


class _Core(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, lr, mask):
        return self.net.super_resolve(lr, mask)  # every output, as train.py's wrapper returns them


@pytest.mark.parametrize("name", ["qanet", "piunet"])
def test_cuda_graphed_training_matches_eager(name):
    """Outputs, gradients and BatchNorm statistics of graph replays equal eager runs, batch after batch."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    eager = request_channels_last(build_model(name, **TINY[name])).to(dev).train()
    graph_net = copy.deepcopy(eager)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(3, 4, 16, 16, generator=g), (torch.rand(3, 4, 16, 16, generator=g) > 0.2).float(),
                torch.rand(3, 1, 48, 48, generator=g)) for _ in range(3)]
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # float32 arithmetic, not TF32 choices
        graphed = cuda_graphed(_Core(graph_net), tuple(t.to(dev) for t in batches[0][:2]), "off")
        for a, b in zip(eager.state_dict().values(), graph_net.state_dict().values(), strict=True):
            assert torch.equal(a, b), "the capture changed the model's state"
        for lr, mask, hr in batches:
            results = []
            for net, fwd in ((eager, _Core(eager)), (graph_net, graphed)):
                net.zero_grad(set_to_none=True)
                out = fwd(lr.to(dev), mask.to(dev))["sr"]
                (out - hr.to(dev)).abs().mean().backward()
                # a graph replay gives zeros where eager autograd leaves None (PIUnet's head under an L1 loss)
                grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in net.parameters()]
                results.append((out.detach().clone(), grads))
            (out_e, grads_e), (out_g, grads_g) = results
            torch.testing.assert_close(out_g, out_e, atol=1e-5, rtol=1e-4)
            for ge, gg in zip(grads_e, grads_g, strict=True):
                torch.testing.assert_close(gg, ge, atol=1e-5, rtol=1e-3)
    for (k, a), b in zip(eager.state_dict().items(), graph_net.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=k)


def test_fused_adam_on_cuda_follows_the_plain_update():
    dev = torch.device("cuda")
    torch.manual_seed(0)
    a = [torch.randn(5, 7, device=dev, requires_grad=True) for _ in range(3)]
    b = [t.detach().clone().requires_grad_() for t in a]
    fused, plain = make_optimizer(a, 1e-2, 1e-5, dev), torch.optim.Adam(b, lr=1e-2, weight_decay=1e-5, foreach=False)
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
    dev = torch.device("cuda")
    torch.manual_seed(0)
    net = build_model("qanet", **TINY["qanet"]).to(dev).eval()
    lr = torch.rand(4, 4, 128, 128, device=dev)
    mask = torch.ones_like(lr)
    with torch.no_grad():
        ref = net.super_resolve(lr, mask)["sr"]
        with torch.autocast("cuda", dtype=amp):
            out = net.super_resolve(lr, mask)["sr"]
    assert out.shape == (4, 1, 384, 384) and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()
