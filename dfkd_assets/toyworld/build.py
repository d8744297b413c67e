"""`dfkd toyworld build --out DIR`: render the world, train its tiny CLIP and VQGAN, write the
held-out evaluation set, and check everything loads through the pipeline's real loaders.

Cached: DIR/toyworld.json records the hash of the settings; a build with the same settings is a
no-op, a different one rebuilds. Outputs are written to a temporary folder and swapped in at the
end, so an interrupted build never leaves a half-built world behind.

Pinned: the tiny CLIP and VQGAN of the default settings are trained once and shipped in
dfkd_assets/toyworld/pinned/<settings hash>/ (`dfkd toyworld pin DIR`), as a real product ships a
pretrained CLIP. Training on the CPU is not bit-reproducible across CPU models, so every machine
that trained its own teacher measured a different one (painting 0.72 on one, 0.76 on another); a
build of pinned settings restores those weights instead (seconds, not 10-30 minutes), renders the
evaluation set (procedural, the same on every machine) and refuses weights whose teacher does not
score what the pin recorded. `--train` trains here anyway; other settings always train.

DIR/
  clip/dfkd-toy-clip.json, clip/open_clip_model.safetensors   open_clip config + weights
  vqgan/config.yaml, vqgan/last.ckpt                          taming config + Lightning-style ckpt
  eval/<domain>/<class>/*.png                                 held-out images (DomainBed layout)
  style_words.txt                                             Mix-Prompt dictionary in the world's vocabulary
  toyworld.json                                               settings, hash, timings, teacher zero-shot per domain
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from dfkd_assets import pinned_world
from dfkd_assets.core.io import sha256_file
from dfkd_assets.ownership import check_owned, claim, remove_owned
from dfkd_assets.toyworld import world
from dfkd_assets.toyworld.config import ToyworldConfig

CLIP_NAME = "dfkd-toy-clip"
TEMPLATES = ["a {}", "a photo of a {}", "a sketch of a {}", "a cartoon of a {}", "a painting of a {}"]
MANIFEST = "toyworld.json"
OWNER = "toyworld"  # the ownership marker's kind (dfkd_assets/ownership.py)
PINNED = Path(__file__).parent / "pinned"
PINNED_FILES = ("clip/" + CLIP_NAME + ".json", "clip/open_clip_model.safetensors", "vqgan/config.yaml", "vqgan/last.ckpt")


class PinnedWorldError(RuntimeError):
    """Pinned weights that are incomplete or do not reproduce the teacher the pin recorded."""


def is_built(out: Path, cfg: ToyworldConfig, train: bool = False, pinned_root: Path = PINNED) -> bool:
    """pinned_world.is_built for these settings."""
    return pinned_world.is_built(out, MANIFEST, cfg.settings_hash(), pinned_dir(cfg, pinned_root), train)


def write_eval(root: Path, cfg: ToyworldConfig) -> int:
    n = 0
    for d_i, d in enumerate(world.DOMAINS):
        for c_i, c in enumerate(world.CLASSES):
            rng = np.random.default_rng([cfg.seed, 7_777, d_i, c_i])  # a stream no training image uses
            folder = root / d / c
            folder.mkdir(parents=True, exist_ok=True)
            names = list(world.COLOURS)
            for i in range(cfg.eval_per_class):
                from PIL import Image

                Image.fromarray(world.render(c, d, names[rng.integers(len(names))], rng, cfg.image_size)).save(folder / f"{i:04d}.png")
                n += 1
    return n


def pinned_dir(cfg: ToyworldConfig, root: Path = PINNED) -> Path:
    return Path(root) / cfg.settings_hash()


def build(cfg: ToyworldConfig, out: Path, log: Callable[[str], None] = print, force: bool = False, train: bool = False,
          pinned_root: Path = PINNED) -> dict:
    """The world in `out`: restored from the pinned weights of these settings when there are any
    (unless `train`), else trained here."""
    out = Path(out)
    if not force and is_built(out, cfg, train, pinned_root):
        log(f"toyworld in {out} is up to date (settings {cfg.settings_hash()})")
        return json.loads((out / MANIFEST).read_text())
    check_owned(out, OWNER, legacy=MANIFEST)  # before any work: a folder of someone else's is never replaced
    tmp = out.with_name(out.name + ".building")
    remove_owned(tmp, OWNER)
    claim(tmp, OWNER)
    pin = pinned_dir(cfg, pinned_root)
    try:
        return _restore_pinned(cfg, pin, tmp, out, log) if pin.is_dir() and not train else _train(cfg, tmp, out, log)
    finally:
        if tmp.exists():  # swapped in (gone) on success; a failure leaves `out` as it was
            remove_owned(tmp, OWNER)


def _restore_pinned(cfg: ToyworldConfig, pin: Path, tmp: Path, out: Path, log) -> dict:
    """The pinned weights copied into the world; the rest rendered; the teacher checked against the pin."""
    t0 = time.perf_counter()
    missing = [f for f in (*PINNED_FILES, MANIFEST) if not (pin / f).is_file()]
    if missing:
        raise PinnedWorldError(f"pinned toyworld {pin} lacks {', '.join(missing)}: restore it from git, or build with --train")
    pinned = json.loads((pin / MANIFEST).read_text())
    log(f"toyworld: restoring the pinned tiny CLIP and VQGAN of settings {cfg.settings_hash()} (trained on {pinned.get('machine', '?')})")
    for f in PINNED_FILES:
        if sha256_file(pin / f) != pinned.get("files", {}).get(f):  # a record without the hash is refused like a changed file
            raise PinnedWorldError(f"pinned file {pin / f} does not match the sha256 its toyworld.json records: restore it from git, "
                                   "or build with --train")
        (tmp / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(pin / f, tmp / f)
    extra = {"source": f"pinned {pin.name}", "machine": pinned.get("machine"), "clip_final_loss": pinned.get("clip_final_loss")}
    return _finish(cfg, tmp, out, extra, t0, log, expect=pinned["teacher_zero_shot"])


def _train(cfg: ToyworldConfig, tmp: Path, out: Path, log) -> dict:
    import open_clip
    import torch

    from dfkd_assets.core.vqgan import build_vqgan
    from dfkd_assets.toyworld.train import save_clip, save_vqgan, train_clip, train_vqgan

    timings, t0 = {}, time.perf_counter()
    torch.manual_seed(cfg.seed)

    log(f"toyworld: rendering {cfg.train_images} training images")
    images, cls, dom, cols = world.sample(cfg.train_images, np.random.default_rng([cfg.seed, 1]), cfg.image_size)
    timings["render_s"] = time.perf_counter() - t0

    c = cfg.clip
    if c.vision_tower == "resnet":
        vision = {"image_size": cfg.image_size, "layers": [c.vision_layers] * 4, "width": c.vision_width}
    else:
        vision = {"image_size": cfg.image_size, "layers": c.vision_layers, "width": c.vision_width, "head_width": 32, "patch_size": c.patch_size}
    model_cfg = {
        "embed_dim": c.embed_dim,
        "vision_cfg": vision,
        "text_cfg": {"context_length": c.context_length, "vocab_size": 49408, "width": c.text_width, "heads": max(1, c.text_width // 32),
                     "layers": c.text_layers},
    }
    cfg_path = tmp / "clip" / f"{CLIP_NAME}.json"
    cfg_path.parent.mkdir()
    cfg_path.write_text(json.dumps(model_cfg))
    open_clip.add_model_config(cfg_path)
    clip = open_clip.create_model(CLIP_NAME, pretrained=None)
    t = time.perf_counter()
    losses = train_clip(clip, open_clip.get_tokenizer(CLIP_NAME), images, cls, dom, cols, c, cfg.seed, log)
    timings["clip_train_s"] = time.perf_counter() - t
    _, clip_weights = save_clip(clip, model_cfg, CLIP_NAME, tmp / "clip")

    v = cfg.vqgan
    params = {
        "embed_dim": v.embed_dim, "n_embed": v.n_embed,
        "ddconfig": {"double_z": False, "z_channels": v.embed_dim, "resolution": cfg.image_size, "in_channels": 3, "out_ch": 3,
                     "ch": v.ch, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
    }
    vq = build_vqgan(params)
    t = time.perf_counter()
    vq_stats = train_vqgan(vq, images, v, cfg.seed, log)
    timings["vqgan_train_s"] = time.perf_counter() - t
    save_vqgan(vq, params, tmp / "vqgan", v.steps)
    extra = {"clip_final_loss": float(np.mean(losses[-50:])), **{f"vqgan_{k}": val for k, val in vq_stats.items()},
             "machine": _machine(), "source": "trained", "timings": timings}
    return _finish(cfg, tmp, out, extra, t0, log)


def _finish(cfg: ToyworldConfig, tmp: Path, out: Path, extra: dict, t0: float, log, expect: dict | None = None) -> dict:
    """Evaluation set and style words rendered into `tmp`, everything loaded through the pipeline's
    real loaders, the teacher measured (and held to `expect`, a pin's record), `tmp` swapped in."""
    import torch

    from dfkd_assets.core.evaluation import evaluate, scan_domainbed
    from dfkd_assets.core.teacher import load_teacher, teacher_logits, zero_shot_head
    from dfkd_assets.core.vqgan import load_vqgan

    cfg_path, clip_weights = tmp / "clip" / f"{CLIP_NAME}.json", tmp / "clip" / "open_clip_model.safetensors"
    log("toyworld: writing the held-out evaluation set")
    n_eval = write_eval(tmp / "eval", cfg)
    (tmp / "style_words.txt").write_text(
        "# Mix-Prompt dictionary in the toyworld's vocabulary (words its tiny CLIP was trained on)\n"
        + "\n".join(w for ws in world.DOMAIN_WORDS.values() for w in ws) + "\n"
    )

    # check through the pipeline's real loaders, and measure the teacher
    cpu = torch.device("cpu")
    teacher = load_teacher(CLIP_NAME, str(clip_weights), cfg_path, 0, cpu)
    load_vqgan(tmp / "vqgan" / "config.yaml", tmp / "vqgan" / "last.ckpt", 0, cpu)
    head = zero_shot_head(teacher, world.CLASSES, TEMPLATES)
    sets = scan_domainbed(tmp / "eval", world.CLASSES, name="toyworld")
    res = evaluate({"teacher": lambda x: teacher_logits(teacher, head, x)}, sets, len(world.CLASSES), cfg.image_size, 256, cpu)["teacher"]
    # the same weights on another CPU may flip a borderline image or two, tampered ones far more
    if expect is not None and any(abs(res.top1.get(d, -1.0) - a) > 2.5 / (cfg.eval_per_class * len(world.CLASSES)) for d, a in expect.items()):
        raise PinnedWorldError(f"the pinned teacher scores {res.top1} here, the pin recorded {expect}: its weights or the evaluation "
                               "set changed; restore the pinned files from git, or build with --train")
    seconds = time.perf_counter() - t0
    manifest = {
        **extra, "settings": cfg.model_dump(mode="json"), "settings_hash": cfg.settings_hash(), "classes": world.CLASSES,
        "domains": world.DOMAINS, "teacher_zero_shot": res.top1, "teacher_zero_shot_mean": res.mean_top1, "templates": TEMPLATES,
        "eval_images": n_eval, "timings": {**extra.get("timings", {}), "total_s": seconds},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    remove_owned(out, OWNER, legacy=MANIFEST)
    tmp.rename(out)
    log(f"toyworld {'restored' if expect is not None else 'built'} in {seconds:.0f} s: teacher zero-shot "
        + ", ".join(f"{d} {a:.2f}" for d, a in res.top1.items()))
    return manifest


def pin(out: Path, root: Path = PINNED) -> Path:
    """`dfkd toyworld pin DIR`: the trained weights and manifest of the world in DIR copied to
    root/<settings hash>/, the files a build of the same settings then restores (commit them)."""
    keep = ("settings", "settings_hash", "teacher_zero_shot", "teacher_zero_shot_mean", "clip_final_loss", "machine", "timings")
    return pinned_world.pin_world(out, root, PINNED_FILES, MANIFEST, keep, OWNER)


def _machine() -> str:
    """The CPU that trained a world: its teacher differs from another CPU model's."""
    import platform

    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores"
