"""Few-shot protocol (docs/ALGORITHM.md §5, the paper's Fig. 5): is the distilled student a better
starting point than the same architecture from scratch (or from ImageNet weights)?

For every domain, k labelled images per class are drawn (seeded), each starting point is
fine-tuned on them with the same recipe, and top-1 is measured on the remaining images of that
domain. Repeated over seeds; the same draw is used for every starting point.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from dfkd_assets.core.distill import AUGMENT_DRAWS, crop_flip, run_epochs, sgd_cosine


@dataclass(frozen=True)
class FewShotSettings:
    """Filled from `fewshot.*` (and `distill.min_crop_scale`) by dfkd_assets/loaders.py."""

    shots: tuple[int, ...]
    seeds: tuple[int, ...]
    steps: int
    lr: float
    momentum: float
    weight_decay: float
    batch_size: int
    min_crop_scale: float


def draw_shots(labels: np.ndarray, k: int, seed: int, num_classes: int, domain: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Indices of k images per class (train) and of all the others (test)."""
    rng = np.random.default_rng(seed)
    train = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) <= k:
            raise ValueError(f"few-shot: domain {domain!r} has {len(idx)} images of class {c}; {k} shots need at least {k + 1}")
        train += list(rng.choice(idx, size=k, replace=False))
    train = np.sort(np.asarray(train))
    return train, np.setdiff1d(np.arange(len(labels)), train)


def finetune(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, s: FewShotSettings, seed: int) -> torch.nn.Module:
    """Cross-entropy fine-tuning of every layer, `s.steps` batches drawn with replacement, on the
    distillation's loop and optimiser (core/distill.run_epochs, sgd_cosine); images uint8 [N,3,H,W]
    on the model's device."""
    opt, sched = sgd_cosine(model.parameters(), s.lr, s.momentum, s.weight_decay, s.steps)

    def batches(gen: torch.Generator):
        for _ in range(s.steps):
            yield torch.randint(len(images), (min(s.batch_size, len(images)),), generator=gen).to(images.device)

    def forward(idx: torch.Tensor, gen: torch.Generator):
        x = crop_flip(images[idx], model.input_size, s.min_crop_scale, torch.rand(len(idx), AUGMENT_DRAWS, generator=gen))
        return {"ce": F.cross_entropy(model(x), labels[idx])}, {}

    run_epochs(model, opt, sched, forward, batches, epochs=1, epoch_seed=lambda _: seed)
    return model.eval()


@torch.no_grad()
def top1(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    correct = 0
    for i in range(0, len(images), batch_size):
        correct += int((model(images[i : i + batch_size].float() / 255).argmax(-1) == labels[i : i + batch_size]).sum())
    return correct / max(len(images), 1)


def few_shot_curves(
    starts: dict[str, Callable[[], torch.nn.Module]],
    domains: dict[str, tuple[np.ndarray, np.ndarray]],
    num_classes: int,
    s: FewShotSettings,
    device: torch.device,
    log: Callable[[str], None] = lambda _: None,
) -> list[dict]:
    """Rows {start, domain, shots, seed, top1}. `starts`: name -> fresh model; `domains`: name -> (uint8 [N,H,W,3], labels [N])."""
    rows = []
    for domain, (imgs, labels) in domains.items():
        x = torch.from_numpy(imgs).to(device).permute(0, 3, 1, 2).contiguous()
        y = torch.from_numpy(np.asarray(labels)).to(device)
        for k in s.shots:
            for seed in s.seeds:
                train, test = draw_shots(np.asarray(labels), k, seed, num_classes, domain)
                tr, te = torch.from_numpy(train).to(device), torch.from_numpy(test).to(device)
                for name, make in starts.items():
                    model = finetune(make().to(device), x[tr], y[tr], s, seed)
                    acc = top1(model, x[te], y[te])
                    rows.append({"start": name, "domain": domain, "shots": k, "seed": seed, "top1": acc})
                    log(f"few-shot {name:>9s} {domain} k={k} seed {seed}: {acc:.3f}")
    return rows


def summarize(rows: list[dict]) -> dict:
    """(start, domain, shots) -> (mean, std) over seeds."""
    out: dict = {}
    for key in dict.fromkeys((r["start"], r["domain"], r["shots"]) for r in rows):
        vals = [r["top1"] for r in rows if (r["start"], r["domain"], r["shots"]) == key]
        out[key] = (float(np.mean(vals)), float(np.std(vals)))
    return out


def copy_of(model: torch.nn.Module) -> Callable[[], torch.nn.Module]:
    """A start that is a fresh copy of `model` each time (fine-tuning never touches the original)."""
    return lambda: copy.deepcopy(model)


def load_backbone_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> torch.nn.Module:
    """ImageNet (or any) backbone weights into a student: every tensor but the classifier must fit."""
    own = model.backbone.state_dict()
    classifier = model.backbone.pretrained_cfg.get("classifier", "fc")  # timm names its head, e.g. 'fc', 'head.fc'
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape and not k.startswith(classifier + ".")}
    unfit = sorted(k for k in set(own) - set(usable) if not k.startswith(classifier + "."))
    if unfit:
        raise ValueError(f"fewshot.imagenet_weights {source} does not fit student.arch {model.arch}: missing or mis-shaped {unfit[:8]}")
    model.backbone.load_state_dict(usable, strict=False)
    return model
