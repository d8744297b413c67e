"""VQGAN-CLIP synthesis of surrogate images (docs/ALGORITHM.md §3), batched.

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

import functools
import io
import math
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

from dfkd_assets.core.augment import (
    GRAIN_STD,
    N_PARAMS,
    TEXTURE_STD,
    AugmentSpec,
    ImageRngs,
    ViewParams,
    apply_augment,
    crop_resize_rois,
    crop_rois,
    cutout_boxes,
    procedural_texture,
    view_params,
)
from dfkd_assets.core.devices import autocast
from dfkd_assets.core.io import atomic_write_bytes, atomic_write_text
from dfkd_assets.core.seeding import derive_seed
from dfkd_assets.core.teacher import Teacher, logits_from_features
from dfkd_assets.core.vqgan import codebook, decode, downsample_factor, encode, quantize_st


@dataclass(frozen=True)
class SynthesisSettings:
    """One synthesis engine's settings, filled from `synthesis.*` and `precision` by
    dfkd_assets/loaders.py (meanings and defaults: dfkd_assets/config.py::SynthesisConfig)."""

    iterations: int
    lr: float
    lr_schedule: str  # constant | cosine (Adam's step size decays to 0 over the iterations)
    cutn: int
    cut_pow: float
    image_size: int
    noise_start_fraction: float  # share of images whose latents start from a random colour field
    augment: AugmentSpec
    bf16: bool  # autocast decoder + image encoder; VQ distances, loss and Adam stay fp32
    channels_last: bool  # NHWC weights/activations for the decoder and the image tower (faster convs on GPU)
    compile: bool  # torch.compile the whole step (pays off over many steps, costs a warm-up per process)
    compile_mode: str  # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune | ...
    student_weight: float  # > 0: with a `Competition`, also seek images on which the student disagrees with the teacher


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


def starts_from_noise(seed: int, noise_fraction: float) -> bool:
    """Whether the image with this seed starts from a noise field (`init_latents`): a fixed hash of
    its seed against the fraction, so the choice does not depend on the batch or on any draw and an
    image starts the same way in every run that shares its seed."""
    return noise_fraction > 0 and derive_seed(seed, "noise-start") / 2**63 < noise_fraction


def init_latents(vqgan: torch.nn.Module, rngs: ImageRngs, image_size: int, noise_fraction: float) -> torch.Tensor:
    """One starting latent grid per image, [B,C,h,w], from the image's own stream.

    Random codebook vectors (the public VQGAN-CLIP start; uniformly random indices) decode to the
    generator's average look, a pale mottle. An image chosen by `starts_from_noise` (a share
    `noise_fraction` of them) starts instead from the encoding of a random colour field
    (`procedural_texture`: a base colour, a smooth coarse field and grain). Why: CLIP guidance at
    a short schedule redraws the object and keeps much of the start's colour, so a codebook start
    gives every image a pale, outlined object on a pale surround, and a field start a filled,
    saturated object on its own colours; target domains may look like either.
    """
    f = downsample_factor(vqgan)
    if image_size % f:
        raise ValueError(f"synthesis.image_size {image_size} must be a multiple of the VQGAN factor {f}")
    side = image_size // f
    book = codebook(vqgan)
    z = []
    for g, seed in zip(rngs.cpu, rngs.seeds):
        if starts_from_noise(seed, noise_fraction):
            field = procedural_texture(torch.rand(1, 3, 1, 1, generator=g), torch.randn(1, 3, 4, 4, generator=g) * TEXTURE_STD,
                                       torch.randn(1, 3, image_size, image_size, generator=g) * GRAIN_STD)
            with torch.no_grad():
                z.append(encode(vqgan, field.to(book.device, book.dtype) * 2 - 1)[0])
        else:
            z.append(code_grid(book, g, side))
    return torch.stack(z).contiguous()


def code_grid(book: torch.Tensor, g: torch.Generator, n: int, cell: int = 1) -> torch.Tensor:
    """[C, n*cell, n*cell] latents: an n x n grid of uniformly random codes of `book` drawn from `g`,
    each repeated over a cell x cell square of latent positions."""
    idx = torch.randint(book.shape[0], (n * n,), generator=g).to(book.device)
    return book[idx].view(n, n, -1).permute(2, 0, 1).repeat_interleave(cell, 1).repeat_interleave(cell, 2)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images [B,3,H,W] in [0,1] -> uint8 [B,H,W,3] on the host, as every written image is stored."""
    return (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


CODE_CELLS = (1, 2, 4)  # side of the square cells of latent positions that share one random code


def random_code_grid(book: torch.Tensor, seed: int, side: int) -> torch.Tensor:
    """[C,side,side] latents of uniformly random codes of `book`, in square cells of a side drawn
    from CODE_CELLS (those dividing `side`), all from `seed`'s own generator."""
    g = torch.Generator().manual_seed(int(seed))
    cells = [c for c in CODE_CELLS if side % c == 0]
    cell = cells[int(torch.randint(len(cells), (1,), generator=g))]
    return code_grid(book, g, side // cell, cell)


def random_code_images(vqgan: torch.nn.Module, seeds: list[int], image_size: int, batch_size: int = 64) -> np.ndarray:
    """Class-name-free images, uint8 [N,H,W,3]: decoded grids of uniformly random codebook entries,
    one image per seed, no teacher guidance.

    Each image draws its cell size from its own seed: one latent position per code (the generator's
    fine mottle), or square cells of 2 or 4 positions sharing one code (larger blobs, edges and
    corners). Why: the user's prompts only show the student what the teacher sees in those classes;
    an embedding student that must later serve a class added by name (docs/ALGORITHM.md §4) also
    needs the teacher's embedding of what the generator can draw beyond them, and these images name
    no class at all. Decoder passes only (3.7 s for 512 toyworld images on one CPU thread)."""
    f = downsample_factor(vqgan)
    if image_size % f:
        raise ValueError(f"synthesis.image_size {image_size} must be a multiple of the VQGAN factor {f}")
    side, book = image_size // f, codebook(vqgan)
    out = []
    for start in range(0, len(seeds), batch_size):
        z = torch.stack([random_code_grid(book, s, side) for s in seeds[start:start + batch_size]])
        with torch.no_grad():
            out.append(to_uint8(render(vqgan, z)))
    return np.concatenate(out) if out else np.zeros((0, image_size, image_size, 3), np.uint8)


def render(vqgan: torch.nn.Module, z: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """Latents -> images in [0,1] through straight-through VQ and clamp."""
    zq = quantize_st(z, codebook(vqgan))
    if channels_last:
        zq = zq.contiguous(memory_format=torch.channels_last)
    return clamp_st((decode(vqgan, zq) + 1) / 2)


def prepare_models(vqgan: torch.nn.Module, teacher: Teacher, settings: SynthesisSettings) -> None:
    """Apply the engine's memory layout to the frozen models, in place and only once.

    It changes how the same arithmetic is scheduled, not what is computed: weights keep their
    values and state_dict keys.
    """
    if settings.channels_last:
        for m in (vqgan, teacher.model.visual):  # each model's own flag: either may be shared with another engine
            if not getattr(m, "_dfkd_channels_last", False):
                m.to(memory_format=torch.channels_last)
                m._dfkd_channels_last = True


class StepDraws(NamedTuple):
    """One step's random draws, made on the host and already on the device before the step's tensor work."""

    rois: torch.Tensor | None  # cutout boxes as `roi_align` rows, None = every cutout is the whole image
    views: ViewParams  # warp grid and the views' uniforms
    noise: torch.Tensor  # [B*cutn,3,S,S] standard normal, image b from its own device stream


def draw_step(rngs: ImageRngs, settings: SynthesisSettings, cut: int, device: torch.device) -> StepDraws:
    """Every random number of one step, each image from its own streams (so a batch equals B single runs)."""
    size = settings.image_size
    u = rngs.uniform(settings.cutn, N_PARAMS)  # [B,cutn,P]
    rois = crop_rois(cutout_boxes(u, size, size, cut, settings.cut_pow), size, size, cut, device, torch.float32)
    noise = rngs.normal((settings.cutn, 3, cut, cut)).flatten(0, 1)
    return StepDraws(rois, view_params(u.flatten(0, 1), settings.augment, cut, device, torch.float32), noise)


@dataclass(frozen=True)
class Competition:
    """The current student, frozen (`frozen_student`), and the teacher's zero-shot head of the
    configured classes: with `synthesis.student_weight` > 0 a synthesis step then also rewards
    images on which the two disagree (`disagreement`), at the distillation's `temperature`."""

    student: torch.nn.Module
    head: torch.Tensor
    temperature: float


def frozen_student(student: torch.nn.Module) -> torch.nn.Module:
    """A copy of `student` in eval mode (batch-norm statistics fixed) whose weights take no
    gradient: synthesis differentiates through it to the image only, and never changes it."""
    import copy

    frozen = copy.deepcopy(student).eval()
    return frozen.requires_grad_(False)


def disagreement(z_t: torch.Tensor, z_s: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-image Jensen-Shannon divergence [B] between teacher and student class distributions at
    `temperature`: bounded (0 to ln 2), so maximising it cannot run away the way KL can once the
    student puts no mass where the teacher does (the "competition" term of adaptive DeepInversion)."""
    log_pt = torch.log_softmax(z_t / temperature, -1)
    log_ps = torch.log_softmax(z_s / temperature, -1)
    log_m = torch.logsumexp(torch.stack([log_pt, log_ps]), 0) - math.log(2)

    def kl_to_m(log_p: torch.Tensor) -> torch.Tensor:
        return (log_p.exp() * (log_p - log_m)).sum(-1)

    return 0.5 * (kl_to_m(log_pt) + kl_to_m(log_ps))


def student_disagreement(x: torch.Tensor, teacher: Teacher, competition: Competition) -> torch.Tensor:
    """`disagreement` of teacher and student on the whole rendered images `x` [B,3,H,W] in [0, 1],
    each seeing them at its own input size."""
    def at(size: int) -> torch.Tensor:
        return x if x.shape[-1] == size else torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)

    z_t = logits_from_features(teacher, competition.head, teacher.encode_images(at(teacher.image_size)))
    z_s = competition.student(at(competition.student.input_size)).float()
    return disagreement(z_t, z_s, competition.temperature)


def step_loss(vqgan: torch.nn.Module, teacher: Teacher, z: torch.Tensor, draws: StepDraws, targets: torch.Tensor,
              settings: SynthesisSettings, competition: Competition | None = None) -> torch.Tensor:
    """Per-image loss [B] of one step (docs/ALGORITHM.md §3): render, cut, augment, encode, spherical
    distance; with a `competition` and `student_weight` > 0, minus `student_weight` x the teacher-student
    disagreement on the rendered image (student-aware synthesis: images the current student gets
    wrong, still pulled towards the prompt).

    Pure tensor work on the device given the step's draws: no host data, no branch on values, so
    `torch.compile` takes it whole (decoder, augmentation, image tower, loss, and their backward).
    """
    b = z.shape[0]
    with autocast(z.device, settings.bf16):
        x = render(vqgan, z, settings.channels_last).float()
    views = crop_resize_rois(x, draws.rois, settings.cutn, teacher.image_size)  # [B*cutn,3,cut,cut]
    views = apply_augment(views, draws.views, settings.augment, draws.noise)
    with autocast(z.device, settings.bf16):
        feats = teacher.encode_images(views).view(b, settings.cutn, -1)  # encode_images returns fp32
    loss = spherical_distance(feats, targets[:, None, :]).mean(1)
    if competition is not None and settings.student_weight > 0:
        loss = loss - settings.student_weight * student_disagreement(x, teacher, competition)
    return loss


@functools.lru_cache(maxsize=None)
def compiled_step_loss(mode: str) -> Callable[..., torch.Tensor]:
    """`step_loss` under `torch.compile` (one wrapper per mode, so its compiled graphs are reused
    across batches and partitions of a process; the on-disk Inductor cache, TORCHINDUCTOR_CACHE_DIR,
    carries them across processes)."""
    return torch.compile(step_loss, mode=None if mode == "default" else mode)


@dataclass
class LatentOptimizer:
    """The per-image latents, their Adam state and the codebook box each step is clamped back into
    (docs/ALGORITHM.md §3); shared by the engine and the reference loop so both run the same step."""

    z: torch.Tensor
    opt: torch.optim.Optimizer
    z_min: torch.Tensor
    z_max: torch.Tensor
    sched: torch.optim.lr_scheduler.LRScheduler | None = None

    @classmethod
    def start(cls, vqgan: torch.nn.Module, rngs: ImageRngs, settings: SynthesisSettings) -> "LatentOptimizer":
        """Why a cosine schedule (`lr_schedule: cosine`): a short schedule needs large early steps to
        move the start far enough, and small late ones so the last steps settle the image rather than
        jump between codes."""
        z = init_latents(vqgan, rngs, settings.image_size, settings.noise_start_fraction).requires_grad_(True)
        book = codebook(vqgan)
        opt = torch.optim.Adam([z], lr=settings.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, settings.iterations)) if settings.lr_schedule == "cosine" else None
        return cls(z, opt, book.min(0).values.view(1, -1, 1, 1), book.max(0).values.view(1, -1, 1, 1), sched)

    def step(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        with torch.no_grad():
            self.z.copy_(torch.maximum(torch.minimum(self.z, self.z_max), self.z_min))


def synthesize_batch(
    vqgan: torch.nn.Module,
    teacher: Teacher,
    targets: torch.Tensor,
    seeds: list[int],
    settings: SynthesisSettings,
    on_step: Callable[[int, float], None] | None = None,
    competition: Competition | None = None,
) -> BatchResult:
    """Optimise one latent per target feature; returns the final images and their cosines."""
    device = targets.device
    prepare_models(vqgan, teacher, settings)
    loss_fn = compiled_step_loss(settings.compile_mode) if settings.compile else step_loss
    rngs = ImageRngs(seeds, device)
    lat = LatentOptimizer.start(vqgan, rngs, settings)
    z = lat.z
    losses: list[torch.Tensor] = []
    for step in range(settings.iterations):
        draws = draw_step(rngs, settings, teacher.image_size, device)
        if settings.compile:
            torch.compiler.cudagraph_mark_step_begin()  # a new iteration for CUDA graphs (reduce-overhead)
        per_image = loss_fn(vqgan, teacher, z, draws, targets, settings, competition)
        lat.step(per_image.sum())
        losses.append(per_image.detach().mean())
        if on_step is not None:
            on_step(step + 1, float(losses[-1]) if (step + 1) % 10 == 0 or step + 1 == settings.iterations else float("nan"))
    with torch.no_grad():
        x = render(vqgan, z)
        if not torch.isfinite(x).all():
            raise NonFiniteError("synthesis produced non-finite pixels")
        images = to_uint8(x)
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
    max_nonfinite_retries: int = 3,
    competition: Competition | None = None,
) -> ClassImages:
    """All images of one class in batches; each finished batch is kept in `work_dir` (atomically).

    Batches already present with the same `fingerprint` are not recomputed, so a killed run
    resumes; a different fingerprint discards them.

    An image whose optimisation ends non-finite (NaN/Inf pixels) is never kept: it is made again
    from `nonfinite_retry_seed(seed, attempt)`, a seed derived from its own, so a re-run makes
    the same choice and the seed actually used is returned (and stored with the batch) for the
    manifest. One unlucky latent thus costs one image's retries, not the class partition; an
    image still non-finite after `max_nonfinite_retries` new seeds is an error (NonFiniteError),
    because then the generator or the settings are at fault, not the seed.
    """
    work_dir = Path(work_dir)
    fp_file = work_dir / "fingerprint"
    if work_dir.is_dir() and (not fp_file.is_file() or fp_file.read_text() != fingerprint):
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(fp_file, fingerprint)
    n = len(seeds)
    parts, resumed = [], 0
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        path = work_dir / f"batch_{start:06d}_{stop:06d}.npz"
        part = _read_batch(path, seeds[start:stop]) if path.is_file() else None
        if part is not None:
            resumed += stop - start
            if on_step is not None:
                on_step((stop - start) * settings.iterations, float("nan"))
        else:
            images, cosines, used = _finite_batch(
                vqgan, teacher, targets[start:stop], seeds[start:stop], settings, on_step, max_nonfinite_retries, competition
            )
            with torch.no_grad():
                clean = torch.from_numpy(images).to(head.device).permute(0, 3, 1, 2).float() / 255
                preds = (teacher.encode_images(clean) @ head.t()).argmax(-1).cpu().numpy()
            buf = io.BytesIO()
            np.savez(buf, images=images, cosines=cosines, preds=preds, seeds=np.asarray(used, dtype=np.int64))
            atomic_write_bytes(path, buf.getvalue())
            part = (images, cosines, preds, np.asarray(used, dtype=np.int64))
        parts.append(part)
    images, cosines, preds, used = (np.concatenate([p[i] for p in parts]) for i in range(4))
    return ClassImages(images, cosines, preds, used, resumed)


def _read_batch(path: Path, seeds: list[int]) -> tuple | None:
    """(images, cosines, preds, seeds) of a finished batch, or None when the file cannot be read (a
    torn copy, a truncated disk): it is this class's own resume state, so it is deleted with a
    warning and the batch is made again, instead of failing every re-run."""
    try:
        with np.load(path, allow_pickle=False) as z:
            # batches kept by an older version carry no seeds: they were made from the requested ones
            used = z["seeds"] if "seeds" in z.files else np.asarray(seeds, dtype=np.int64)
            part = (z["images"], z["cosines"], z["preds"], used)
    except Exception as e:  # noqa: BLE001 - any unreadable batch is remade alike
        warnings.warn(f"synthesis resume batch {path} cannot be read ({type(e).__name__}: {e}); it is deleted and made again", stacklevel=2)
        path.unlink(missing_ok=True)
        return None
    if len(part[0]) != len(seeds):
        warnings.warn(f"synthesis resume batch {path} holds {len(part[0])} images, not {len(seeds)}; it is deleted and made again", stacklevel=2)
        path.unlink(missing_ok=True)
        return None
    return part


class ClassImages(NamedTuple):
    """One class's images from `synthesize_resumable`, in image order."""

    images: np.ndarray  # uint8 [N,H,W,3]
    cosines: np.ndarray  # final cosine of the written (uint8) image to its target, [N]
    preds: np.ndarray  # teacher top-1 class index on the written image, [N]
    seeds: np.ndarray  # int64 [N]: the seed each image was made from (the requested one or its retry seed)
    resumed: int  # images taken from batches an earlier, interrupted run had finished


def nonfinite_retry_seed(seed: int, attempt: int) -> int:
    """Seed of retry `attempt` (1, 2, ...) of the image requested with `seed`: derived, not drawn,
    so a re-run of the class makes the same images and the manifest can say where each came from."""
    return derive_seed(seed, "nonfinite-retry", attempt)


def _finite_batch(
    vqgan: torch.nn.Module,
    teacher: Teacher,
    targets: torch.Tensor,
    seeds: list[int],
    settings: SynthesisSettings,
    on_step: Callable[[int, float], None] | None,
    max_retries: int,
    competition: Competition | None = None,
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """One batch with finite pixels only: (images, cosines, seeds used).

    `synthesize_batch` refuses a batch with any non-finite pixel. The images of a batch are
    independent (per-image loss, element-wise Adam), so each is then made on its own: the ones
    that stay finite keep their seed, the others are reseeded. The batch path stays the fast,
    common one; this costs one extra pass over a batch that went wrong.
    """

    def steps(m: int):
        return None if on_step is None else (lambda step, loss: on_step(m, loss))

    try:
        res = synthesize_batch(vqgan, teacher, targets, list(seeds), settings, on_step=steps(len(seeds)), competition=competition)
        return res.images, res.cosines, list(seeds)
    except NonFiniteError:
        pass
    images, cosines, used = [], [], []
    for j, seed in enumerate(seeds):
        tried = []
        for attempt in range(max_retries + 1):
            s = seed if attempt == 0 else nonfinite_retry_seed(seed, attempt)
            tried.append(s)
            try:
                res = synthesize_batch(vqgan, teacher, targets[j : j + 1], [s], settings, on_step=steps(1), competition=competition)
            except NonFiniteError:
                continue
            images.append(res.images[0])
            cosines.append(res.cosines[0])
            used.append(s)
            break
        else:
            raise NonFiniteError(
                f"synthesis of the image requested with seed {seed} produced non-finite pixels with every seed tried "
                f"({tried}: the seed and {max_retries} derived retry seeds); the generator or the synthesis settings "
                "are at fault (check generator.checkpoint, lower synthesis.lr)"
            )
    return np.stack(images), np.asarray(cosines, dtype=np.float32), used
