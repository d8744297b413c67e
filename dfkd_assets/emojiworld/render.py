"""World 2's catalogue, sprites and renders.

Catalogue: the emoji of each class's Unicode subgroups that all three packages draw (emoji.json of
emoji-datasource-google gives category/subcategory; OpenMoji's data/openmoji.json its hexcodes).
Members of a class are split once, by a seeded shuffle: the teacher (tiny CLIP, VQGAN, the `real`
reference images) sees only the `train` members, the evaluation only the `heldout` ones.

Domains are styles: `noto` (Google's Noto PNGs), `twemoji` (Twitter's PNGs), `openmoji` (OpenMoji
colour SVG) and `lineart` (OpenMoji black SVG, line art). A sprite is one member in one style as a
64x64 RGBA array (PNGs resized, SVGs rasterised with resvg, which is deterministic software
rendering). A render puts a sprite on a background (white, a flat light colour, or clutter: colour
noise with random shapes) at a random scale, position and small rotation, at 2x the image side,
then downsamples (anti-aliased like the toyworld's). Every random draw comes from a numpy
Generator the caller seeds, so renders are the same on every machine.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dfkd_assets.emojiworld import sources

DOMAINS = ["noto", "twemoji", "openmoji", "lineart"]
DOMAIN_WORDS = {
    "noto": ["noto emoji", "google emoji", "noto icon"],
    "twemoji": ["twemoji", "twitter emoji", "twemoji icon"],
    "openmoji": ["openmoji", "openmoji icon", "colour openmoji"],
    "lineart": ["line drawing", "line art", "outline drawing"],
}
TEMPLATES = ["a {}", "an emoji of a {}", "a noto emoji of a {}", "a twemoji of a {}", "an openmoji of a {}", "a line drawing of a {}"]
CAPTIONS = [
    "a {d} of a {c}", "a {d} of a {c}", "an emoji of a {c}", "a {c}", "a {c} {d}", "{d} of a {c}",
    "a {d} of a {m}, a {c}", "a {m}, a kind of {c}", "a {d} of a {m}", "an emoji of a {m}, a {c}",
]
SPRITE = 64


@dataclass(frozen=True)
class Member:
    id: str  # emoji-datasource `unified`, e.g. 1F436
    name: str  # lower-case Unicode name, e.g. "dog face"
    cls: str
    google: str  # paths inside the packages
    twitter: str
    openmoji: str  # hexcode of the SVG

    def paths(self) -> dict[str, str]:
        return {"noto": self.google, "twemoji": self.twitter, "openmoji": f"color/svg/{self.openmoji}.svg",
                "lineart": f"black/svg/{self.openmoji}.svg"}


def catalogue(emoji_json: list[dict], openmoji_json: list[dict], classes: dict[str, list[str]], max_members: int = 0) -> dict[str, list[Member]]:
    """class -> its members, in Unicode order (every member drawn by all three packages)."""
    om = {e["hexcode"] for e in openmoji_json}
    out: dict[str, list[Member]] = {}
    for cls, subgroups in classes.items():
        members = []
        for e in sorted(emoji_json, key=lambda e: e["sort_order"]):
            if e["subcategory"] not in subgroups or not (e.get("has_img_google") and e.get("has_img_twitter")):
                continue
            hexcode = e["unified"] if e["unified"] in om else e["unified"].replace("-FE0F", "")
            if hexcode not in om:
                continue
            members.append(Member(e["unified"], e["name"].lower(), cls, f"img/google/64/{e['image']}", f"img/twitter/64/{e['image']}", hexcode))
        if len(members) < 2:
            raise ValueError(f"class {cls!r}: {len(members)} members in subgroups {subgroups}; a class needs 2 or more")
        out[cls] = members[:max_members] if max_members else members
    return out


def split(members: dict[str, list[Member]], heldout_fraction: float, seed: int) -> dict[str, dict[str, list[Member]]]:
    """class -> {"train": teacher's members, "heldout": evaluation's}: disjoint, each non-empty."""
    out = {}
    for k, (cls, ms) in enumerate(members.items()):
        perm = np.random.default_rng([seed, 35, k]).permutation(len(ms))
        n_held = min(len(ms) - 1, max(1, round(heldout_fraction * len(ms))))
        held = sorted(perm[:n_held])
        out[cls] = {"train": [ms[i] for i in range(len(ms)) if i not in set(held)], "heldout": [ms[i] for i in held]}
    return out


def _png_sprite(data: bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(data)).convert("RGBA")
    if im.size != (SPRITE, SPRITE):
        im = im.resize((SPRITE, SPRITE), Image.LANCZOS)
    return np.asarray(im)


def _svg_sprite(data: bytes) -> np.ndarray:
    import resvg_py

    png = resvg_py.svg_to_bytes(svg_string=data.decode("utf-8"), width=SPRITE, height=SPRITE, skip_system_fonts=True)
    return _png_sprite(bytes(png))


def load_sprites(tarballs: dict, members: list[Member]) -> dict[tuple[str, str], np.ndarray]:
    """(member id, domain) -> RGBA sprite [64,64,4] uint8, read from the checked package tarballs."""
    google = sources.read_members(tarballs["google"], {m.google for m in members})
    twitter = sources.read_members(tarballs["twitter"], {m.twitter for m in members})
    om = sources.read_members(tarballs["openmoji"], {p for m in members for d, p in m.paths().items() if d in ("openmoji", "lineart")})
    out = {}
    for m in members:
        p = m.paths()
        out[(m.id, "noto")] = _png_sprite(google[p["noto"]])
        out[(m.id, "twemoji")] = _png_sprite(twitter[p["twemoji"]])
        out[(m.id, "openmoji")] = _svg_sprite(om[p["openmoji"]])
        out[(m.id, "lineart")] = _svg_sprite(om[p["lineart"]])
    return out


def _background(rng: np.random.Generator, big: int) -> Image.Image:
    kind = rng.choice(3, p=[0.3, 0.35, 0.35])
    if kind == 0:
        return Image.new("RGB", (big, big), (255, 255, 255))
    if kind == 1:
        return Image.new("RGB", (big, big), tuple(int(v) for v in rng.uniform(150, 255, 3)))
    base = rng.uniform(90, 230, 3)
    noise = rng.normal(0, 28, (big // 8, big // 8, 3)).repeat(8, 0).repeat(8, 1)
    im = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(2, 6))):  # clutter: random translucent-looking shapes and strokes
        col = tuple(int(v) for v in np.clip(base + rng.normal(0, 60, 3), 0, 255))
        x0, y0 = rng.uniform(-big / 4, big, 2)
        w, h = rng.uniform(big / 8, big / 2, 2)
        if rng.random() < 0.5:
            d.ellipse([x0, y0, x0 + w, y0 + h], fill=col)
        else:
            d.line([(x0, y0), (x0 + w, y0 + h)], fill=col, width=int(rng.integers(2, max(3, big // 12))))
    return im.filter(ImageFilter.GaussianBlur(1.0))


def render(sprite: np.ndarray, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """One image, uint8 [size, size, 3]: the sprite on a random background, random scale/position/rotation."""
    big = size * 2
    bg = _background(rng, big)
    side = max(8, int(round(big * rng.uniform(0.6, 0.95))))
    sp = Image.fromarray(sprite).resize((side, side), Image.LANCZOS)
    angle = float(rng.uniform(-15, 15))
    if rng.random() < 0.5:
        sp = sp.transpose(Image.FLIP_LEFT_RIGHT)
    sp = sp.rotate(angle, resample=Image.BICUBIC, expand=True)
    x = int(rng.integers(min(0, big - sp.width), max(0, big - sp.width) + 1))
    y = int(rng.integers(min(0, big - sp.height), max(0, big - sp.height) + 1))
    bg.paste(sp, (x, y), sp)
    return np.asarray(bg.resize((size, size), Image.LANCZOS))


def caption(m: Member, domain: str, rng: np.random.Generator) -> str:
    t = CAPTIONS[rng.integers(len(CAPTIONS))]
    words = DOMAIN_WORDS[domain]
    return t.format(d=words[rng.integers(len(words))], c=m.cls, m=m.name)


def sample(members: list[Member], sprites: dict, n: int, rng: np.random.Generator, size: int = 32,
           domains: list[str] = DOMAINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n renders with uniformly random member and domain: (uint8 [n,s,s,3], member index, domain index)."""
    mem = rng.integers(len(members), size=n)
    dom = rng.integers(len(domains), size=n)
    images = np.stack([render(sprites[(members[i].id, domains[d])], rng, size) for i, d in zip(mem, dom)])
    return images, mem, dom
