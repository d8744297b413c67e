"""The prompt bank (ALGORITHM.md §2): per (style, class) a readable prompt and its text feature.

The text feature is the synthesis target. Only the vanilla baseline (`a photo of a {class}`, one
style) exists so far; the diversified methods (Mix/Random/Contrastive) add styles and style
vectors to the same structure. The bank remembers which teacher produced its features and
refuses to be used with another one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from dfkd_assets.core.io import atomic_write_bytes, atomic_write_json
from dfkd_assets.core.teacher import Teacher

BANK_TENSORS = "bank.safetensors"
BANK_META = "bank.json"


class PromptBankMismatch(RuntimeError):
    pass


@dataclass
class PromptBank:
    method: str
    classes: list[str]
    styles: list[str]  # readable style names, one per style id
    prompts: list[list[str]]  # [style][class]
    features: torch.Tensor  # [S, K, D] normalised text features
    teacher_id: str
    style_vectors: torch.Tensor | None = None  # [S, W] token-embedding-space style vectors

    @property
    def num_styles(self) -> int:
        return len(self.styles)

    def check_teacher(self, teacher_id: str) -> None:
        if teacher_id != self.teacher_id:
            raise PromptBankMismatch(
                f"prompt bank was built with teacher {self.teacher_id!r} but the current teacher is {teacher_id!r}: "
                "re-materialize prompt_bank"
            )

    def class_index(self, class_name: str) -> int:
        try:
            return self.classes.index(class_name)
        except ValueError:
            raise PromptBankMismatch(f"class {class_name!r} is not in the prompt bank {self.classes}: re-materialize prompt_bank") from None

    def assignments(self, class_name: str, count: int) -> list[int]:
        """Style id of each of `count` images of a class: spread evenly (round-robin) over the styles."""
        return [i % self.num_styles for i in range(count)]

    def save(self, directory: Path) -> None:
        tensors = {"features": self.features.contiguous().cpu()}
        if self.style_vectors is not None:
            tensors["style_vectors"] = self.style_vectors.contiguous().cpu()
        atomic_write_bytes(Path(directory) / BANK_TENSORS, save(tensors))
        atomic_write_json(
            Path(directory) / BANK_META,
            {"method": self.method, "classes": self.classes, "styles": self.styles, "prompts": self.prompts, "teacher_id": self.teacher_id},
        )

    @classmethod
    def load(cls, directory: Path) -> "PromptBank":
        directory = Path(directory)
        if not (directory / BANK_META).is_file() or not (directory / BANK_TENSORS).is_file():
            raise FileNotFoundError(f"prompt bank not found in {directory}: materialize prompt_bank first")
        meta = json.loads((directory / BANK_META).read_text())
        t = load_file(directory / BANK_TENSORS)
        return cls(
            method=meta["method"], classes=meta["classes"], styles=meta["styles"], prompts=meta["prompts"],
            features=t["features"], teacher_id=meta["teacher_id"], style_vectors=t.get("style_vectors"),
        )


def vanilla_bank(teacher: Teacher, classes: list[str], template: str) -> PromptBank:
    prompts = [template.format(c) for c in classes]
    return PromptBank(
        method="vanilla", classes=list(classes), styles=["vanilla"], prompts=[prompts],
        features=teacher.encode_text(prompts)[None].cpu(), teacher_id=teacher.teacher_id,
    )


def bank_diagnostics(bank: PromptBank, head: torch.Tensor) -> dict:
    """Diversity (mean pairwise cosine of a class's prompt features; lower = more diverse) and
    semantic preservation (fraction of prompt features whose top-1 under the zero-shot head is their class)."""
    feats = bank.features.float()  # S,K,D
    s, k, _ = feats.shape
    top1 = (feats @ head.float().cpu().t()).argmax(-1)  # S,K
    preserved = (top1 == torch.arange(k)[None]).float().mean().item()
    if s > 1:
        sims = torch.einsum("skd,tkd->kst", feats, feats)
        off = ~torch.eye(s, dtype=torch.bool)
        diversity = sims[:, off].mean().item()
    else:
        diversity = 1.0
    return {"mean_pairwise_cosine": diversity, "class_preserved": preserved, "styles": s, "classes": k}
