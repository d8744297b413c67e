"""Stage 4: the training set and the distillation of the student (docs/ALGORITHM.md §4)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dfkd_assets.config import DfkdConfig

UNLABELLED = -1  # the label of a KD input made for no class (distill.broad_images); cross-entropy skips it


def training_set(per_class: list, broad=None):
    """Per-class uint8 [N_k,H,W,3] arrays, in class order, and optional class-free images `broad`
    (`broad_images`) -> (images [N,H,W,3], labels [N]) tensors; the label of an image is the class it
    was synthesized for, UNLABELLED for a broad image (KD needs no label: the teacher labels every input)."""
    import numpy as np
    import torch

    extra = [] if broad is None else [broad]
    labels = [k for k, imgs in enumerate(per_class) for _ in range(len(imgs))] + [UNLABELLED] * sum(map(len, extra))
    return torch.from_numpy(np.concatenate([*per_class, *extra])), torch.tensor(labels)


def broad_images(cfg: DfkdConfig, device):
    """`distill.broad_images` class-name-free images (uint8 [N,H,W,3]) decoded from random latents of
    the configured generator (loaded only then), or None when the setting is 0. Seeds come from
    (synthesis.seed, "broad", index): the same images in every run, the first N of a larger set."""
    from dfkd_assets.core.seeding import derive_seed
    from dfkd_assets.core.synthesis import random_code_images
    from dfkd_assets.loaders import generator_for

    n = cfg.distill.broad_images
    if not n:
        return None
    seeds = [derive_seed(cfg.synthesis.seed, "broad", i) for i in range(n)]
    return random_code_images(generator_for(cfg, device), seeds, cfg.synthesis.image_size)


def train_steps(cfg: DfkdConfig, num_images: int) -> int:
    """Optimizer steps of the whole run (for progress and ETA)."""
    return cfg.distill.epochs * ((num_images + cfg.distill.batch_size - 1) // cfg.distill.batch_size)


def distill_student(
    cfg: DfkdConfig, teacher, head, images, labels, device, checkpoint_dir: Path, fingerprint: str,
    on_epoch: Callable[[dict], None] | None = None, on_step: Callable[[int], None] | None = None, init_from=None,
):
    """A fresh `student.arch` distilled from the teacher on (images, labels): (student on CPU in eval
    mode, per-epoch history). Resumes from `checkpoint_dir` when `fingerprint` matches.

    `init_from`: a student whose weights the new one starts from (warm start from the champion,
    `operations.warm_start`); it must be the same architecture for the same classes."""
    from dfkd_assets.core.distill import distill
    from dfkd_assets.core.student import build_embedding_student
    from dfkd_assets.loaders import distill_settings, fresh_student

    s = cfg.student
    if s.head == "embedding":  # its classifier is the teacher's text head: KD trains it through that head
        student = build_embedding_student(s.arch, cfg.classes, s.input_size, s.init_seed, head, teacher.logit_scale, teacher.teacher_id,
                                          s.model_kwargs)
    else:
        embed_dim = int(head.shape[1]) if cfg.distill.feature_weight > 0 else None  # feature distillation: the teacher's embedding size
        student = fresh_student(cfg, embed_dim=embed_dim)
    if init_from is not None:
        student.load_state_dict(init_from.state_dict())
    history = distill(student, teacher, head, images, labels, distill_settings(cfg, device), checkpoint_dir=checkpoint_dir,
                      fingerprint=fingerprint, on_epoch=on_epoch, on_step=on_step)
    return student.cpu().eval(), history


@dataclass(frozen=True)
class KdSet:
    """What a student is distilled on: uint8 images [N,H,W,3], their labels [N], how many of them
    are broad (class-free) images, and the fingerprint that names this training (settings, teacher, data)."""

    images: object
    labels: object
    num_broad: int
    fingerprint: str


def kd_set(cfg: DfkdConfig, teacher_id: str, per_class: list, device, snapshot_id: str | None = None, init_id: str = "") -> KdSet:
    """Training set -> fingerprint, the one composition the `student_model` asset and `dfkd compare`
    share before `distill_student`. The fingerprint covers the settings, the teacher and the data:
    `snapshot_id` (the DVC hash of the synthetic snapshot) plus the broad images' bytes (they are not
    in the snapshot), or, without a snapshot, the bytes of the whole training set; `init_id` names a
    warm start."""
    from dfkd_assets.fingerprints import array_id, student_fingerprint

    broad = broad_images(cfg, device)
    images, labels = training_set(per_class, broad)
    if snapshot_id is None:
        data_id = array_id(images.numpy())
    else:
        data_id = snapshot_id + ("" if broad is None else array_id(broad))
    return KdSet(images, labels, 0 if broad is None else len(broad), student_fingerprint(cfg, teacher_id, data_id + init_id))


def student_for_classes(cfg: DfkdConfig, teacher, base, what: str = "the base student"):
    """`base` (an embedding student distilled from this teacher) serving `cfg.classes`: same weights,
    the teacher's zero-shot head of the classes from their names (`teacher.templates`). Seconds:
    text encodes only, no synthesis, no distillation. Refuses a logit student or another teacher's
    student (core/vocabulary.NotAnEmbeddingStudent), and a name the text tower cannot encode."""
    from dfkd_assets.core.vocabulary import head_for

    return head_for(base, teacher, cfg.classes, cfg.teacher.templates, what).eval()


def classes_with(base_classes: list[str], names: list[str], reserved: tuple[str, ...] = ()) -> list[str]:
    """The class list of `base_classes` plus `names`, each new name checked (core/vocabulary.new_class_names)."""
    from dfkd_assets.core.vocabulary import new_class_names

    return [*base_classes, *new_class_names(base_classes, names, reserved)]


def warm_start_refusal(cfg: DfkdConfig, model) -> str | None:
    """Why `model` (the champion) cannot seed a warm start, None when it can: same arch (and timm kwargs), classes, input size."""
    have = (getattr(model, "arch", None), getattr(model, "model_kwargs", {}), list(getattr(model, "classes", [])), getattr(model, "input_size", None))
    want = (cfg.student.arch, cfg.student.model_kwargs, cfg.classes, cfg.student.input_size)
    return None if have == want else f"champion is {have}, the settings ask for {want}"
