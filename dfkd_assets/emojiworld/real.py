"""World 2's `real` reference for `dfkd compare`: KD on renders of the teacher's own members (never the
evaluation's held-out members), every domain, as many per class as synthesis makes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dfkd_assets.emojiworld import render
from dfkd_assets.emojiworld.build import MANIFEST


def world_of(cfg) -> Path | None:
    """The emoji world whose eval/ folder the config evaluates on, if any."""
    for ds in cfg.evaluation.datasets:
        root = getattr(ds, "root", None)
        if root is not None and (Path(root).parent / MANIFEST).is_file():
            return Path(root).parent
    return None


def real_images(world: Path, classes: list[str], n: int, seed: int, size: int) -> list[np.ndarray]:
    """n renders per class (uint8 [n,size,size,3], class order) of the class's train members, random style."""
    members = json.loads((Path(world) / "members.json").read_text())
    with np.load(Path(world) / "train_sprites.npz") as z:
        sprites = {k: z[k] for k in z.files}
    rng = np.random.default_rng([seed, 99])
    out = []
    for c in classes:
        ids = [m["id"] for m in members[c]["train"]]
        imgs = []
        for _ in range(n):
            m, d = ids[rng.integers(len(ids))], render.DOMAINS[rng.integers(len(render.DOMAINS))]
            imgs.append(render.render(sprites[f"{m}|{d}"], rng, size))
        out.append(np.stack(imgs))
    return out


def real_images_for(cfg, seed: int) -> list[np.ndarray] | None:
    """`dfkd compare`'s real images when the config evaluates on an emoji world, else None."""
    world = world_of(cfg)
    if world is None:
        return None
    return real_images(world, cfg.classes, cfg.synthesis.images_per_class, seed, cfg.synthesis.image_size)
