"""Knowledge distillation of the teacher's zero-shot predictions into the student (docs/ALGORITHM.md §4).

    loss = T^2 * KL(softmax(z_T / T) || softmax(z_S / T))  (+ ce_weight * CE(z_S, prompt class))
Teacher logits are computed on the very augmented batch the student sees. Data lives on the
device as uint8 and is augmented there (random-resized-crop + flip), so training is not
input-bound. A checkpoint is written atomically after every epoch; a re-run with the same
fingerprint resumes from it, a different fingerprint starts over.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from dfkd_assets.core.augment import (
    GRAIN_STD,
    TEXTURE_STD,
    crop_resize,
    jitter_colour,
    luma,
    procedural_texture,
    resized_crop_boxes,
    to_device,
)
from dfkd_assets.core.devices import autocast
from dfkd_assets.core.io import atomic_write_bytes
from dfkd_assets.core.teacher import Teacher, logits_from_features

CHECKPOINT = "last.pt"


@dataclass(frozen=True)
class DistillSettings:
    """KD settings: every field but `bf16` is `distill.<field>` (meaning and default in
    dfkd_assets/config.py::DistillConfig); `bf16` comes from `precision` and the device. Filled in
    dfkd_assets/loaders.py."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    temperature: float
    ce_weight: float
    augment: bool
    min_crop_scale: float
    color_jitter: float
    grayscale_prob: float
    blur_prob: float
    noise_std: float
    mixup_alpha: float
    cutmix_prob: float
    zoom_out_prob: float
    zoom_out_min_scale: float
    zoom_out_background: str
    feature_weight: float
    adversarial_eps: float
    adversarial_steps: int
    teacher_views: int  # 0: the teacher labels every step's fresh augmentation; K > 0: a pool of K labelled views per image
    seed: int
    control: str
    bf16: bool  # autocast teacher and student forwards; teacher logits, KD loss and SGD state stay fp32


class DistillDiverged(RuntimeError):
    """The training loss became non-finite (the message says where and what to change)."""


class CorruptCheckpoint(RuntimeError):
    """The resumable checkpoint cannot be read (the message names the file and how to clear it)."""


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(p_T || p_S) at temperature T, averaged over the batch."""
    t = temperature
    log_ps = F.log_softmax(student_logits / t, dim=-1)
    log_pt = F.log_softmax(teacher_logits / t, dim=-1)
    return (t * t) * (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()


AUGMENT_DRAWS = 16  # uniforms per image and batch: crop (0-3), flip (4), jitter (5-7), gray, blur, cutmix, noise


def crop_flip(x_u8: torch.Tensor, size: int, min_scale: float, u: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,H,W] -> float [B,3,size,size]: random-resized crop (area >= min_scale) + horizontal
    flip, from the uniforms u[:, :5] (CPU, [B, >=5])."""
    _, _, h, w = x_u8.shape
    boxes = resized_crop_boxes(u[:, None, :4], h, w, (min_scale, 1.0))
    x = crop_resize(x_u8.float() / 255, boxes, size)
    flip = to_device(u[:, 4], x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def augment_batch(x_u8: torch.Tensor, size: int, s: DistillSettings, gen: torch.Generator) -> torch.Tensor:
    """uint8 [B,3,H,W] on device -> float [B,3,size,size] in [0,1].

    Random-resized-crop + flip, then (each off by default) colour jitter, grayscale, blur, pixel
    noise, mixup and cutmix. The teacher labels the augmented image itself, so every augmentation here widens
    the input distribution the student learns the teacher on: the only way a student trained on
    synthetic images meets inputs unlike them (other domains) before test time.
    All draws come from `gen` (CPU), so an epoch is reproducible from its seed alone.
    """
    b = x_u8.shape[0]
    dev = x_u8.device
    u = torch.rand(b, AUGMENT_DRAWS, generator=gen)
    x = crop_flip(x_u8, size, s.min_crop_scale, u)
    ud = to_device(u, dev)
    if s.color_jitter > 0:
        f = 1 + (ud[:, 5:8] * 2 - 1) * s.color_jitter
        x = jitter_colour(x, f[:, 0, None, None, None], f[:, 1, None, None, None], f[:, 2, None, None, None]).clamp(0, 1)
    if s.grayscale_prob > 0:
        gray = luma(x).expand_as(x)
        x = torch.where((ud[:, 8] < s.grayscale_prob)[:, None, None, None], gray, x)
    if s.blur_prob > 0:
        blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        x = torch.where((ud[:, 9] < s.blur_prob)[:, None, None, None], blurred, x)
    if s.noise_std > 0:
        noise = to_device(torch.randn(x.shape, generator=gen), dev, x.dtype)
        x = (x + ud[:, 14, None, None, None] * s.noise_std * noise).clamp(0, 1)
    if s.mixup_alpha > 0 or s.cutmix_prob > 0:
        partner = x[to_device(torch.randperm(b, generator=gen), dev)]
        if s.mixup_alpha > 0:
            rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=gen)))  # Beta from `gen`, not the global RNG
            lam = to_device(torch.from_numpy(rng.beta(s.mixup_alpha, s.mixup_alpha, b)), dev, x.dtype)
            x = lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * partner
        if s.cutmix_prob > 0:
            side = (ud[:, 10] * 0.5 + 0.25) * size  # 25-75 % of the side
            cy, cx = ud[:, 11] * (size - side), ud[:, 12] * (size - side)
            r = torch.arange(size, device=dev, dtype=x.dtype)
            in_y = (r[None] >= cy[:, None]) & (r[None] < (cy + side)[:, None])
            in_x = (r[None] >= cx[:, None]) & (r[None] < (cx + side)[:, None])
            paste = (in_y[:, :, None] & in_x[:, None, :] & (ud[:, 13] < s.cutmix_prob)[:, None, None])[:, None]
            x = torch.where(paste, partner, x)
    if s.zoom_out_prob > 0:
        x = zoom_out(x, s.zoom_out_prob, s.zoom_out_min_scale, gen, s.zoom_out_background)
    return x


def zoom_out(x: torch.Tensor, prob: float, min_scale: float, gen: torch.Generator, background: str) -> torch.Tensor:
    """Shrink each image (with probability `prob`) to a random scale in [min_scale, 1] and place it
    at a random position on a background: `procedural` (a random colour, a smooth low-frequency
    texture and pixel grain) or `batch` (a small random crop of another KD input of the batch,
    magnified to the whole frame: the generator's own colours and textures, out of context).

    Why: VQGAN-CLIP images fill the frame with the object on a pale, untextured surround, while
    real domains (photos, paintings) show smaller objects on coloured, textured backgrounds. The
    teacher labels the composite itself, so the student learns the teacher on object-in-context
    inputs without any real image. Draws come from `gen` after all other augmentations' draws.
    """
    b, c, size, _ = x.shape
    dev, dt = x.device, x.dtype
    u = to_device(torch.rand(b, 4, generator=gen), dev, dt)
    base = torch.rand(b, c, 1, 1, generator=gen)
    coarse = torch.randn(b, c, 4, 4, generator=gen) * TEXTURE_STD
    grain = torch.randn(b, c, size, size, generator=gen) * GRAIN_STD  # all drawn in either mode: `procedural` keeps its draws
    if background == "batch":
        partner = x[to_device(torch.randperm(b, generator=gen), dev)]
        boxes = resized_crop_boxes(torch.rand(b, 1, 4, generator=gen), size, size, (0.04, 0.25))
        background = (crop_resize(partner, to_device(boxes, dev, dt), size) + to_device(grain, dev, dt)).clamp(0, 1)
    else:
        background = to_device(procedural_texture(base, coarse, grain), dev, dt)
    on = u[:, 0] < prob
    scale = torch.where(on, min_scale + u[:, 1] * (1 - min_scale), torch.ones_like(u[:, 1]))
    tx, ty = (u[:, 2] * 2 - 1) * (1 - scale), (u[:, 3] * 2 - 1) * (1 - scale)
    theta = torch.zeros(b, 2, 3, device=dev, dtype=dt)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    theta[:, 0, 2], theta[:, 1, 2] = -tx / scale, -ty / scale
    grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)
    shrunk = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    inside = (grid.abs() <= 1).all(-1)[:, None]
    return torch.where(on[:, None, None, None], torch.where(inside, shrunk, background), x)


def adversarial_inputs(
    student: torch.nn.Module, teacher: Teacher, head: torch.Tensor, x: torch.Tensor, s: DistillSettings, gen: torch.Generator
) -> torch.Tensor:
    """The KD inputs moved, within an L-inf ball of radius `adversarial_eps`, towards where the
    student disagrees most with the teacher: `adversarial_steps` signed-gradient ascent steps on
    the KD loss from a random start (PGD).

    Why: the student only learns the teacher where distillation shows it inputs, and a fixed
    synthetic set leaves it free to disagree everywhere else. Searching, per batch, for the
    nearby inputs on which the two differ (the input-space form of the adversarial / competition
    terms of DFAD and adaptive DeepInversion) spends the KD budget on that disagreement; the
    teacher labels the moved inputs itself, so no label noise enters. Draws come from `gen`.
    """
    eps = s.adversarial_eps
    alpha = 2.5 * eps / s.adversarial_steps
    delta = (to_device(torch.rand(x.shape, generator=gen), x.device, x.dtype) * 2 - 1) * eps
    for _ in range(s.adversarial_steps):
        delta.requires_grad_(True)
        xa = (x + delta).clamp(0, 1)
        with autocast(x.device, s.bf16):
            z_t = logits_from_features(teacher, head, teacher.encode_images(xa))
            z_s = student(xa).float()
        (grad,) = torch.autograd.grad(kd_loss(z_s, z_t, s.temperature), delta)
        delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
    return (x + delta).clamp(0, 1).detach()


def resize_batch(x_u8: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B,3,H,W] -> float [B,3,size,size] in [0,1], the whole image (no augmentation)."""
    x = x_u8.float() / 255
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def feature_loss(student_embedding: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """1 - cosine between the student's projected features and the teacher's (normalised) image
    embedding, averaged over the batch: matches the whole embedding, not only its K-class projection."""
    return (1 - F.cosine_similarity(student_embedding, teacher_features, dim=-1)).mean()


@torch.no_grad()
def cached_teacher_features(teacher: Teacher, data: torch.Tensor, size: int, batch_size: int, bf16: bool) -> torch.Tensor:
    """Teacher image features of every clean image, once: without augmentation they never change
    (the logits follow from them with `logits_from_features`)."""
    out = []
    with autocast(data.device, bf16):
        for start in range(0, data.shape[0], batch_size):
            out.append(teacher.encode_images(resize_batch(data[start : start + batch_size], size)))
    return torch.cat(out)


def cached_teacher_logits(teacher: Teacher, head: torch.Tensor, data: torch.Tensor, size: int, batch_size: int, bf16: bool) -> torch.Tensor:
    """Teacher logits of every clean image, once."""
    return logits_from_features(teacher, head, cached_teacher_features(teacher, data, size, batch_size, bf16))


def sgd_cosine(params, lr: float, momentum: float, weight_decay: float, total_steps: int):
    """SGD with momentum and weight decay, its step size decayed by a cosine to 0 over `total_steps`:
    the optimiser of distillation and of the few-shot fine-tune (their hyperparameters are settings)."""
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)


# ---- checkpoints: one file, written atomically after every epoch -------------------------------

def load_checkpoint(path: Path, fingerprint: str, device) -> dict | None:
    """The state saved at `path` when it was written for `fingerprint`; None when there is none or
    it belongs to other settings or data (a different fingerprint: start over).

    It is read with weights_only=True, so a planted file cannot run code. One that cannot be read
    (truncated by hand, planted, another program's) raises CorruptCheckpoint, a named error that is
    not retried and says how to clear it: it is never deleted on a guess."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - every unreadable file gets the same named error
        raise CorruptCheckpoint(f"the distillation checkpoint {path} cannot be read ({type(e).__name__}: {e}). Delete it to "
                                "start this distillation over (it holds only the resumable state of an unfinished training)") from None
    if not isinstance(state, dict):
        raise CorruptCheckpoint(f"the distillation checkpoint {path} holds no checkpoint. Delete it to start this distillation over")
    return state if state.get("fingerprint") == fingerprint else None


def save_checkpoint(path: Path, model: torch.nn.Module, opt, sched, epoch: int, history: list[dict], fingerprint: str) -> None:
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "epoch": epoch, "history": history, "fingerprint": fingerprint}, buf)
    atomic_write_bytes(path, buf.getvalue())


def resume(model: torch.nn.Module, opt, sched, checkpoint: tuple[Path, str] | None, device) -> tuple[int, list[dict]]:
    """(epochs done, their history) after loading the checkpoint of the same fingerprint into model,
    optimiser and schedule; (0, []) when there is none."""
    state = load_checkpoint(checkpoint[0], checkpoint[1], device) if checkpoint else None
    if state is None:
        return 0, []
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    return int(state["epoch"]), list(state["history"])


# ---- the loop -----------------------------------------------------------------------------------

Forward = Callable[[torch.Tensor, torch.Generator], tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]
Clock = Callable[[str], ContextManager]
"""`clock(stage)` wraps one stage of a step (augment, teacher, student, update): the benchmark passes
one that times them (tools/bench.py), training passes none."""


def no_clock(_stage: str) -> ContextManager:
    return contextlib.nullcontext()


def run_epochs(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched,
    forward: Forward,
    batches: Callable[[torch.Generator], Iterable[torch.Tensor]],
    epochs: int,
    epoch_seed: Callable[[int], int],
    checkpoint: tuple[Path, str] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    clock: Clock = no_clock,
) -> list[dict]:
    """The one training loop: for every epoch, a generator seeded by `epoch_seed(epoch)` draws the
    batches (`batches(gen)`, index tensors, drawn lazily so their draws interleave with the
    forward's) and `forward(idx, gen)` returns (named, weighted loss terms, counted metrics); their sum
    is minimised. Per epoch, the mean of every term (`loss_<name>`), their total (`kd_loss`), each
    metric per example and the learning rate form the history record.

    `checkpoint` (path, fingerprint): resume from a checkpoint of the same fingerprint and save one
    after every epoch. A non-finite loss raises DistillDiverged after its epoch, which is not saved.
    The check runs once per epoch, so no step waits for the device."""
    device = next(model.parameters()).device
    start, history = resume(model, opt, sched, checkpoint, device)
    model.train()
    for epoch in range(start, epochs):
        gen = torch.Generator().manual_seed(epoch_seed(epoch))  # resumable: depends on the epoch only
        sums: dict[str, torch.Tensor] = {}
        seen = 0
        first_bad = torch.full((), -1, dtype=torch.long, device=device)
        for i, idx in enumerate(batches(gen)):
            terms, metrics = forward(idx, gen)
            with clock("student"):
                loss = sum(terms.values())
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), first_bad.new_full((), i), first_bad)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            with clock("update"):
                opt.step()
                sched.step()
            for name, value in [("kd_loss", loss), *((f"loss_{k}", v) for k, v in terms.items())]:
                sums[name] = sums.get(name, 0.0) + value.detach() * len(idx)
            for name, count in metrics.items():
                sums[name] = sums.get(name, 0.0) + count
            seen += len(idx)
            if on_step is not None:
                on_step(1)
        if int(first_bad) >= 0:  # nothing of this epoch is saved
            where = f"; the last good checkpoint ({checkpoint[0]}) is kept" if checkpoint else ""
            raise DistillDiverged(f"the training loss became non-finite at epoch {epoch + 1}, step {int(first_bad) + 1}{where}. "
                                  "Lower the learning rate (distill.lr, fewshot.lr) or check the training images.")
        record = {"epoch": epoch + 1, **{k: float(v) / seen for k, v in sums.items()}, "lr": sched.get_last_lr()[0]}
        history.append(record)
        if checkpoint:
            save_checkpoint(checkpoint[0], model, opt, sched, epoch + 1, history, checkpoint[1])
        if on_epoch is not None:
            on_epoch(record)
    return history


# ---- knowledge distillation: one forward with named terms --------------------------------------

def kd_losses(z_s: torch.Tensor, z_t: torch.Tensor, s: DistillSettings, e_s: torch.Tensor | None = None,
              f_t: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The weighted terms of the distillation loss, by name (their sum is minimised):
    `kd` T^2 KL to the teacher's logits; `feature` (distill.feature_weight > 0) 1 - cosine between
    the student's embedding and the teacher's image features; `ce` (distill.ce_weight > 0)
    cross-entropy towards the class an image was made for, images made for no class (label < 0,
    distill.broad_images) left out of the mean."""
    terms = {"kd": kd_loss(z_s, z_t, s.temperature)}
    if s.feature_weight > 0:
        terms["feature"] = s.feature_weight * feature_loss(e_s.float(), f_t)
    if s.ce_weight > 0:
        terms["ce"] = s.ce_weight * F.cross_entropy(z_s, labels, ignore_index=-1, reduction="sum") / (labels >= 0).sum().clamp(min=1)
    return terms


def kd_inputs(student, teacher: Teacher, head: torch.Tensor, x_u8: torch.Tensor, s: DistillSettings, gen: torch.Generator) -> torch.Tensor:
    """uint8 [B,3,H,W] on device -> the float batch the student and the teacher see: augmented
    (`augment_batch`) or whole, then moved towards disagreement when distill.adversarial_eps > 0."""
    size = student.input_size
    x = augment_batch(x_u8, size, s, gen) if s.augment else resize_batch(x_u8, size)
    if s.adversarial_eps > 0:
        x = adversarial_inputs(student, teacher, head, x, s, gen)
    return x


@torch.no_grad()
def teacher_targets(teacher: Teacher, head: torch.Tensor, x: torch.Tensor, s: DistillSettings, gen: torch.Generator,
                    cached: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(image features, logits) of the teacher on `x`, or the `cached` features of the clean images;
    with distill.control `shuffle_teacher` the targets are permuted across the batch (the negative
    control: they no longer belong to their images)."""
    with autocast(x.device, s.bf16):
        f_t = teacher.encode_images(x) if cached is None else cached  # fp32 (encode_images casts)
        if s.control == "shuffle_teacher":
            f_t = f_t[to_device(torch.randperm(len(f_t), generator=gen), x.device)]
        return f_t, logits_from_features(teacher, head, f_t)


def student_terms(student, x: torch.Tensor, f_t: torch.Tensor, z_t: torch.Tensor, labels: torch.Tensor, s: DistillSettings,
                  clock: Clock = no_clock) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The student's side of a step: its forward on `x` and kd_losses' terms against the teacher's
    targets, with {teacher_agreement: how many argmaxes agree}."""
    with clock("student"):
        with autocast(x.device, s.bf16):
            z_s, e_s = student.logits_and_embedding(x) if s.feature_weight > 0 else (student(x), None)
        z_s = z_s.float()  # the loss in fp32
        terms = kd_losses(z_s, z_t, s, e_s, f_t, labels)
    return terms, {"teacher_agreement": (z_s.argmax(-1) == z_t.argmax(-1)).sum()}


def kd_forward(student, teacher: Teacher, head: torch.Tensor, data: torch.Tensor, labels: torch.Tensor, s: DistillSettings,
               cached: torch.Tensor | None = None, clock: Clock = no_clock) -> Forward:
    """The paper's distillation step as `run_epochs` runs it: the batch `idx` of the uint8 images
    `data` [N,3,H,W], freshly augmented and labelled by the teacher at every step."""

    def forward(idx: torch.Tensor, gen: torch.Generator):
        with clock("augment"):
            x = kd_inputs(student, teacher, head, data[idx], s, gen)
        with clock("teacher"):
            f_t, z_t = teacher_targets(teacher, head, x, s, gen, None if cached is None else cached[idx])
        return student_terms(student, x, f_t, z_t, labels[idx], s, clock)

    return forward


@dataclass(frozen=True)
class ViewPool:
    """K augmented views of every KD image and the teacher's image features of each, made once
    (`view_pool`): views uint8 [K,N,3,S,S], features fp32 [K,N,D]."""

    views: torch.Tensor
    features: torch.Tensor


@torch.no_grad()
def view_pool(student, teacher: Teacher, head: torch.Tensor, data: torch.Tensor, s: DistillSettings, clock: Clock = no_clock,
              on_view: Callable[[int], None] | None = None) -> ViewPool:
    """`s.teacher_views` passes of the KD augmentation over the uint8 images `data` [N,3,H,W], each
    labelled by the teacher once: the region-level soft labels of FKD (Shen & Xing, ECCV 2022).

    Why: every epoch of the paper's loop pays the teacher (and the augmentation) again; with a pool,
    an epoch draws one stored view per image and only the student runs. The views are produced by the
    very augmentation of the online loop (batch-level ones such as mixup and zoom-out included) from
    their own seeds, and stored as uint8 (at most 1/510 from the float input, far below the
    augmentation's own noise). Memory: K x N x 3 x S x S bytes (+ K x N x D x 4 for the features)."""
    n, size = data.shape[0], student.input_size
    views = torch.empty(s.teacher_views, n, 3, size, size, dtype=torch.uint8, device=data.device)
    features = None
    with clock("view_pool"):
        for k in range(s.teacher_views):
            gen = torch.Generator().manual_seed(s.seed * 100_003 + VIEW_SEED_OFFSET + k)
            for idx in epoch_batches(n, s.batch_size, data.device)(gen):
                x = augment_batch(data[idx], size, s, gen)
                with autocast(x.device, s.bf16):
                    f_t = teacher.encode_images(x)
                if features is None:
                    features = torch.empty(s.teacher_views, n, f_t.shape[-1], dtype=torch.float32, device=data.device)
                views[k, idx] = (x * 255).round().to(torch.uint8)
                features[k, idx] = f_t.float()
            if on_view is not None:
                on_view(k + 1)
    return ViewPool(views, features)


VIEW_SEED_OFFSET = 1_000_000  # the pool's views draw from their own seeds, apart from the epochs'


def pool_forward(student, teacher: Teacher, head: torch.Tensor, pool: ViewPool, labels: torch.Tensor, s: DistillSettings,
                 clock: Clock = no_clock) -> Forward:
    """A distillation step on the view pool: each image of the batch `idx` shows one of its K stored
    views, drawn from the epoch's generator, with the teacher's stored features of that view."""
    k_views = pool.views.shape[0]

    def forward(idx: torch.Tensor, gen: torch.Generator):
        with clock("augment"):
            v = to_device(torch.randint(k_views, (len(idx),), generator=gen), idx.device)
            x = pool.views[v, idx].float() / 255
        with clock("teacher"):
            f_t = pool.features[v, idx]
            if s.control == "shuffle_teacher":
                f_t = f_t[to_device(torch.randperm(len(f_t), generator=gen), f_t.device)]
            z_t = logits_from_features(teacher, head, f_t)
        return student_terms(student, x, f_t, z_t, labels[idx], s, clock)

    return forward


def epoch_batches(n: int, batch_size: int, device) -> Callable[[torch.Generator], Iterable[torch.Tensor]]:
    """Every index once per epoch, in an order drawn from the epoch's generator, in batches."""

    def batches(gen: torch.Generator):
        order = to_device(torch.randperm(n, generator=gen), device)
        for i in range(max(1, (n + batch_size - 1) // batch_size)):
            yield order[i * batch_size : (i + 1) * batch_size]

    return batches


def distill(
    student: torch.nn.Module,
    teacher: Teacher,
    head: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    settings: DistillSettings,
    checkpoint_dir: Path,
    fingerprint: str,
    on_epoch: Callable[[dict], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    clock: Clock = no_clock,
) -> list[dict]:
    """Train `student` in place; `images`: uint8 [N,H,W,3] (any device), `labels`: prompt class [N]
    (-1: an image made for no class, left out of the cross-entropy term). Resumes from
    `checkpoint_dir` when `fingerprint` matches. Returns the per-epoch history (resumed epochs too)."""
    s = settings
    if s.feature_weight > 0 and getattr(student, "embed", None) is None:
        raise ValueError("distill.feature_weight > 0 needs a student with an embedding head (build_student(..., embed_dim=teacher.embed_dim))")
    device = head.device
    data = images.to(device).permute(0, 3, 1, 2).contiguous()
    n = data.shape[0]
    student.to(device)
    batches = epoch_batches(n, s.batch_size, device)
    opt, sched = sgd_cosine(student.parameters(), s.lr, s.momentum, s.weight_decay, s.epochs * max(1, (n + s.batch_size - 1) // s.batch_size))
    # without augmentation (and PGD) the inputs never change: the teacher sees each image once
    cached = None if s.augment or s.adversarial_eps > 0 else cached_teacher_features(teacher, data, student.input_size, s.batch_size, s.bf16)
    if s.teacher_views > 0:
        if s.adversarial_eps > 0 or not s.augment:
            raise ValueError("distill.teacher_views > 0 needs distill.augment on and distill.adversarial_eps 0 (PGD moves inputs "
                             "with the current student: they cannot be labelled in advance)")
        forward = pool_forward(student, teacher, head, view_pool(student, teacher, head, data, s, clock), labels.to(device), s, clock)
    else:
        forward = kd_forward(student, teacher, head, data, labels.to(device), s, cached, clock)
    history = run_epochs(student, opt, sched, forward, batches, s.epochs, lambda epoch: s.seed * 100_003 + epoch,
                         (Path(checkpoint_dir) / CHECKPOINT, fingerprint), on_epoch, on_step, clock)
    student.eval()
    return history
