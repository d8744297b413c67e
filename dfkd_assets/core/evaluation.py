"""Evaluation on real images laid out DomainBed-style: root/<domain>/<class>/* (docs/ALGORITHM.md §5).

Folder names are matched to the configured class names by `class_map` or by their normalised
key (`dog` == `Dog`, `hot_dog` == `hot dog`). Missing classes and unknown folders are errors
that name the dataset and the folders, never a silently smaller test set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from dfkd_assets.core.names import class_key

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


class EvalDataError(ValueError):
    pass


@dataclass
class DomainSet:
    domain: str
    paths: list[Path]
    labels: list[int]


@dataclass
class EvalResult:
    top1: dict[str, float]  # domain -> accuracy
    confusion: dict[str, np.ndarray]  # domain -> [K,K] counts (rows: truth)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def mean_top1(self) -> float:
        return float(np.mean(list(self.top1.values()))) if self.top1 else float("nan")


def scan_domainbed(
    root: Path, classes: list[str], class_map: dict[str, str] | None = None, domains: list[str] | None = None,
    max_per_class: int | None = None, name: str = "dataset", other_classes: str = "error",
) -> list[DomainSet]:
    """Image paths and labels per domain. `other_classes='skip'` ignores class folders outside
    `classes` (a subset of a benchmark); the default treats them as a configuration error."""
    root = Path(root)
    if not root.is_dir():
        raise EvalDataError(f"evaluation dataset {name}: root {root} does not exist")
    by_key = {class_key(c): i for i, c in enumerate(classes)}
    mapped = {folder: by_key[class_key(c)] for folder, c in (class_map or {}).items() if class_key(c) in by_key}
    found_domains = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if domains:
        missing = sorted(set(domains) - set(found_domains))
        if missing:
            raise EvalDataError(f"evaluation dataset {name}: domains {missing} not found under {root} (have {found_domains})")
        found_domains = list(domains)
    if not found_domains:
        raise EvalDataError(f"evaluation dataset {name}: no domain folders under {root}")
    out = []
    for d in found_domains:
        paths, labels, seen = [], [], set()
        for cdir in sorted(p for p in (root / d).iterdir() if p.is_dir()):
            idx = mapped.get(cdir.name, by_key.get(class_key(cdir.name)))
            if idx is None and other_classes == "skip":
                continue
            if idx is None:
                raise EvalDataError(
                    f"evaluation dataset {name}: folder {cdir} matches no class in `classes`; "
                    f"map it with evaluation.datasets[].class_map, set other_classes: skip, or remove it"
                )
            # dot files are never images: macOS `._name.jpg` resource forks ship inside benchmark zips
            files = sorted(p for p in cdir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
            if max_per_class:
                files = files[:max_per_class]
            paths += files
            labels += [idx] * len(files)
            if files:
                seen.add(idx)
        absent = [classes[i] for i in range(len(classes)) if i not in seen]
        if absent:
            raise EvalDataError(f"evaluation dataset {name}: domain {d!r} has no images for classes {absent}")
        out.append(DomainSet(d, paths, labels))
    return out


# Decoding cost is width x height of the *header*, whatever the file size: a 20000 x 20000 PNG of a
# few kilobytes would need 1.2 GB as RGB. Larger images are refused by name before decoding (no
# evaluation image needs them; PIL's own bomb error, at twice its 89 Mpx warning, is reported the same way).
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # 8192 x 8192, 192 MiB as RGB


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB with the full 8-bit range. PIL clips 16/32-bit integer images to 0..255 on convert
    (a 16-bit scan turns almost white), so their values are scaled down first; float images are
    taken as [0, 1]."""
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im, dtype=np.int64)  # I;16 variants and 16-bit data in mode I: 0..65535
        return Image.fromarray((np.clip(a, 0, 65535) >> 8).astype(np.uint8), mode="L").convert("RGB")
    if im.mode == "F":
        a = np.nan_to_num(np.asarray(im, dtype=np.float32))
        return Image.fromarray((np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8), mode="L").convert("RGB")
    return im.convert("RGB")  # L, LA, P, RGBA, CMYK, YCbCr, 1, ...: PIL's conversions are exact here


def load_image(path: Path, size: int) -> np.ndarray:
    """RGB uint8 [size,size,3]: shorter side resized to `size`, centre crop.

    Any mode (grayscale, palette, CMYK, 16-bit) becomes 8-bit RGB; an unreadable file or one whose
    header declares more than MAX_IMAGE_PIXELS is an EvalDataError naming the file.
    """
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise EvalDataError(
                    f"image {path} is {w} x {h} pixels, more than the {MAX_IMAGE_PIXELS} evaluation decodes "
                    f"(core/evaluation.MAX_IMAGE_PIXELS): downscale it or remove it"
                )
            im = _to_rgb(im)
            w, h = im.size
            s = size / min(w, h)
            im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            return np.asarray(im.crop((left, top, left + size, top + size)))
    except EvalDataError:
        raise
    except Image.DecompressionBombError as e:
        raise EvalDataError(f"image {path} is too large to decode safely: {e}") from e
    except (OSError, ValueError, SyntaxError) as e:  # unidentified/truncated files; PIL parsers raise all three
        raise EvalDataError(f"image {path} cannot be decoded: {e}") from e


Predictor = Callable[[torch.Tensor], torch.Tensor]  # float [B,3,H,W] in [0,1] -> logits [B,K]


@torch.no_grad()
def evaluate(
    predictors: dict[str, Predictor], sets: list[DomainSet], num_classes: int, size: int, batch_size: int, device: torch.device,
    prefix: str = "",
) -> dict[str, EvalResult]:
    """Top-1 and confusion per domain for each predictor, loading each image once for all predictors."""
    top1 = {m: {} for m in predictors}
    conf = {m: {} for m in predictors}
    for ds in sets:
        cms = {m: np.zeros((num_classes, num_classes), dtype=np.int64) for m in predictors}
        for i in range(0, len(ds.paths), batch_size):
            batch = np.stack([load_image(p, size) for p in ds.paths[i : i + batch_size]])
            x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float() / 255
            y = np.asarray(ds.labels[i : i + batch_size])
            for m, fn in predictors.items():
                pred = fn(x).argmax(-1).cpu().numpy()
                np.add.at(cms[m], (y, pred), 1)
        key = prefix + ds.domain
        for m in predictors:
            conf[m][key] = cms[m]
            top1[m][key] = float(np.trace(cms[m]) / max(cms[m].sum(), 1))
    counts = {prefix + ds.domain: len(ds.paths) for ds in sets}
    return {m: EvalResult(top1[m], conf[m], counts) for m in predictors}


def transfer_ratio(student: float, teacher: float, chance: float) -> float:
    """(student - chance) / (teacher - chance): how much of the teacher's above-chance accuracy the
    student inherited (1 = all of it). NaN when the teacher itself is at or below chance."""
    return (student - chance) / (teacher - chance) if teacher - chance > 1e-9 else float("nan")
