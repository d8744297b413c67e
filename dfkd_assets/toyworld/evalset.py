"""A small procedural evaluation set in DomainBed layout (root/<domain>/<class>/*.png).

Until the full toyworld exists, CI and the demo evaluate on these: class k is a regular polygon
with k+3 corners, drawn as a shaded fill on a noisy background ("photo") or as a thin outline on
paper ("sketch"). Random position, scale, rotation and colour; deterministic for a seed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dfkd_assets.core.names import class_key


def _polygon(rng: np.random.Generator, corners: int, size: int) -> list[tuple[float, float]]:
    r = size * rng.uniform(0.25, 0.42)
    cx, cy = rng.uniform(r, size - r, 2)
    phase = rng.uniform(0, 2 * math.pi)
    return [(cx + r * math.cos(phase + 2 * math.pi * i / corners), cy + r * math.sin(phase + 2 * math.pi * i / corners)) for i in range(corners)]


def draw(domain: str, class_index: int, size: int, rng: np.random.Generator) -> Image.Image:
    pts = _polygon(rng, class_index + 3, size)
    colour = tuple(int(c) for c in rng.integers(30, 226, 3))
    if domain == "sketch":
        im = Image.new("RGB", (size, size), (245, 242, 235))
        ImageDraw.Draw(im).line(pts + pts[:1], fill=(40, 40, 40), width=max(1, size // 32))
        return im
    bg = rng.integers(80, 200, (size, size, 3)).astype(np.uint8)
    im = Image.fromarray(bg)
    ImageDraw.Draw(im).polygon(pts, fill=colour)
    return im


def write_eval_set(root: Path, classes: list[str], domains=("photo", "sketch"), per_class: int = 4, size: int = 32, seed: int = 0) -> int:
    """Writes the set (existing files are overwritten); returns the number of images."""
    n = 0
    for d_i, domain in enumerate(domains):
        for k, c in enumerate(classes):
            out = Path(root) / domain / class_key(c)
            out.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng([seed, d_i, k])
            for i in range(per_class):
                draw(domain, k, size, rng).save(out / f"{i:04d}.png")
                n += 1
    return n
