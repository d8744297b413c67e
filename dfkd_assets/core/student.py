"""The student classifier (docs/ALGORITHM.md §4): any timm architecture, trained from scratch.

The wrapper owns its preprocessing (resize + normalisation) and its class names, so a consumer
feeds float images in [0, 1] of any size and reads logits in the order of `classes`. It is saved
as two plain files and rebuilt from them, never unpickled: `student.json` (timm name, input size,
normalisation, class list) and the safetensors weights (`registry_model.py` logs exactly these).
"""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save

from dfkd_assets.core.io import atomic_write_bytes, atomic_write_json

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS = "model.safetensors"
META = "student.json"


class StudentClassifier(torch.nn.Module):
    """A timm backbone with a K-class head; with `embed_dim`, also a linear map of its pooled features
    into the teacher's image-embedding space (trained by feature distillation, distill.feature_weight)."""

    def __init__(self, arch: str, classes: list[str], input_size: int, embed_dim: int | None = None,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD):
        super().__init__()
        if arch not in timm.list_models():
            raise ValueError(f"student.arch {arch!r} is not a timm model name (see timm.list_models())")
        self.arch, self.classes, self.input_size, self.embed_dim = arch, list(classes), int(input_size), embed_dim
        self.backbone = timm.create_model(arch, pretrained=False, num_classes=len(classes))
        self.embed = torch.nn.Linear(self.backbone.num_features, embed_dim) if embed_dim else None
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def _prepare(self, x01: torch.Tensor) -> torch.Tensor:
        if x01.shape[-2:] != (self.input_size, self.input_size):
            x01 = F.interpolate(x01, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False, antialias=True)
        return (x01 - self.mean) / self.std

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.backbone(self._prepare(x01))

    def logits_and_embedding(self, x01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class logits, L2-normalised embedding in the teacher's space) from one backbone pass."""
        pooled = self.backbone.forward_head(self.backbone.forward_features(self._prepare(x01)), pre_logits=True)
        return self.backbone.get_classifier()(pooled), F.normalize(self.embed(pooled), dim=-1)

    def spec(self) -> dict:
        """Everything but the weights that rebuilds this model: the content of student.json."""
        return {"arch": self.arch, "classes": self.classes, "input_size": self.input_size, "embed_dim": self.embed_dim,
                "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}

    def save(self, directory: Path) -> None:
        sd = {k: v.contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write_bytes(Path(directory) / WEIGHTS, save(sd))
        atomic_write_json(Path(directory) / META, self.spec())


def build_student(arch: str, classes: list[str], input_size: int, init_seed: int, embed_dim: int | None = None) -> StudentClassifier:
    torch.manual_seed(init_seed)
    return StudentClassifier(arch, classes, input_size, embed_dim)


def load_student(directory: Path) -> StudentClassifier:
    directory = Path(directory)
    return load_student_files(directory / META, directory / WEIGHTS)


def load_student_files(spec_file: Path, weights_file: Path) -> StudentClassifier:
    """The model described by `spec_file` (student.json) with the tensors of `weights_file` (safetensors,
    every key required). A spec written before normalisation was recorded means ImageNet's."""
    meta = json.loads(Path(spec_file).read_text())
    model = StudentClassifier(meta["arch"], meta["classes"], meta["input_size"], meta.get("embed_dim"),
                              tuple(meta.get("mean", IMAGENET_MEAN)), tuple(meta.get("std", IMAGENET_STD)))
    model.load_state_dict(load_file(weights_file), strict=True)
    return model.eval()

