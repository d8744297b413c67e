"""A procedural miniature of PACS: 6 shapes in 4 visual domains, with captions.

Each domain has clearly different image statistics, so a classifier trained on one transfers
imperfectly to the others (the out-of-distribution problem the method is about):
  photo     shaded fill, soft shadow, textured gradient background
  sketch    thin jittery dark outline on off-white paper, no fill
  cartoon   flat saturated fill, thick black outline, flat bright background
  painting  blurred fill with brush strokes and colour noise everywhere
Random colour, position, scale and rotation. Captions vary their wording ("a sketch of a red
star", "a red star, drawn in pencil", ...) so the tiny CLIP learns words, not one template.
Images are drawn at 4x and downsampled, so edges are anti-aliased like real photos.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ["circle", "square", "triangle", "star", "cross", "heart"]
DOMAINS = ["photo", "sketch", "cartoon", "painting"]
COLOURS = {
    "red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 210), "yellow": (235, 200, 30),
    "purple": (130, 50, 170), "orange": (240, 130, 20), "pink": (240, 120, 170), "brown": (130, 80, 40),
    "cyan": (40, 190, 200), "gray": (120, 120, 120),
}
DOMAIN_WORDS = {
    "photo": ["photo", "picture", "photograph", "snapshot", "camera photo"],
    "sketch": ["sketch", "drawing", "pencil sketch", "line drawing", "doodle"],
    "cartoon": ["cartoon", "clip art", "comic", "illustration", "cartoon drawing"],
    "painting": ["painting", "oil painting", "watercolor", "artwork", "brush painting"],
}
CAPTION_TEMPLATES = [
    "a {d} of a {c} {s}", "a {d} of a {s}", "a {c} {s}", "a {s}", "a {d} style of a {s}", "a {d} style of a {c} {s}",
    "{d} of a {c} {s}", "a {c} {s} in a {d}", "this is a {d} of a {s}", "a {s} shape",
]
SS = 4  # supersampling factor


def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "circle":
        pts = [(math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, 48, endpoint=False)]
    elif shape == "square":
        pts = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif shape == "star":
        pts = [((1.0 if i % 2 == 0 else 0.42) * math.cos(-math.pi / 2 + i * math.pi / 5),
                (1.0 if i % 2 == 0 else 0.42) * math.sin(-math.pi / 2 + i * math.pi / 5)) for i in range(10)]
    elif shape == "cross":
        a, b = 0.3, 0.9
        pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    elif shape == "heart":
        ts = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        pts = [(16 * math.sin(t) ** 3 / 17, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)) / 17) for t in ts]
    else:
        raise ValueError(f"unknown toyworld shape {shape!r}")
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _jitter(pts, rng, amount):
    return [(x + rng.normal(0, amount), y + rng.normal(0, amount)) for x, y in pts]


def _densify(pts, n=6):
    out = []
    for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]):
        out += [(x0 + (x1 - x0) * t, y0 + (y1 - y0) * t) for t in np.linspace(0, 1, n, endpoint=False)]
    return out


def _shade(colour, k):
    return tuple(int(np.clip(v * k, 0, 255)) for v in colour)


def _paint_photo(pts, col, cx, cy, r, big, rng) -> Image.Image:
    """Shaded fill with a soft drop shadow on a textured gradient: the domain with real-photo statistics."""
    yy, xx = np.mgrid[0:big, 0:big] / big
    base = rng.uniform(60, 200, 3)
    grad = rng.uniform(-60, 60, 3)
    bg = base + grad * (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1))[..., None]
    bg += rng.normal(0, 12, (big // 8, big // 8, 3)).repeat(8, 0).repeat(8, 1)  # coarse texture
    im = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    shadow = Image.new("L", (big, big), 0)
    off = r * 0.12
    ImageDraw.Draw(shadow).polygon([(x + off, y + off) for x, y in pts], fill=110)
    im = Image.composite(Image.new("RGB", (big, big), (20, 20, 20)), im, shadow.filter(ImageFilter.GaussianBlur(big / 40)))
    mask = Image.new("L", (big, big), 0)
    ImageDraw.Draw(mask).polygon(pts, fill=255)
    light = 1.25 - 0.5 * ((xx - (cx / big - 0.15)) ** 2 + (yy - (cy / big - 0.15)) ** 2) ** 0.5 / 0.5
    fill = np.clip(col[None, None] * light[..., None], 0, 255).astype(np.uint8)
    return Image.composite(Image.fromarray(fill), im, mask)


def _paint_sketch(pts, col, cx, cy, r, big, rng) -> Image.Image:
    """Jittery dark outline on off-white paper, no fill: the domain with almost no colour."""
    paper = np.array([245, 242, 232]) + rng.normal(0, 4, (big, big, 3))
    im = Image.fromarray(np.clip(paper, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    ink = tuple(int(v) for v in rng.uniform(20, 70, 3))
    for _ in range(rng.integers(1, 3)):  # one or two jittery strokes over the outline
        p = _jitter(_densify(pts), rng, big / 90)
        d.line(p + p[:1], fill=ink, width=max(1, int(big / 48)))
    if rng.random() < 0.5:  # a hint of colour pencil
        d.line(_jitter(_densify(pts), rng, big / 60) + pts[:1], fill=_shade(col, 1.0), width=max(1, int(big / 96)))
    return im


def _paint_cartoon(pts, col, cx, cy, r, big, rng) -> Image.Image:
    """Flat saturated fill, thick black outline, flat bright background: the domain with hard edges."""
    bg = tuple(int(v) for v in rng.uniform(150, 255, 3))
    im = Image.new("RGB", (big, big), bg)
    d = ImageDraw.Draw(im)
    d.polygon(pts, fill=tuple(int(v) for v in col), outline=(0, 0, 0))
    d.line(pts + pts[:1], fill=(0, 0, 0), width=max(2, int(big / 18)), joint="curve")
    return im


def _paint_painting(pts, col, cx, cy, r, big, rng) -> Image.Image:
    """Blurred fill under brush strokes and colour noise: the domain whose texture hides the outline."""
    bg = rng.uniform(40, 220, 3)
    canvas = bg[None, None] + rng.normal(0, 25, (big // 4, big // 4, 3)).repeat(4, 0).repeat(4, 1)
    im = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    d.polygon(_jitter(pts, rng, big / 30), fill=tuple(int(v) for v in col))
    for _ in range(25):  # brush strokes in the shape's and background's colours
        x0, y0 = rng.uniform(0, big, 2)
        ang = rng.uniform(0, math.pi)
        ln = rng.uniform(big / 10, big / 4)
        c = col if rng.random() < 0.4 else bg
        c = np.clip(c + rng.normal(0, 30, 3), 0, 255)
        d.line([(x0, y0), (x0 + ln * math.cos(ang), y0 + ln * math.sin(ang))], fill=tuple(int(v) for v in c), width=int(big / 20))
    d.polygon(_jitter(pts, rng, big / 25), fill=tuple(int(v) for v in np.clip(col + rng.normal(0, 20, 3), 0, 255)))
    im = im.filter(ImageFilter.GaussianBlur(big / 45))
    arr = np.asarray(im).astype(float) + rng.normal(0, 14, (big, big, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


# One painter per domain, each drawing the shape outline `pts` at supersampled size `big`; they share a
# signature so render() draws the pose once and dispatches, and a new domain is one function and one entry.
_PAINTERS = {"photo": _paint_photo, "sketch": _paint_sketch, "cartoon": _paint_cartoon, "painting": _paint_painting}


def render(shape: str, domain: str, colour: str, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """One image, uint8 [size, size, 3].

    The random draws happen in a fixed order (pose here, then the domain painter's own draws), which the
    pinned worlds' evaluation sets depend on: keep it when editing a painter.
    """
    big = size * SS
    col = np.array(COLOURS[colour], dtype=float)
    r = big * rng.uniform(0.22, 0.38)
    cx, cy = rng.uniform(r, big - r, 2)
    angle = rng.uniform(0, 2 * math.pi) if shape != "heart" else rng.uniform(-0.5, 0.5)
    pts = _shape_points(shape, cx, cy, r, angle)
    if domain not in _PAINTERS:
        raise ValueError(f"unknown toyworld domain {domain!r}")
    im = _PAINTERS[domain](pts, col, cx, cy, r, big, rng)
    return np.asarray(im.resize((size, size), Image.LANCZOS))


def caption(shape: str, domain: str, colour: str, rng: np.random.Generator) -> str:
    t = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    return t.format(d=DOMAIN_WORDS[domain][rng.integers(len(DOMAIN_WORDS[domain]))], c=colour, s=shape)


def sample(n: int, rng: np.random.Generator, size: int = 32, domains=DOMAINS, classes=CLASSES):
    """n images with uniformly random class, domain and colour: (uint8 [n,s,s,3], class idx, domain idx, colour names)."""
    cls = rng.integers(len(classes), size=n)
    dom = rng.integers(len(domains), size=n)
    names = list(COLOURS)
    cols = [names[i] for i in rng.integers(len(names), size=n)]
    images = np.stack([render(classes[c], domains[d], col, rng, size) for c, d, col in zip(cls, dom, cols)])
    return images, cls, dom, cols
