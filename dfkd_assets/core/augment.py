"""Vectorised crops and augmentations, with per-image random streams.

The public VQGAN-CLIP scripts cut views in a Python loop and use one global RNG, so a batch of
images does not follow the same trajectory as each image alone. Here every image owns a
generator (`ImageRngs`), all random parameters of its views come from that stream, and the
crops/warps of the whole batch run as single tensor ops (`roi_align`, `grid_sample`). Optimising
B images together therefore equals optimising each alone, just faster.

Augmentation strengths follow docs/ALGORITHM.md §3 (reconstructed from the public VQGAN-CLIP
defaults): affine 15 deg / 0.1 translate, perspective 0.7, colour jitter 0.1, random erasing,
each with probability p, plus Gaussian noise with per-view sigma in [0, noise_max].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

# uniform draws per view: 0-2 cutout box, 3-6 affine, 7-15 perspective, 16-19 colour jitter,
# 20-24 erasing, 25 noise level. Fixed indices keep every draw independent of the others.
N_PARAMS = 26


class ImageRngs:
    """One CPU generator (view parameters) and one device generator (pixel noise) per image."""

    def __init__(self, seeds: list[int], device: torch.device):
        self.seeds = [int(s) for s in seeds]
        self.cpu = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.dev = [torch.Generator(device=device).manual_seed(int(s) ^ 0x5DEECE66D) for s in seeds]

    def uniform(self, n: int, k: int) -> torch.Tensor:
        """[B, n, k] uniform draws, each image from its own stream."""
        return torch.stack([torch.rand(n, k, generator=g) for g in self.cpu])

    def normal(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[B, *shape] standard normal on the device, image b from its own device stream."""
        return torch.stack([torch.randn(shape, generator=g, device=g.device, dtype=dtype) for g in self.dev])


def to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host -> device without a host sync: a pinned staging copy and an asynchronous transfer.

    A plain `.to("cuda")` of a pageable tensor waits for the stream, so the CPU could not queue the
    next step while the GPU works; the random view parameters cross every step, so this matters.
    """
    t = t.to(dtype) if dtype is not None else t
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


TEXTURE_STD, GRAIN_STD = 0.15, 0.04  # procedural_texture's coarse field (4x4) and pixel grain


def procedural_texture(base: torch.Tensor, coarse: torch.Tensor, grain: torch.Tensor) -> torch.Tensor:
    """A random colour field in [0, 1]: base [B,C,1,1] + coarse [B,C,h,w] upsampled smoothly to the
    side of grain [B,C,S,S] + grain. Used as a background (distill.zoom_out) and as a starting
    image (synthesis.noise_start_fraction): context the generator alone does not draw."""
    size = grain.shape[-1]
    return (base + F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False) + grain).clamp(0, 1)


def crop_rois(boxes: torch.Tensor, height: int, width: int, size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    """Boxes [B,n,4] (x1,y1,x2,y2 in pixels) of [B,C,height,width] images -> `roi_align` rows [B*n,5] on `device`,
    or None when every box is the whole image at the output size.

    None is always the case when the synthesis side equals the teacher's input side (224 px):
    `roi_align` would then sample each pixel at its centre, i.e. copy it, with a slow scatter-add
    backward; `crop_resize_rois` repeats the image instead (same values and gradient). Decided
    here, on the host, so the device part has no data-dependent branch (and compiles whole).
    """
    b, n = boxes.shape[:2]
    if height == width == size and boxes.device.type == "cpu" and bool((boxes == boxes.new_tensor([0, 0, width, height])).all()):
        return None
    idx = torch.arange(b, dtype=boxes.dtype, device=boxes.device).repeat_interleave(n)[:, None]
    return to_device(torch.cat([idx, boxes.reshape(-1, 4)], dim=1), device, dtype)


def crop_resize_rois(x: torch.Tensor, rois: torch.Tensor | None, n: int, size: int) -> torch.Tensor:
    """x: [B,C,H,W]; rois from `crop_rois` -> [B*n,C,size,size], differentiable w.r.t. x.

    Adaptive sampling averages ceil(box/size) points per output pixel: area-like when shrinking
    (like the adaptive pooling of the public cutouts), exact when the box already has `size` pixels.
    """
    if rois is None:
        return x.repeat_interleave(n, dim=0)
    return roi_align(x, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def crop_resize(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """x: [B,C,H,W]; boxes: [B,n,4] (x1,y1,x2,y2 in pixels) -> [B*n,C,size,size] (`crop_rois` + `crop_resize_rois`)."""
    rois = crop_rois(boxes, x.shape[-2], x.shape[-1], size, x.device, x.dtype)
    return crop_resize_rois(x, rois, boxes.shape[1], size)


def cutout_boxes(u: torch.Tensor, height: int, width: int, out_size: int, cut_pow: float) -> torch.Tensor:
    """Square cutouts as in VQGAN-CLIP: side = rand**cut_pow * (max - min) + min. u: [B,n,>=3] uniforms."""
    max_side = min(height, width)
    min_side = min(height, width, out_size)
    side = (u[..., 0] ** cut_pow * (max_side - min_side) + min_side).floor()
    x1 = (u[..., 1] * (width - side + 1)).floor().clamp(max=width - side)
    y1 = (u[..., 2] * (height - side + 1)).floor().clamp(max=height - side)
    return torch.stack([x1, y1, x1 + side, y1 + side], dim=-1)


def resized_crop_boxes(u: torch.Tensor, height: int, width: int, scale: tuple[float, float], ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """Random-resized-crop boxes (area fraction in `scale`, log-uniform aspect ratio). u: [B,n,>=4]."""
    area = height * width * (scale[0] + u[..., 0] * (scale[1] - scale[0]))
    logr = math.log(ratio[0]) + u[..., 1] * (math.log(ratio[1]) - math.log(ratio[0]))
    r = torch.exp(logr)
    w = torch.sqrt(area * r).clamp(1, width)
    h = torch.sqrt(area / r).clamp(1, height)
    x1 = u[..., 2] * (width - w)
    y1 = u[..., 3] * (height - h)
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=-1)


@dataclass(frozen=True)
class AugmentSpec:
    """Cutout augmentation; `p` and `noise_max` are settings (synthesis.augment_p / noise_max, mapped
    in dfkd_assets/loaders.py), the ranges below are fixed constants of the method."""

    p: float
    noise_max: float
    degrees: float = 15.0
    translate: float = 0.1
    perspective: float = 0.7
    jitter: float = 0.1
    erase_scale: tuple[float, float] = (0.02, 0.33)


def luma(x: torch.Tensor) -> torch.Tensor:
    """[N,3,H,W] RGB -> [N,1,H,W] Rec. 601 luma."""
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def jitter_colour(x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor, saturation: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast (about the image's mean luma), then saturation (about the pixel's luma);
    factors [N,1,1,1], 1 = unchanged. Shared by the synthesis cutouts and the KD inputs; no clamp."""
    x = x * brightness
    mean = luma(x).mean((2, 3), keepdim=True)
    x = (x - mean) * contrast + mean
    gray = luma(x)
    return gray + (x - gray) * saturation


def _homographies(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """3x3 H with H @ src_i ~ dst_i for 4 point pairs. src, dst: [N,4,2]."""
    n = src.shape[0]
    x, y, u, v = src[..., 0], src[..., 1], dst[..., 0], dst[..., 1]
    zeros, ones = torch.zeros_like(x), torch.ones_like(x)
    rows_u = torch.stack([x, y, ones, zeros, zeros, zeros, -u * x, -u * y], dim=-1)
    rows_v = torch.stack([zeros, zeros, zeros, x, y, ones, -v * x, -v * y], dim=-1)
    a = torch.cat([rows_u, rows_v], dim=1)  # N,8,8
    b = torch.cat([u, v], dim=1)  # N,8
    h = torch.linalg.solve(a, b)
    return torch.cat([h, torch.ones(n, 1, dtype=h.dtype)], dim=1).view(n, 3, 3)


def _view_transforms(u: torch.Tensor, spec: AugmentSpec) -> torch.Tensor:
    """[N, N_PARAMS] uniforms -> [N,3,3] maps from output to input coordinates (normalised [-1,1])."""
    n = u.shape[0]
    on_aff = (u[:, 3] < spec.p).float()
    angle = torch.deg2rad((u[:, 4] * 2 - 1) * spec.degrees) * on_aff
    tx, ty = (u[:, 5] * 2 - 1) * spec.translate * 2 * on_aff, (u[:, 6] * 2 - 1) * spec.translate * 2 * on_aff
    c, s = torch.cos(angle), torch.sin(angle)
    aff = torch.zeros(n, 3, 3, dtype=u.dtype)
    aff[:, 0, 0], aff[:, 0, 1], aff[:, 0, 2] = c, -s, tx
    aff[:, 1, 0], aff[:, 1, 1], aff[:, 1, 2] = s, c, ty
    aff[:, 2, 2] = 1
    on_persp = (u[:, 7] < spec.p).float()[:, None, None]
    corners = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=u.dtype).expand(n, 4, 2)
    inward = -torch.sign(corners) * u[:, 8:16].view(n, 4, 2) * spec.perspective * on_persp
    persp = _homographies(corners, corners + inward)
    return persp @ aff


class ViewParams(NamedTuple):
    """One step's augmentation parameters on the device: what `apply_augment` needs besides pixels."""

    grid: torch.Tensor  # [N,S,S,2] sampling grid of the affine + perspective warp
    u: torch.Tensor  # [N, N_PARAMS] the view's uniforms (jitter, erasing, noise level)


def view_params(u: torch.Tensor, spec: AugmentSpec, size: int, device: torch.device, dtype: torch.dtype) -> ViewParams:
    """u: [N, N_PARAMS] uniforms (CPU) -> the warp grid and uniforms on `device`.

    The 3x3 maps are solved on the host in float64 (8x8 systems, one per view), then the grid is
    built on the device: only N*9 + N*P numbers cross per step.
    """
    n = u.shape[0]
    mats = to_device(_view_transforms(u.double(), spec), device, torch.float32)
    lin = torch.linspace(-1 + 1 / size, 1 - 1 / size, size, device=device)
    gy, gx = torch.meshgrid(lin, lin, indexing="ij")
    base = torch.stack([gx, gy, torch.ones_like(gx)], dim=-1).view(1, -1, 3)  # 1,S*S,3
    mapped = base @ mats.transpose(1, 2)
    grid = (mapped[..., :2] / mapped[..., 2:].clamp_min(1e-6)).view(n, size, size, 2)
    return ViewParams(grid.to(dtype), to_device(u, device, dtype))


def augment_views(views: torch.Tensor, u: torch.Tensor, spec: AugmentSpec, noise: torch.Tensor | None) -> torch.Tensor:
    """views: [N,3,S,S] in [0,1]; u: [N, N_PARAMS] uniforms (CPU); noise: standard normal like views or None."""
    return apply_augment(views, view_params(u, spec, views.shape[-1], views.device, views.dtype), spec, noise)


def apply_augment(views: torch.Tensor, params: ViewParams, spec: AugmentSpec, noise: torch.Tensor | None) -> torch.Tensor:
    """The device part of `augment_views`: warp, colour jitter, erasing, noise. Tensor ops only, no host
    data, so it compiles into the synthesis step."""
    size = views.shape[-1]
    dev, dt = views.device, views.dtype
    out = F.grid_sample(views, params.grid, mode="bilinear", padding_mode="border", align_corners=False)

    uu = params.u
    on_jit = (uu[:, 16] < spec.p).to(dt)[:, None, None, None]
    factors = 1 + (uu[:, 17:20] * 2 - 1) * spec.jitter  # brightness, contrast, saturation
    bri, con, sat = (1 + (factors[:, i] - 1)[:, None, None, None] * on_jit for i in range(3))
    out = jitter_colour(out, bri, con, sat)

    on_erase = uu[:, 20] < spec.p
    area = spec.erase_scale[0] + uu[:, 21] * (spec.erase_scale[1] - spec.erase_scale[0])
    ratio = torch.exp((uu[:, 22] * 2 - 1) * math.log(3.3))
    eh = (torch.sqrt(area / ratio)).clamp(max=1.0)
    ew = (torch.sqrt(area * ratio)).clamp(max=1.0)
    ey, ex = uu[:, 23] * (1 - eh), uu[:, 24] * (1 - ew)
    coords = (torch.arange(size, device=dev, dtype=dt) + 0.5) / size
    in_y = (coords[None, :] >= ey[:, None]) & (coords[None, :] < (ey + eh)[:, None])
    in_x = (coords[None, :] >= ex[:, None]) & (coords[None, :] < (ex + ew)[:, None])
    mask = (in_y[:, :, None] & in_x[:, None, :] & on_erase[:, None, None])[:, None]
    out = out.masked_fill(mask, 0.0)

    if noise is not None and spec.noise_max > 0:
        sigma = uu[:, 25] * spec.noise_max
        out = out + sigma[:, None, None, None] * noise
    return out
