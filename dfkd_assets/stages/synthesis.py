"""Stage 3: one class's synthesis plan and images (docs/ALGORITHM.md §3).

Where to change how one class is synthesized: `class_plan` decides which style, seed and target
each image gets; `synthesize_class` runs the engine (core/synthesis.py) on that plan and returns
the images with one manifest record each.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dfkd_assets.config import DfkdConfig


@dataclass(frozen=True)
class ClassPlan:
    """What each of a class's images is made from: its style, prompt and seed, in image order."""

    class_name: str
    class_index: int  # the class's index in the bank (and the configured class list)
    styles: list[int]
    prompts: list[str]
    seeds: list[int]

    def targets(self, bank):
        """[N,D] text features the images are optimised towards."""
        import torch

        return torch.stack([bank.features[s, self.class_index] for s in self.styles])


@dataclass
class ClassSynthesis:
    images: object  # uint8 [N,H,W,3]
    records: list[dict]  # one manifest record per image
    resumed: int  # images kept from an interrupted run's finished batches


def class_plan(cfg: DfkdConfig, bank, class_name: str, round_: int = 0) -> ClassPlan:
    """Images spread evenly over the bank's styles; seeds depend on (synthesis.seed, class, index)
    only, so a class's images do not change when other classes are added.

    Round r >= 1 (`operations.images_per_round` images) draws its seeds from (seed, class, round,
    index), never used by another round, and continues the round-robin over the same bank's
    styles from a round-dependent offset (core/rounds.py): new images of the same styles; the
    styles themselves are redrawn only by a new prompt bank."""
    from dfkd_assets.core.rounds import round_seed_parts, style_offset
    from dfkd_assets.core.seeding import derive_seed

    n = cfg.synthesis.images_per_class if round_ == 0 else cfg.operations.images_per_round
    if not n:
        raise ValueError(f"round {round_} asked for, but operations.images_per_round is not set")
    k, offset = bank.class_index(class_name), style_offset(cfg.synthesis.seed, round_, bank.num_styles)
    styles = [(offset + s) % bank.num_styles for s in bank.assignments(n)]
    return ClassPlan(class_name, k, styles, [bank.prompts[s][k] for s in styles],
                     [derive_seed(*round_seed_parts(cfg.synthesis.seed, class_name, round_, i)) for i in range(n)])


def synthesize_class(
    cfg: DfkdConfig, plan: ClassPlan, bank, generator, teacher, head, device, work_dir: Path, fingerprint: str,
    on_step: Callable[[int, float], None] | None = None, student=None,
) -> ClassSynthesis:
    """The plan's images, resumable from `work_dir` (batches with the same fingerprint are kept).

    `student`: the current student (a round >= 1 has one); with `synthesis.student_weight` > 0 the
    images are also pushed to where it disagrees with the teacher (student-aware synthesis,
    core/synthesis.Competition). The caller's `fingerprint` must then name the student too."""
    from dfkd_assets.core.synthesis import Competition, frozen_student, synthesize_resumable
    from dfkd_assets.loaders import synthesis_settings

    aware = student is not None and cfg.synthesis.student_weight > 0
    competition = Competition(frozen_student(student).to(device), head, cfg.distill.temperature) if aware else None
    out = synthesize_resumable(
        generator, teacher, head, plan.targets(bank).to(device), plan.seeds, synthesis_settings(cfg, device),
        cfg.synthesis.batch_size, work_dir=work_dir, fingerprint=fingerprint, on_step=on_step, competition=competition,
    )
    records = [
        {
            "index": i, "class": plan.class_name, "style_id": plan.styles[i], "prompt": plan.prompts[i],
            "seed": int(out.seeds[i]), "final_cosine": round(float(out.cosines[i]), 6),
            "teacher_top1": cfg.classes[int(out.preds[i])],
            # non-finite with its own seed: remade from a seed derived from it (core.synthesis.nonfinite_retry_seed)
            **({"requested_seed": plan.seeds[i]} if int(out.seeds[i]) != plan.seeds[i] else {}),
        }
        for i in range(len(plan.seeds))
    ]
    return ClassSynthesis(out.images, records, out.resumed)


def shard_summary(class_name: str, records: list[dict]) -> dict:
    """Mean final cosine and teacher agreement (share of images the teacher labels as their class)."""
    import numpy as np

    return {
        "num_images": len(records),
        "mean_final_cosine": float(np.mean([r["final_cosine"] for r in records])),
        "teacher_agreement": float(np.mean([r["teacher_top1"] == class_name for r in records])),
        "reseeded_nonfinite": sum("requested_seed" in r for r in records),
    }
