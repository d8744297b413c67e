"""The CLIP teacher (ALGORITHM.md §1) through open_clip: encoders, zero-shot head, logits.

The teacher is frozen; gradients still flow *through* its image encoder to the synthesis latents.
Images enter as float tensors in [0, 1]; resizing to the tower's input size and CLIP
normalisation happen here, so callers never need to know the teacher's preprocessing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import open_clip
import torch
import torch.nn.functional as F

from dfkd_assets.core.io import sha256_file

SINGLE_TEMPLATE = ("a photo of a {}.",)


class TeacherLoadError(RuntimeError):
    pass


@dataclass
class Teacher:
    model: torch.nn.Module
    tokenizer: object
    image_size: int
    mean: torch.Tensor  # [1,3,1,1]
    std: torch.Tensor
    teacher_id: str

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def encode_images(self, x01: torch.Tensor) -> torch.Tensor:
        """x01: [B,3,H,W] in [0,1] -> L2-normalised image features [B,D] (differentiable w.r.t. x01)."""
        if x01.shape[-1] != self.image_size or x01.shape[-2] != self.image_size:
            x01 = F.interpolate(x01, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=True)
        return F.normalize(self.model.encode_image((x01 - self.mean) / self.std).float(), dim=-1)


def _templates(kind: str | Sequence[str]) -> Sequence:
    if not isinstance(kind, str):
        return tuple(lambda c, t=t: t.format(c) for t in kind)
    if kind == "openai":
        return open_clip.OPENAI_IMAGENET_TEMPLATES
    if kind == "simple":
        return open_clip.SIMPLE_IMAGENET_TEMPLATES
    return tuple(lambda c, t=t: t.format(c) for t in SINGLE_TEMPLATE)


def load_teacher(
    model_name: str,
    pretrained: str | None,
    model_config_file: Path | None,
    init_seed: int,
    device: torch.device,
) -> Teacher:
    """Build the open_clip model; weights from a local file or the local open_clip/HF cache, never the network."""
    cfg_hash = ""
    if model_config_file is not None:
        model_config_file = Path(model_config_file)
        if not model_config_file.is_file():
            raise TeacherLoadError(f"teacher.model_config_file {model_config_file} not found")
        if model_config_file.stem != model_name:
            raise TeacherLoadError(
                f"teacher.model_config_file is named {model_config_file.name}; open_clip registers it as "
                f"{model_config_file.stem!r}, so teacher.model_name must be {model_config_file.stem!r} (got {model_name!r})"
            )
        open_clip.add_model_config(model_config_file)
        cfg_hash = hashlib.sha256(model_config_file.read_bytes()).hexdigest()[:12]
    if open_clip.get_model_config(model_name) is None:
        raise TeacherLoadError(f"teacher.model_name {model_name!r} is not an open_clip architecture (see open_clip.list_models())")
    if pretrained is None:
        torch.manual_seed(init_seed)
        model = open_clip.create_model(model_name, pretrained=None, device=device)
        teacher_id = f"{model_name}:random:{init_seed}:{cfg_hash}"
    else:
        as_path = Path(pretrained)
        if as_path.suffix in {".pt", ".pth", ".bin", ".safetensors"} and not as_path.is_file():
            raise TeacherLoadError(f"teacher.pretrained weights file {as_path} not found: put the checkpoint there or fix the setting")
        try:
            model = open_clip.create_model(model_name, pretrained=pretrained, device=device)
        except Exception as e:  # open_clip raises RuntimeError/HF errors for a tag missing from the cache
            raise TeacherLoadError(f"teacher.pretrained={pretrained!r} could not be loaded for {model_name}: {e}") from e
        ident = sha256_file(as_path)[:16] if as_path.is_file() else pretrained
        teacher_id = f"{model_name}:{ident}:{cfg_hash}"
    model.eval().requires_grad_(False)
    pp = getattr(model.visual, "preprocess_cfg", {}) or {}
    mean = torch.tensor(pp.get("mean", open_clip.OPENAI_DATASET_MEAN), device=device).view(1, 3, 1, 1)
    std = torch.tensor(pp.get("std", open_clip.OPENAI_DATASET_STD), device=device).view(1, 3, 1, 1)
    size = model.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    return Teacher(model, open_clip.get_tokenizer(model_name), size, mean, std, teacher_id)


@torch.no_grad()
def zero_shot_head(teacher: Teacher, classes: Sequence[str], templates: str | Sequence[str] = "openai") -> torch.Tensor:
    """t_k = normalize(mean over templates of g(template(c_k))): [K, D]."""
    temps = _templates(templates)
    rows = []
    for c in classes:
        feats = teacher.encode_text([t(c) for t in temps])
        rows.append(F.normalize(feats.mean(0), dim=-1))
    return torch.stack(rows)


def teacher_logits(teacher: Teacher, head: torch.Tensor, x01: torch.Tensor) -> torch.Tensor:
    """z_T(x)_k = s * <f(x), t_k>."""
    return teacher.logit_scale * teacher.encode_images(x01) @ head.t()


