"""`dfkd toyworld build --out DIR`: render the world, train its tiny CLIP and VQGAN, write the
held-out evaluation set, and check everything loads through the pipeline's real loaders.

Cached: DIR/toyworld.json records the hash of the settings; a build with the same settings is a
no-op, a different one rebuilds. Outputs are written to a temporary folder and swapped in at the
end, so an interrupted build never leaves a half-built world behind.

DIR/
  clip/dfkd-toy-clip.json, clip/open_clip_model.safetensors   open_clip config + weights
  vqgan/config.yaml, vqgan/last.ckpt                          taming config + Lightning-style ckpt
  eval/<domain>/<class>/*.png                                 held-out images (DomainBed layout)
  style_words.txt                                             Mix-Prompt dictionary in the world's vocabulary
  toyworld.json                                               settings, hash, timings, teacher zero-shot per domain
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from dfkd_assets.toyworld.config import ToyworldConfig
from dfkd_assets.toyworld import world

CLIP_NAME = "dfkd-toy-clip"
TEMPLATES = ["a {}", "a photo of a {}", "a sketch of a {}", "a cartoon of a {}", "a painting of a {}"]
MANIFEST = "toyworld.json"


def is_built(out: Path, cfg: ToyworldConfig) -> bool:
    try:
        return json.loads((Path(out) / MANIFEST).read_text())["settings_hash"] == cfg.settings_hash()
    except (OSError, ValueError, KeyError):
        return False


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


def build(cfg: ToyworldConfig, out: Path, log: Callable[[str], None] = print, force: bool = False) -> dict:
    import open_clip
    import torch

    from dfkd_assets.core.evaluation import evaluate, scan_domainbed
    from dfkd_assets.core.teacher import load_teacher, teacher_logits, zero_shot_head
    from dfkd_assets.core.vqgan import build_vqgan, load_vqgan
    from dfkd_assets.toyworld.train import save_clip, save_vqgan, train_clip, train_vqgan

    out = Path(out)
    if not force and is_built(out, cfg):
        log(f"toyworld in {out} is up to date (settings {cfg.settings_hash()})")
        return json.loads((out / MANIFEST).read_text())
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
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
        "text_cfg": {"context_length": c.context_length, "vocab_size": 49408, "width": c.text_width, "heads": max(1, c.text_width // 32), "layers": c.text_layers},
    }
    cfg_path = tmp / "clip" / f"{CLIP_NAME}.json"
    cfg_path.parent.mkdir()
    cfg_path.write_text(json.dumps(model_cfg))
    open_clip.add_model_config(cfg_path)
    clip = open_clip.create_model(CLIP_NAME, pretrained=None)
    t = time.perf_counter()
    losses = train_clip(clip, open_clip.get_tokenizer(CLIP_NAME), images, cls, dom, cols, c.steps, c.batch_size, c.lr, cfg.seed, log)
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
    vq_stats = train_vqgan(vq, images, v.steps, v.batch_size, v.lr, cfg.seed, log)
    timings["vqgan_train_s"] = time.perf_counter() - t
    vq_cfg, vq_ckpt = save_vqgan(vq, params, tmp / "vqgan", v.steps)

    log("toyworld: writing the held-out evaluation set")
    n_eval = write_eval(tmp / "eval", cfg)
    (tmp / "style_words.txt").write_text(
        "# Mix-Prompt dictionary in the toyworld's vocabulary (words its tiny CLIP was trained on)\n"
        + "\n".join(w for ws in world.DOMAIN_WORDS.values() for w in ws) + "\n"
    )

    # check through the pipeline's real loaders, and measure the teacher
    cpu = torch.device("cpu")
    teacher = load_teacher(CLIP_NAME, str(clip_weights), cfg_path, 0, cpu)
    load_vqgan(vq_cfg, vq_ckpt, 0, cpu)
    head = zero_shot_head(teacher, world.CLASSES, TEMPLATES)
    sets = scan_domainbed(tmp / "eval", world.CLASSES, name="toyworld")
    res = evaluate({"teacher": lambda x: teacher_logits(teacher, head, x)}, sets, len(world.CLASSES), cfg.image_size, 256, cpu)["teacher"]
    timings["total_s"] = time.perf_counter() - t0
    manifest = {
        "settings": cfg.model_dump(mode="json"), "settings_hash": cfg.settings_hash(), "classes": world.CLASSES, "domains": world.DOMAINS,
        "teacher_zero_shot": res.top1, "teacher_zero_shot_mean": res.mean_top1, "templates": TEMPLATES,
        "clip_final_loss": float(np.mean(losses[-50:])), **{f"vqgan_{k}": val for k, val in vq_stats.items()},
        "eval_images": n_eval, "timings": timings,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log(f"toyworld built in {timings['total_s']:.0f} s: teacher zero-shot " + ", ".join(f"{d} {a:.2f}" for d, a in res.top1.items()))
    return manifest
