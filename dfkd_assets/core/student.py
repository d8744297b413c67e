"""The student classifier (docs/ALGORITHM.md §4): any timm architecture, trained from scratch.

The wrapper owns its preprocessing (resize + normalisation) and its class names, so a consumer
feeds float images in [0, 1] of any size and reads logits in the order of `classes`. It is saved
as plain files and rebuilt from them, never unpickled: `student.json` (timm name, input size,
normalisation, class list) and the safetensors weights (`registry_model.py` logs exactly these);
an embedding student (`student.head: embedding`) adds its classifier as data, `head.safetensors`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save

from dfkd_assets.core.devices import autocast
from dfkd_assets.core.io import atomic_write_bytes, atomic_write_json

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS = "model.safetensors"
META = "student.json"
HEAD = "head.safetensors"  # an embedding student's classifier: the teacher's text embeddings of its classes
EMBEDDING = "embedding"  # student.json `head` of an EmbeddingStudent (a logit student's spec has no `head` key)


def resize_input(x01: torch.Tensor, size: int) -> torch.Tensor:
    """float images [B,3,H,W] resized to size x size as the student's forward does (bilinear, antialias),
    unchanged when they already are; the ONNX export and int8 calibration resize with it too."""
    if x01.shape[-2:] != (size, size):
        x01 = F.interpolate(x01, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x01


class StudentClassifier(torch.nn.Module):
    """A timm backbone with a K-class head; with `embed_dim`, also a linear map of its pooled features
    into the teacher's image-embedding space (trained by feature distillation, distill.feature_weight)."""

    def __init__(self, arch: str, classes: list[str], input_size: int, embed_dim: int | None = None,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD, model_kwargs: dict | None = None):
        super().__init__()
        if arch not in timm.list_models():
            raise ValueError(f"student.arch {arch!r} is not a timm model name (see timm.list_models())")
        self.arch, self.classes, self.input_size, self.embed_dim = arch, list(classes), int(input_size), embed_dim
        self.model_kwargs = dict(model_kwargs or {})
        try:
            self.backbone = timm.create_model(arch, pretrained=False, num_classes=self._backbone_outputs(len(classes)), **self.model_kwargs)
        except TypeError as e:
            raise ValueError(f"student.model_kwargs {self.model_kwargs} do not fit timm's {arch!r}: {e}") from None
        self.embed = torch.nn.Linear(self.backbone.num_features, embed_dim) if embed_dim else None
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def _backbone_outputs(self, num_classes: int) -> int:
        return num_classes

    def _prepare(self, x01: torch.Tensor) -> torch.Tensor:
        return (resize_input(x01, self.input_size) - self.mean) / self.std

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.backbone(self._prepare(x01))

    def logits_and_embedding(self, x01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class logits, L2-normalised embedding in the teacher's space) from one backbone pass."""
        pooled = self.backbone.forward_head(self.backbone.forward_features(self._prepare(x01)), pre_logits=True)
        return self.backbone.get_classifier()(pooled), F.normalize(self.embed(pooled), dim=-1)

    def spec(self) -> dict:
        """Everything but the weights that rebuilds this model: the content of student.json
        (`model_kwargs` only when there are any, so a default student's spec reads as before)."""
        return {"arch": self.arch, "classes": self.classes, "input_size": self.input_size, "embed_dim": self.embed_dim,
                "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist(),
                **({"model_kwargs": self.model_kwargs} if self.model_kwargs else {})}

    def save(self, directory: Path) -> None:
        sd = {k: v.contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write_bytes(Path(directory) / WEIGHTS, save(sd))
        atomic_write_json(Path(directory) / META, self.spec())


class EmbeddingStudent(StudentClassifier):
    """A student whose output is a unit vector in the teacher's image-embedding space, and whose
    classifier is data: the teacher's zero-shot text head (`text_embeddings` [K, D], one row per
    class, and the teacher's `logit_scale`), logits = logit_scale * <embedding, row>.

    Why: the distilled weights then do not depend on the class list, so a class is added (or
    removed) by encoding its name with the teacher's text tower and swapping the head
    (`with_head`): seconds, no synthesis, no distillation. The head is kept out of the weights
    file (non-persistent buffers, saved as head.safetensors), so two versions that differ only
    in their classes share byte-identical weights.
    """

    def __init__(self, arch: str, classes: list[str], input_size: int, text_embeddings: torch.Tensor, logit_scale: float,
                 teacher_id: str, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                 model_kwargs: dict | None = None):
        text_embeddings = torch.as_tensor(text_embeddings, dtype=torch.float32)
        if text_embeddings.ndim != 2 or text_embeddings.shape[0] != len(classes):
            raise ValueError(f"an embedding student's head needs one row per class: {len(classes)} classes, head of shape {tuple(text_embeddings.shape)}")
        super().__init__(arch, classes, input_size, int(text_embeddings.shape[1]), mean, std, model_kwargs)
        self.teacher_id = str(teacher_id)
        self.register_buffer("text_embeddings", F.normalize(text_embeddings.detach().clone(), dim=-1), persistent=False)
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)), persistent=False)

    def _backbone_outputs(self, num_classes: int) -> int:
        return 0  # timm: no classifier, the backbone returns pooled features

    def embedding(self, x01: torch.Tensor) -> torch.Tensor:
        """L2-normalised embedding in the teacher's image space."""
        return F.normalize(self.embed(self.backbone(self._prepare(x01))), dim=-1)

    def logits_and_embedding(self, x01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logit_scale * embedding @ text_embeddings.T, embedding). The product runs in fp32 outside
        autocast, as the teacher's (core/teacher.logits_from_features): these are KD's and the user's logits."""
        e = self.embedding(x01)
        with autocast(e.device, enabled=False):
            return self.logit_scale * e.float() @ self.text_embeddings.t(), e

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.logits_and_embedding(x01)[0]

    def with_head(self, classes: list[str], text_embeddings: torch.Tensor) -> "EmbeddingStudent":
        """A copy with the same weights and a new classifier (one row of `text_embeddings` per class)."""
        other = copy.deepcopy(self)
        text_embeddings = torch.as_tensor(text_embeddings, dtype=torch.float32)
        if text_embeddings.shape != (len(classes), self.embed_dim):
            raise ValueError(f"a head for {len(classes)} classes in a {self.embed_dim}-d space must be [{len(classes)}, {self.embed_dim}], "
                             f"got {tuple(text_embeddings.shape)}")
        other.classes = list(classes)
        other.text_embeddings = F.normalize(text_embeddings.detach().clone(), dim=-1).to(self.text_embeddings.device)
        return other

    def spec(self) -> dict:
        return {**super().spec(), "head": EMBEDDING, "teacher_id": self.teacher_id}

    def head_tensors(self) -> dict[str, torch.Tensor]:
        return {"text_embeddings": self.text_embeddings.contiguous().cpu(), "logit_scale": self.logit_scale.reshape(1).cpu()}

    def save(self, directory: Path) -> None:
        atomic_write_bytes(Path(directory) / HEAD, save(self.head_tensors()))
        super().save(directory)


def build_student(arch: str, classes: list[str], input_size: int, init_seed: int, embed_dim: int | None = None,
                  model_kwargs: dict | None = None) -> StudentClassifier:
    torch.manual_seed(init_seed)
    return StudentClassifier(arch, classes, input_size, embed_dim, model_kwargs=model_kwargs)


def build_embedding_student(arch: str, classes: list[str], input_size: int, init_seed: int, text_embeddings: torch.Tensor,
                            logit_scale: float, teacher_id: str, model_kwargs: dict | None = None) -> EmbeddingStudent:
    """A fresh embedding student whose classifier is `text_embeddings` (the teacher's zero-shot head for `classes`)."""
    torch.manual_seed(init_seed)
    return EmbeddingStudent(arch, classes, input_size, text_embeddings.detach().cpu(), logit_scale, teacher_id, model_kwargs=model_kwargs)


def load_student(directory: Path) -> StudentClassifier:
    directory = Path(directory)
    return load_student_files(directory / META, directory / WEIGHTS, directory / HEAD if (directory / HEAD).is_file() else None)


def load_student_files(spec_file: Path, weights_file: Path, head_file: Path | None = None) -> StudentClassifier:
    """The model described by `spec_file` (student.json) with the tensors of `weights_file` (safetensors,
    every key required) and, for an embedding student, its classifier from `head_file`. A spec
    written before normalisation was recorded means ImageNet's."""
    meta = json.loads(Path(spec_file).read_text())
    norm = tuple(meta.get("mean", IMAGENET_MEAN)), tuple(meta.get("std", IMAGENET_STD))
    if meta.get("head") == EMBEDDING:
        if head_file is None:
            raise ValueError(f"{Path(spec_file).name} describes an embedding student, whose classifier is {HEAD}; no such file was given")
        head = load_file(head_file)
        model = EmbeddingStudent(meta["arch"], meta["classes"], meta["input_size"], head["text_embeddings"], float(head["logit_scale"][0]),
                                 meta["teacher_id"], *norm, model_kwargs=meta.get("model_kwargs"))
        if model.embed_dim != meta.get("embed_dim"):
            raise ValueError(f"{Path(head_file).name} holds {model.embed_dim}-d text embeddings, {Path(spec_file).name} says embed_dim {meta.get('embed_dim')}")
    else:
        model = StudentClassifier(meta["arch"], meta["classes"], meta["input_size"], meta.get("embed_dim"), *norm, model_kwargs=meta.get("model_kwargs"))
    model.load_state_dict(load_file(weights_file), strict=True)
    return model.eval()

