"""Evaluation on real images laid out DomainBed-style: root/<domain>/<class>/* (docs/ALGORITHM.md §5).

Folder names are matched to the configured class names by `class_map` or by their normalised
key (`dog` == `Dog`, `hot_dog` == `hot dog`). Missing classes and unknown folders are errors
that name the dataset and the folders, never a silently smaller test set.

What a dataset folder may hold (issue 37): regular files, folders, and symlinks to those that stay
inside the dataset's root. A FIFO (reading it blocks forever), a device, a socket, a symlink that
leaves the root (`x.jpg -> /etc/shadow`, `-> /dev/zero`) or a broken one is an EvalDataError that
names every such entry, before any image is read; `load_image` itself opens without blocking and
reads regular files only. An image is decoded only when its header's size is within bounds
(MAX_IMAGE_PIXELS decoded, and as many after the resize to the model's size, which a 2 x 1 000 000
strip would blow up to 224 x 112 000 000).
"""

from __future__ import annotations

import os
import stat
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
    refuse_special_entries(root, name, found_domains)  # before anything is read: FIFOs, devices, symlinks out of the root
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


_KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}


def _entry_problem(path: Path, real_root: Path, folder_ok: bool) -> str | None:
    """Why `path` may not be in an evaluation folder (None: it may): only regular files and folders,
    or symlinks to them that resolve inside the dataset's root."""
    try:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            target = Path(os.path.realpath(path))
            if not target.is_relative_to(real_root):
                return f"{path} is a symlink to {target}, outside the dataset root {real_root}"
            st = target.stat()
    except OSError as e:
        return f"{path} cannot be examined (a broken or looping symlink?): {e.strerror or e}"
    if stat.S_ISREG(st.st_mode) or (folder_ok and stat.S_ISDIR(st.st_mode)):
        return None
    return f"{path} is {_KINDS.get(stat.S_IFMT(st.st_mode), 'not a regular file')}, not an image file"


MAX_LISTED_PROBLEMS = 20


def refuse_special_entries(root: Path, name: str = "dataset", domains: list[str] | None = None) -> None:
    """EvalDataError naming every entry of root/<domain>/<class>/ (the levels evaluation reads; the
    `domains` given, else all) that is not a regular file or folder, or a symlink to one inside
    `root`; dot files are never read and pass."""
    real_root = Path(os.path.realpath(root))
    problems = []

    def visit(folder: Path, depth: int) -> None:
        for p in sorted(folder.iterdir()):
            if p.name.startswith(".") or (depth == 0 and domains is not None and p.name not in domains):
                continue
            is_image = p.suffix.lower() in IMAGE_SUFFIXES
            problem = _entry_problem(p, real_root, folder_ok=depth < 2 or not is_image)
            if problem:
                problems.append(problem)
            elif depth < 2 and p.is_dir():
                visit(p, depth + 1)

    visit(Path(root), 0)
    if problems:
        shown = problems[:MAX_LISTED_PROBLEMS] + ([f"... and {len(problems) - MAX_LISTED_PROBLEMS} more"] if len(problems) > MAX_LISTED_PROBLEMS else [])
        raise EvalDataError(f"evaluation dataset {name}: {len(problems)} entr{'y' if len(problems) == 1 else 'ies'} under {root} "
                            "cannot be read as images (only regular files, or symlinks to them inside the dataset's root): "
                            + "; ".join(shown) + ". Remove them or replace them by the files they point to")


# Decoding cost is width x height of the *header*, whatever the file size: a 20000 x 20000 PNG of a
# few kilobytes would need 1.2 GB as RGB. Larger images are refused by name before decoding (no
# evaluation image needs them; PIL's own bomb error, at twice its 89 Mpx warning, is reported the same way).
# The resize to the model's size is bounded the same way: a 2 x 1 000 000 strip (a few KB as PNG) would
# become 224 x 112 000 000 pixels (75 GB) with its shorter side at 224.
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # 8192 x 8192, 192 MiB as RGB; also the most pixels a resize may produce


def resized_size(w: int, h: int, size: int) -> tuple[int, int]:
    """(w, h) with the shorter side scaled to `size` (what load_image resizes to before its centre crop)."""
    s = size / min(w, h)
    return max(size, round(w * s)), max(size, round(h * s))


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


def _open_regular(path: Path):
    """`path` opened for reading without blocking (a FIFO would block forever on a plain open), and
    refused unless it is a regular file (FIFO, device, socket, folder): EvalDataError naming it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise EvalDataError(f"image {path} cannot be opened: {e.strerror or e}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise EvalDataError(f"image {path} is {_KINDS.get(stat.S_IFMT(st.st_mode), 'not a regular file')}, not an image file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def load_image(path: Path, size: int) -> np.ndarray:
    """RGB uint8 [size,size,3]: shorter side resized to `size`, centre crop.

    Any mode (grayscale, palette, CMYK, 16-bit) becomes 8-bit RGB; an unreadable file, one that is not
    a regular file, or one whose header declares more than MAX_IMAGE_PIXELS (decoded or after the
    resize) is an EvalDataError naming the file, raised before decoding.
    """
    try:
        with _open_regular(path) as f, Image.open(f) as im:
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise EvalDataError(
                    f"image {path} is {w} x {h} pixels, more than the {MAX_IMAGE_PIXELS} evaluation decodes "
                    f"(core/evaluation.MAX_IMAGE_PIXELS): downscale it or remove it"
                )
            if min(w, h) < 1:
                raise EvalDataError(f"image {path} is {w} x {h} pixels: nothing to evaluate")
            rw, rh = resized_size(w, h, size)
            if rw * rh > MAX_IMAGE_PIXELS:
                raise EvalDataError(
                    f"image {path} is {w} x {h} pixels: with its shorter side resized to {size} px it would be {rw} x {rh}, "
                    f"more than the {MAX_IMAGE_PIXELS} pixels evaluation allocates (core/evaluation.MAX_IMAGE_PIXELS; an aspect "
                    "ratio this extreme is not a photo): crop it or remove it"
                )
            im = _to_rgb(im)
            im = im.resize((rw, rh), Image.BICUBIC)
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
