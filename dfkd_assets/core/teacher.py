"""The CLIP teacher (docs/ALGORITHM.md §1) through open_clip: encoders, zero-shot head, logits.

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

from dfkd_assets.core.devices import autocast
from dfkd_assets.core.io import sha256_file_cached

SINGLE_TEMPLATE = ("a photo of a {}.",)


class TeacherLoadError(RuntimeError):
    pass


class PromptNotEncodable(ValueError):
    """A prompt the teacher's text tower cannot encode as written (too long, or refused by its tokenizer)."""


class PromptTooLong(PromptNotEncodable):
    """A prompt longer than the text encoder's context. open_clip's tokenizer would cut it without a
    word, and the class would then be encoded from a fragment of its name; refused instead."""


def token_count(tokenizer, text: str) -> int:
    """Tokens of `text` including the start and end tokens, as the text encoder sees them."""
    if hasattr(tokenizer, "encode"):  # open_clip's SimpleTokenizer (CLIP BPE): start/end are added on call
        return len(tokenizer.encode(text)) + 2
    return len(tokenizer.tokenizer(text)["input_ids"])  # Hugging Face tokenizers add their own specials


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

    @property
    def context_length(self) -> int:
        return int(self.tokenizer.context_length)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids [N, context]; a text that would be cut is refused (PromptTooLong) instead."""
        for t in texts:
            n = token_count(self.tokenizer, t)
            if n > self.context_length:
                raise PromptTooLong(f"prompt {t!r} is {n} tokens, more than the text encoder's context of {self.context_length}")
        return self.tokenizer(list(texts)).to(self.device)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        return F.normalize(self.model.encode_text(self.tokenize(texts)).float(), dim=-1)

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


WEIGHT_SUFFIXES = {".pt", ".pth", ".bin", ".safetensors"}
LOCAL_DIR = "local-dir:"


def resolve_pretrained(model_name: str, tag: str, cache_dir: Path | None = None) -> str:
    """An open_clip pretrained tag -> the weights file already in the local cache, or a clear error.

    open_clip would otherwise try the network (and, offline, retry the hub for a long while).
    Looks where open_clip itself would put the file: the Hugging Face cache (safetensors first),
    then the legacy ~/.cache/clip download folder.
    """
    from huggingface_hub import try_to_load_from_cache

    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise TeacherLoadError(
            f"teacher.pretrained={tag!r} is neither a weights file (.pt/.pth/.bin/.safetensors) nor an open_clip tag "
            f"of {model_name} (its tags: {tags or 'none'})"
        )
    tried = []
    if cfg.get("file"):
        tried.append(cfg["file"])
        if Path(cfg["file"]).is_file():
            return cfg["file"]
    if cfg.get("hf_hub"):
        repo, filename = cfg["hf_hub"].rsplit("/", 1)  # 'org/model/' = default file names, 'org/model/file.bin'
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        for name in names:
            found = try_to_load_from_cache(repo, name, cache_dir=str(cache_dir) if cache_dir else None)
            tried.append(f"hf://{repo}/{name}")
            if isinstance(found, str):
                return found
    if cfg.get("url"):
        legacy = Path(cache_dir or Path.home() / ".cache" / "clip") / Path(cfg["url"]).name
        tried.append(str(legacy))
        if legacy.is_file():
            return str(legacy)
    raise TeacherLoadError(
        f"teacher.pretrained={tag!r} for {model_name} is not in the local cache and nothing is downloaded at run "
        f"time. Looked for: {', '.join(tried)}. Download it on a connected machine (e.g. "
        f"`huggingface-cli download {cfg.get('hf_hub', '').rstrip('/')}`) and copy the cache here, or set "
        f"teacher.pretrained to the weights file's path."
    )


def _check_local_dir(model_name: str) -> Path:
    """`local-dir:/path`: an open_clip bundle (open_clip_config.json + weights); refuse a bundle without weights."""
    path = Path(model_name[len(LOCAL_DIR):])
    if not (path / "open_clip_config.json").is_file():
        raise TeacherLoadError(f"teacher.model_name {model_name!r}: {path}/open_clip_config.json not found (a local-dir bundle needs it)")
    weights = [p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES]
    if not weights:
        raise TeacherLoadError(f"teacher.model_name {model_name!r}: no weights file (*.safetensors, *.bin, *.pth) in {path}")
    return max(weights, key=lambda p: p.suffix == ".safetensors")


def load_teacher(
    model_name: str,
    pretrained: str | None,
    model_config_file: Path | None,
    init_seed: int,
    device: torch.device,
    cache_dir: Path | None = None,
) -> Teacher:
    """Build the open_clip model; weights from a local file, a local-dir bundle or the local cache, never the network."""
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
    if model_name.startswith(LOCAL_DIR):
        weights = _check_local_dir(model_name)
        model = _create(model_name, None, device)
        # by content, not by the bundle's path: its weights and its open_clip_config.json (issue 37)
        bundle_cfg = sha256_file_cached(weights.parent / "open_clip_config.json")[:12]
        teacher_id = f"{LOCAL_DIR}{sha256_file_cached(weights)[:16]}:{bundle_cfg}"
    elif open_clip.get_model_config(model_name) is None:
        raise TeacherLoadError(f"teacher.model_name {model_name!r} is not an open_clip architecture (see open_clip.list_models())")
    elif pretrained is None:
        torch.manual_seed(init_seed)
        model = _create(model_name, None, device)
        teacher_id = f"{model_name}:random:{init_seed}:{cfg_hash}"
    else:
        as_path = Path(pretrained)
        if as_path.suffix in WEIGHT_SUFFIXES:
            if not as_path.is_file():
                raise TeacherLoadError(f"teacher.pretrained weights file {as_path} not found: put the checkpoint there or fix the setting")
            weights = as_path
        else:
            weights = Path(resolve_pretrained(model_name, pretrained, cache_dir))
        model = _create(model_name, str(weights), device)
        teacher_id = f"{model_name}:{sha256_file_cached(weights)[:16]}:{cfg_hash}"
    model.eval().requires_grad_(False)
    pp = getattr(model.visual, "preprocess_cfg", {}) or {}
    mean = torch.tensor(pp.get("mean", open_clip.OPENAI_DATASET_MEAN), device=device).view(1, 3, 1, 1)
    std = torch.tensor(pp.get("std", open_clip.OPENAI_DATASET_STD), device=device).view(1, 3, 1, 1)
    size = model.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    return Teacher(model, open_clip.get_tokenizer(model_name), size, mean, std, teacher_id)


def _create(model_name: str, weights: str | None, device: torch.device) -> torch.nn.Module:
    """open_clip.create_model with loading errors (wrong architecture, truncated file) named as settings."""
    try:
        return open_clip.create_model(model_name, pretrained=weights, device=device)
    except Exception as e:
        first = " ".join(line.strip() for line in str(e).strip().splitlines()[:3])[:600] or type(e).__name__
        raise TeacherLoadError(
            f"teacher weights {weights or model_name} could not be loaded into teacher.model_name={model_name!r}: {first}"
        ) from e


def check_prompts_fit(teacher: Teacher, class_name: str, prompts: Sequence[str], setting: str) -> None:
    """Refuse, naming the class and the setting, a class whose prompts exceed the text context or
    that the tokenizer cannot take at all."""
    for p in prompts:
        try:
            n = token_count(teacher.tokenizer, p)
        except Exception as e:  # a tokenizer's own failure would not say which class it was given
            raise PromptNotEncodable(f"class {class_name!r} cannot be encoded by the teacher's text tower: its tokenizer failed on the "
                                f"prompt {p!r} ({type(e).__name__}: {e}). Rename the class.") from e
        if n > teacher.context_length:
            raise PromptTooLong(
                f"class {class_name!r} (in `classes`) does not fit the teacher's text encoder: with {setting} its prompt "
                f"{p!r} is {n} tokens, more than the encoder's context of {teacher.context_length}; it would be cut silently. "
                f"Shorten the class name (or {setting})."
            )


@torch.no_grad()
def zero_shot_head(teacher: Teacher, classes: Sequence[str], templates: str | Sequence[str]) -> torch.Tensor:
    """t_k = normalize(mean over templates of g(template(c_k))): [K, D]."""
    temps = _templates(templates)
    for c in classes:  # every class checked before any encoding: a refused name costs no compute
        check_prompts_fit(teacher, c, [t(c) for t in temps], "teacher.templates")
    rows = []
    for c in classes:
        feats = teacher.encode_text([t(c) for t in temps])
        rows.append(F.normalize(feats.mean(0), dim=-1))
    return torch.stack(rows)


def teacher_logits(teacher: Teacher, head: torch.Tensor, x01: torch.Tensor) -> torch.Tensor:
    """z_T(x)_k = s * <f(x), t_k>.

    The image tower may run under bf16 autocast; the product with the head does not: in bf16 a
    result near 30 (a logit at CLIP's scale 100) is rounded to a multiple of 0.125, and these logits
    are KD's targets. In fp32 the product costs nothing next to the encoder.
    """
    return logits_from_features(teacher, head, teacher.encode_images(x01))


def logits_from_features(teacher: Teacher, head: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """`teacher_logits` from already computed image features (fp32, as the head), outside autocast."""
    with autocast(feats.device, enabled=False):
        return teacher.logit_scale * feats @ head.t()


