"""The zoo against its authors' code, for speed: ``python bench.py zoo --ref=MODEL=DIR ...``.

For each model with a checkout of its authors' code (``--ref``), in one process on one machine:

* **train**: one training step (forward, L1 against a target, backward, optimizer step) on a batch
  of the authors' training samples: their LR patch side and their number of views (the model's
  preset). Ours as ``train.py`` runs it (``super_resolve``, channels-last features, our optimizer);
  theirs as their code runs it (their forward; PyTorch with Adam, or TensorFlow with a
  ``tf.function`` step and Nadam for 3DWDSRNet).
* **scene**: the full-scene SR of one 128x128 scene from the views the model scores on
  (``ModelSpec.n_views``): ours through ``engine.evaluate.super_resolve``, theirs through their
  forward (3DWDSRNet: their ``predict.py`` on the 16 tiles).

Both sides get the same random inputs, alternate within a round, and each figure is the best of
``--repeat`` rounds after a warm-up, so a busy moment of the machine slows both sides alike.
Nothing of the authors' ships here: their code runs from the folder you pass (see
``ModelSpec.authors_network``). TR-MISR's code needs ``einops``; 3DWDSRNet's needs TensorFlow with
Keras 2 and TensorFlow Addons (``pip install tensorflow-cpu tf-keras tensorflow-addons click``).
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from .timing import authors_config, device_name, sync, train_step_fn

__all__ = ["add_arguments", "main"]


def add_arguments(p) -> None:
    p.add_argument("--ref", action="append", default=[], metavar="MODEL=DIR",
                   help="a local checkout of a zoo model's authors' code (repeatable); models without one are "
                        "timed on our side only")
    p.add_argument("--models", default=",".join(_zoo()), help="default: the zoo (the models scored on their "
                                                                 "authors' own views, ModelSpec.views)")
    p.add_argument("--batch", type=int, default=2,
                   help="training samples per step (the authors' batches, 4 to 32, take minutes a step on a CPU)")
    p.add_argument("--repeat", type=int, default=3, help="timed rounds; each figure is the best round")
    p.add_argument("--device", default="cpu")


def _zoo() -> list[str]:
    """The zoo: the trainable models scored on their authors' own views (``ModelSpec.views``)."""
    from models import MODELS
    return [name for name, spec in MODELS.items() if spec.trainable and spec.views]


def _best(fns: dict[str, Callable[[], None]], repeat: int, device) -> dict[str, float]:
    """Seconds per call of each function: one warm-up call each, then ``repeat`` rounds that call
    every function once in turn; the best round of each."""
    for fn in fns.values():
        fn()
    sync(device)
    best = {k: float("inf") for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            sync(device)
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def _keras_train_step(net, lr: np.ndarray, hr: np.ndarray) -> Callable[[], None]:
    """The authors' TensorFlow network's training step: forward, L1, gradients, Nadam (their optimizer)."""
    import tensorflow as tf
    x = [tf.constant(a) for a in net.inputs(lr)]
    # their network outputs DN: the target in DN too, so that the L1's gradient has their scale
    y = tf.constant(np.ascontiguousarray(hr.transpose(0, 2, 3, 1)) * 65535.0)
    opt = tf.keras.optimizers.Nadam(learning_rate=5e-4)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.abs(net.model(x, training=True) - y))
        grads = tape.gradient(loss, net.model.trainable_variables)
        opt.apply_gradients(zip(grads, net.model.trainable_variables, strict=True))
        return loss

    return lambda: step().numpy()


def _torch_scene(model, lr: torch.Tensor, qm: torch.Tensor, ours: bool, uses_masks: bool) -> Callable[[], None]:
    from engine.evaluate import super_resolve

    @torch.no_grad()
    def run():
        model.eval()  # the step before it left the model training
        if ours:
            super_resolve(model, lr, qm)
        else:
            model(lr, qm) if uses_masks else model(lr)
    return run


def _sides(name: str, ref: str, batch: int, device) -> tuple[dict, dict, dict]:
    """``(train steps, scene runs, sizes)`` of ours and, with a checkout, the authors' code."""
    from models import build_model, request_channels_last, spec_of
    from models.authors import KerasNetwork
    spec, cfg = spec_of(name), authors_config(name)
    frames, patch, views = cfg["frames"], cfg["patch"], spec.n_views or cfg["frames"]
    g = torch.Generator().manual_seed(0)
    lr = torch.rand(batch, frames, patch, patch, generator=g).to(device)
    scene = torch.rand(1, views, 128, 128, generator=g).to(device)
    qm = torch.ones_like(scene)
    torch.manual_seed(0)
    ours = request_channels_last(build_model(name)).to(device)
    train = {"ours": train_step_fn(ours, name, batch, frames, patch, device, "off", reference=False)}
    scenes = {"ours": _torch_scene(ours, scene, qm, True, spec.uses_masks)}
    if ref:
        theirs = spec.authors_network(ref)
        if isinstance(theirs, KerasNetwork):
            # their network takes the padded 34x34 LR tile that our super_resolve pads the 32x32 patch to
            tile = np.pad(lr.cpu().numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
            hr = torch.rand(batch, 1, 3 * patch, 3 * patch, generator=g).numpy()
            train["authors"] = _keras_train_step(theirs, tile, hr)
            scene_np = scene.cpu().numpy()
            scenes["authors"] = lambda: theirs.infer(scene_np)
        else:
            theirs = theirs.to(device)
            train["authors"] = train_step_fn(theirs, name, batch, frames, patch, device, "off", reference=True)
            scenes["authors"] = _torch_scene(theirs, scene, qm, False, spec.uses_masks)
    return train, scenes, dict(frames=frames, patch=patch, views=views)


def main(args) -> None:
    device = torch.device(args.device)
    bad = [r for r in args.ref if "=" not in r]
    if bad:
        raise SystemExit(f"--ref: {bad[0]!r} is not MODEL=DIR (a registry name, then the checkout's folder)")
    refs = dict(r.split("=", 1) for r in args.ref)
    unknown = set(refs) - set(args.models.split(","))
    if unknown:
        raise SystemExit(f"--ref: {sorted(unknown)} not in --models {args.models}")
    print(f"device: {device_name(device)}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"batch {args.batch}, best of {args.repeat}")
    print(f"{'model':10s} {'train on':>17s} {'ours s/sample':>13s} {'authors':>9s} {'ratio':>6s}   "
          f"{'scene views':>11s} {'ours s/scene':>12s} {'authors':>9s} {'ratio':>6s}")
    for name in args.models.split(","):
        train, scenes, size = _sides(name, refs.get(name, ""), args.batch, device)
        t = {k: v / args.batch for k, v in _best(train, args.repeat, device).items()}
        s = _best(scenes, args.repeat, device)

        def cols(d):
            if "authors" not in d:
                return f"{d['ours']:13.3f} {'-':>9s} {'-':>6s}"
            return f"{d['ours']:13.3f} {d['authors']:9.3f} {d['authors'] / d['ours']:5.2f}x"
        print(f"{name:10s} {size['frames']:3d} x {size['patch']:3d}x{size['patch']:<3d}    {cols(t)}   "
              f"{size['views']:11d} {cols(s)}", flush=True)
        del train, scenes
    print("ratio: the authors' time over ours (above 1: ours is faster)")
