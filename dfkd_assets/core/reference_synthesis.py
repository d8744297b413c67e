"""The reference loop: VQGAN-CLIP as the public scripts schedule it, one image at a time.

This is the baseline the engine (`synthesis.synthesize_batch`) is measured against (`dfkd bench`):
the same per-step algorithm of docs/ALGORITHM.md §3 and the same random streams, but one image per
optimisation, each cutout cut in a Python loop (the views of one image are then augmented in one
call, as the scripts do with kornia), a host sync per step, fp32, no compilation, no special
memory layout. Cutouts use the engine's crop operator (one box at a time) rather than the
scripts' slice + adaptive pooling, so that both produce the same image for the same seed, to
float rounding (tested): the speed-up must come from scheduling, not from a different algorithm.
"""

from __future__ import annotations

import numpy as np
import torch

from dfkd_assets.core.augment import N_PARAMS, ImageRngs, augment_views, crop_resize, cutout_boxes
from dfkd_assets.core.synthesis import BatchResult, LatentOptimizer, SynthesisSettings, render, spherical_distance
from dfkd_assets.core.teacher import Teacher


def reference_synthesize_one(
    vqgan: torch.nn.Module, teacher: Teacher, target: torch.Tensor, seed: int, settings: SynthesisSettings
) -> tuple[np.ndarray, float, list[float]]:
    """One image for one target feature [D]: (uint8 [H,W,3], final cosine, loss per step)."""
    device = target.device
    rngs = ImageRngs([seed], device)
    lat = LatentOptimizer.start(vqgan, rngs, settings)
    z = lat.z
    cut = teacher.image_size
    losses = []
    for _ in range(settings.iterations):
        x = render(vqgan, z)
        u = rngs.uniform(settings.cutn, N_PARAMS)  # [1,cutn,P]
        boxes = cutout_boxes(u, x.shape[-2], x.shape[-1], cut, settings.cut_pow)[0]
        noise = rngs.normal((settings.cutn, 3, cut, cut))[0]
        views = torch.cat([crop_resize(x, boxes[i].view(1, 1, 4), cut) for i in range(settings.cutn)])
        feats = teacher.encode_images(augment_views(views, u[0], settings.augment, noise))  # one call, as kornia in the scripts
        loss = spherical_distance(feats, target[None]).mean()
        lat.step(loss)
        losses.append(loss.item())  # a host sync per step, as in the public scripts
    with torch.no_grad():
        image = (render(vqgan, z) * 255).round().clamp(0, 255).to(torch.uint8)
        cos = float((teacher.encode_images(image.float() / 255) * target).sum())
    return image[0].permute(1, 2, 0).cpu().numpy(), cos, losses


def reference_synthesize(
    vqgan: torch.nn.Module, teacher: Teacher, targets: torch.Tensor, seeds: list[int], settings: SynthesisSettings
) -> BatchResult:
    """Every image in turn; the same result type as the engine, for side-by-side comparison."""
    outs = [reference_synthesize_one(vqgan, teacher, t, s, settings) for t, s in zip(targets, seeds)]
    steps = np.array([o[2] for o in outs]).mean(0).tolist() if outs and outs[0][2] else []
    return BatchResult(images=np.stack([o[0] for o in outs]), cosines=np.array([o[1] for o in outs]), losses=steps)
