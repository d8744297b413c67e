"""VQGAN-CLIP synthesis of surrogate images (ALGORITHM.md §3), batched.

Each image has its own latent, target text feature and seed. One step for a batch of B images:
    z_q  = z + (VQ(z) - z).detach()                      straight-through nearest code
    x    = clamp_st((Dec(z_q) + 1) / 2, 0, 1)             straight-through clamp
    v    = augment(cutouts(x))                            cutn views per image, per-image RNG
    loss = sum_b mean_views 2 * arcsin(|f(v) - e_b| / 2)^2  spherical distance to the target
    Adam(lr) on z; then clamp z per channel to the codebook's min/max.
The loss is a sum of independent per-image terms and Adam is element-wise, so a batch follows
the same trajectories as B single-image runs (tested).
"""

from __future__ import annotations

import io
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dfkd_assets.core.devices import autocast
from dfkd_assets.core.augment import N_PARAMS, AugmentSpec, ImageRngs, augment_views, crop_resize, cutout_boxes
from dfkd_assets.core.io import atomic_write_bytes, atomic_write_text
from dfkd_assets.core.teacher import Teacher
from dfkd_assets.core.vqgan import codebook, decode, downsample_factor, quantize_st


@dataclass(frozen=True)
class SynthesisSettings:
    iterations: int = 400
    lr: float = 0.1
    cutn: int = 32
    cut_pow: float = 1.0
    image_size: int = 224
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    bf16: bool = False  # autocast decoder + image encoder; VQ distances, loss and Adam stay fp32


@dataclass
class BatchResult:
    images: np.ndarray  # uint8 [B,H,W,3]
    cosines: np.ndarray  # final cosine of the clean image to its target, [B]
    losses: list[float]  # mean per-image loss per iteration


class NonFiniteError(RuntimeError):
    pass


def spherical_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """2 * arcsin(|a - b| / 2)^2 for unit vectors (the VQGAN-CLIP loss), last dim reduced."""
    return (a - b).norm(dim=-1).div(2).clamp(max=1).arcsin().pow(2).mul(2)


class _ClampST(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clamp(0, 1)

    @staticmethod
    def backward(ctx, grad):
        return grad


def clamp_st(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [0,1] forward, identity backward (so saturated pixels still receive gradient)."""
    return _ClampST.apply(x)


def init_latents(vqgan: torch.nn.Module, rngs: ImageRngs, image_size: int) -> torch.Tensor:
    """Random codebook vectors (uniform random indices), one latent grid per image: [B,C,h,w]."""
    f = downsample_factor(vqgan)
    if image_size % f:
        raise ValueError(f"synthesis.image_size {image_size} must be a multiple of the VQGAN factor {f}")
    side = image_size // f
    book = codebook(vqgan)
    idx = torch.stack([torch.randint(book.shape[0], (side * side,), generator=g) for g in rngs.cpu]).to(book.device)
    return book[idx].view(len(rngs.cpu), side, side, -1).permute(0, 3, 1, 2).contiguous()


def render(vqgan: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0,1] through straight-through VQ and clamp."""
    return clamp_st((decode(vqgan, quantize_st(z, codebook(vqgan))) + 1) / 2)


def synthesize_batch(
    vqgan: torch.nn.Module,
    teacher: Teacher,
    targets: torch.Tensor,
    seeds: list[int],
    settings: SynthesisSettings,
    on_step: Callable[[int, float], None] | None = None,
) -> BatchResult:
    """Optimise one latent per target feature; returns the final images and their cosines."""
    device = targets.device
    rngs = ImageRngs(seeds, device)
    b = len(seeds)
    z = init_latents(vqgan, rngs, settings.image_size).requires_grad_(True)
    book = codebook(vqgan)
    z_min = book.min(0).values.view(1, -1, 1, 1)
    z_max = book.max(0).values.view(1, -1, 1, 1)
    opt = torch.optim.Adam([z], lr=settings.lr)
    cut = teacher.image_size
    losses: list[torch.Tensor] = []
    for step in range(settings.iterations):
        with autocast(device, settings.bf16):
            x = render(vqgan, z).float()
        u = rngs.uniform(settings.cutn, N_PARAMS)  # [B,cutn,P]
        boxes = cutout_boxes(u, x.shape[-2], x.shape[-1], cut, settings.cut_pow)
        views = crop_resize(x, boxes, cut)  # [B*cutn,3,cut,cut]
        noise = rngs.normal_like(views.view(b, settings.cutn, *views.shape[1:])).flatten(0, 1)
        views = augment_views(views, u.flatten(0, 1), settings.augment, noise)
        with autocast(device, settings.bf16):
            feats = teacher.encode_images(views).view(b, settings.cutn, -1)  # encode_images returns fp32
        per_image = spherical_distance(feats, targets[:, None, :]).mean(1)
        opt.zero_grad(set_to_none=True)
        per_image.sum().backward()
        opt.step()
        with torch.no_grad():
            z.copy_(torch.maximum(torch.minimum(z, z_max), z_min))
        losses.append(per_image.detach().mean())
        if on_step is not None:
            on_step(step + 1, float(losses[-1]) if (step + 1) % 10 == 0 or step + 1 == settings.iterations else float("nan"))
    with torch.no_grad():
        x = render(vqgan, z)
        if not torch.isfinite(x).all():
            raise NonFiniteError("synthesis produced non-finite pixels")
        images = (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        # cosine of what is written (the uint8 image), not of the float render
        clean = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 255
        cos = (teacher.encode_images(clean) * targets).sum(-1)
    return BatchResult(images=images, cosines=cos.cpu().numpy(), losses=[float(v) for v in torch.stack(losses).cpu()] if losses else [])


def synthesize_resumable(
    vqgan: torch.nn.Module,
    teacher: Teacher,
    head: torch.Tensor,
    targets: torch.Tensor,
    seeds: list[int],
    settings: SynthesisSettings,
    batch_size: int,
    work_dir: Path,
    fingerprint: str,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All images of one class in batches; each finished batch is kept in `work_dir` (atomically).

    Batches already present with the same `fingerprint` are not recomputed, so a killed run
    resumes; a different fingerprint discards them. Returns (images uint8 [N,H,W,3], final
    cosines [N], teacher top-1 class index on the clean image [N]).
    """
    work_dir = Path(work_dir)
    fp_file = work_dir / "fingerprint"
    if work_dir.is_dir() and (not fp_file.is_file() or fp_file.read_text() != fingerprint):
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(fp_file, fingerprint)
    n = len(seeds)
    parts = []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        path = work_dir / f"batch_{start:06d}_{stop:06d}.npz"
        if not path.is_file():
            res = synthesize_batch(
                vqgan, teacher, targets[start:stop], seeds[start:stop], settings,
                on_step=None if on_step is None else (lambda step, loss, m=stop - start: on_step(m, loss)),
            )
            with torch.no_grad():
                clean = torch.from_numpy(res.images).to(head.device).permute(0, 3, 1, 2).float() / 255
                preds = (teacher.encode_images(clean) @ head.t()).argmax(-1).cpu().numpy()
            buf = io.BytesIO()
            np.savez(buf, images=res.images, cosines=res.cosines, preds=preds)
            atomic_write_bytes(path, buf.getvalue())
        elif on_step is not None:
            on_step((stop - start) * settings.iterations, float("nan"))
        with np.load(path) as z:
            parts.append((z["images"], z["cosines"], z["preds"]))
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))
