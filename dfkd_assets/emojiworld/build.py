"""`dfkd emojiworld build --out DIR`: world 2 from real emoji artwork (issue 35).

Checks the npm tarballs (sources.py: sha256 pinned, fetched with `npm pack` when absent), builds the
catalogue and the member split (render.py), restores the pinned tiny CLIP and VQGAN of these
settings (or trains them with `--train`, or when the settings have no pin), renders the held-out
evaluation set, and checks that everything loads through the pipeline's real loaders and that the
teacher scores what the pin recorded.

Cached on the settings hash (DIR/emojiworld.json); written into DIR.building and swapped in at the
end; a DIR that exists without the marker file a build writes (.dfkd-emojiworld) is never deleted.

DIR/
  clip/dfkd-emoji-clip.json, clip/open_clip_model.safetensors   open_clip config + weights
  vqgan/config.yaml, vqgan/last.ckpt                            taming config + Lightning-style ckpt
  eval/<domain>/<class>/*.png        held-out members only (DomainBed layout): the evaluation set
  eval_seen/<domain>/<class>/*.png   the teacher's own members, other renders (reported, not a benchmark)
  train_sprites.npz                  the teacher's members' sprites: the `real` reference renders from them
  members.json                       the split: class -> train / heldout members (id, name)
  style_words.txt                    Mix-Prompt dictionary in the world's vocabulary
  emojiworld.json                    settings, hash, packages + licences, counts, timings, teacher zero-shot
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from dfkd_assets import pinned_world
from dfkd_assets.core.io import sha256_file
from dfkd_assets.core.names import class_key
from dfkd_assets.emojiworld import render, sources
from dfkd_assets.emojiworld.config import EmojiworldConfig
from dfkd_assets.ownership import check_owned, claim, remove_owned

CLIP_NAME = "dfkd-emoji-clip"
MANIFEST = "emojiworld.json"
OWNER = "emojiworld"  # the ownership marker's kind (dfkd_assets/ownership.py)
PINNED = Path(__file__).parent / "pinned"
PINNED_FILES = ("clip/" + CLIP_NAME + ".json", "clip/open_clip_model.safetensors", "vqgan/config.yaml", "vqgan/last.ckpt")


class PinnedWorldError(RuntimeError):
    """Pinned weights that are incomplete or do not reproduce the teacher the pin recorded."""


def pinned_dir(cfg: EmojiworldConfig, root: Path = PINNED) -> Path:
    return Path(root) / cfg.settings_hash()


def is_built(out: Path, cfg: EmojiworldConfig, train: bool = False, pinned_root: Path = PINNED) -> bool:
    """pinned_world.is_built for these settings."""
    return pinned_world.is_built(out, MANIFEST, cfg.settings_hash(), pinned_dir(cfg, pinned_root), train)


def prepare(cfg: EmojiworldConfig, npm_dir: Path, log=print):
    """(checked tarballs, split class -> {train, heldout}, sprites of every member)."""
    tarballs = sources.fetch(npm_dir, log=log)
    emoji_json = sources.read_json(tarballs["google"], "emoji.json")
    openmoji_json = sources.read_json(tarballs["openmoji"], "data/openmoji.json")
    parts = render.split(render.catalogue(emoji_json, openmoji_json, cfg.classes, cfg.max_members), cfg.heldout_fraction, cfg.seed)
    members = [m for p in parts.values() for k in ("train", "heldout") for m in p[k]]
    return tarballs, parts, render.load_sprites(tarballs, members)


def train_members(parts) -> list:
    return [m for p in parts.values() for m in p["train"]]


def build(cfg: EmojiworldConfig, out: Path, log: Callable[[str], None] = print, force: bool = False, train: bool = False,
          pinned_root: Path = PINNED, npm_dir: Path = sources.DEFAULT_CACHE, parallel: bool = False) -> dict:
    out = Path(out)
    if not force and is_built(out, cfg, train, pinned_root):
        log(f"emojiworld in {out} is up to date (settings {cfg.settings_hash()})")
        return json.loads((out / MANIFEST).read_text())
    check_owned(out, OWNER)  # before any work: a folder of someone else's is never replaced
    t0 = time.perf_counter()
    data = prepare(cfg, npm_dir, log)  # packages checked before anything is written
    tmp = out.with_name(out.name + ".building")
    remove_owned(tmp, OWNER)
    claim(tmp, OWNER)
    pin = pinned_dir(cfg, pinned_root)
    try:
        if pin.is_dir() and not train:
            return _restore_pinned(cfg, pin, tmp, out, data, t0, log)
        return _train(cfg, tmp, out, data, t0, log, parallel, npm_dir)
    finally:
        if tmp.exists():  # swapped in (gone) on success; a failure leaves `out` as it was
            remove_owned(tmp, OWNER)


def _restore_pinned(cfg, pin: Path, tmp: Path, out: Path, data, t0, log) -> dict:
    missing = [f for f in (*PINNED_FILES, MANIFEST) if not (pin / f).is_file()]
    if missing:
        raise PinnedWorldError(f"pinned emojiworld {pin} lacks {', '.join(missing)}: restore it from git, or build with --train")
    pinned = json.loads((pin / MANIFEST).read_text())
    log(f"emojiworld: restoring the pinned tiny CLIP and VQGAN of settings {cfg.settings_hash()} (trained on {pinned.get('machine', '?')})")
    for f in PINNED_FILES:
        if sha256_file(pin / f) != pinned.get("files", {}).get(f):
            raise PinnedWorldError(f"pinned file {pin / f} does not match the sha256 its {MANIFEST} records: restore it from git, "
                                   "or build with --train")
        (tmp / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(pin / f, tmp / f)
    extra = {"source": f"pinned {pin.name}", "machine": pinned.get("machine"), "clip_final_loss": pinned.get("clip_final_loss"),
             "training": pinned.get("timings")}
    return _finish(cfg, tmp, out, data, extra, t0, log, expect=pinned["teacher_zero_shot"], expect_eval=pinned.get("eval_sha256"))


def _clip_model_cfg(cfg: EmojiworldConfig) -> dict:
    c = cfg.clip
    if c.vision_tower == "resnet":
        vision = {"image_size": cfg.image_size, "layers": [c.vision_layers] * 4, "width": c.vision_width}
    else:
        vision = {"image_size": cfg.image_size, "layers": c.vision_layers, "width": c.vision_width, "head_width": 32, "patch_size": c.patch_size}
    return {"embed_dim": c.embed_dim, "vision_cfg": vision,
            "text_cfg": {"context_length": c.context_length, "vocab_size": 49408, "width": c.text_width, "heads": max(1, c.text_width // 32),
                         "layers": c.text_layers}}


def _vqgan_params(cfg: EmojiworldConfig) -> dict:
    v = cfg.vqgan
    return {"embed_dim": v.embed_dim, "n_embed": v.n_embed,
            "ddconfig": {"double_z": False, "z_channels": v.embed_dim, "resolution": cfg.image_size, "in_channels": 3, "out_ch": 3,
                         "ch": v.ch, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}


def training_images(cfg: EmojiworldConfig, data):
    """The captioned renders of the teacher's members the tiny CLIP and VQGAN learn from."""
    _, parts, sprites = data
    members = train_members(parts)
    images, mem, dom = render.sample(members, sprites, cfg.train_images, np.random.default_rng([cfg.seed, 1]), cfg.image_size)
    return members, images, mem, dom


def train_clip_into(cfg: EmojiworldConfig, data, dest: Path, log) -> dict:
    """The tiny CLIP trained on the teacher's members, saved as an open_clip config + weights in dest/clip."""
    import open_clip
    import torch

    from dfkd_assets.toyworld.train import save_clip, train_clip

    torch.manual_seed(cfg.seed)
    members, images, mem, dom = training_images(cfg, data)
    model_cfg = _clip_model_cfg(cfg)
    cfg_path = dest / "clip" / f"{CLIP_NAME}.json"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(json.dumps(model_cfg))
    open_clip.add_model_config(cfg_path)
    clip = open_clip.create_model(CLIP_NAME, pretrained=None)
    c = cfg.clip
    t = time.perf_counter()
    cls_idx = np.array([list(cfg.classes).index(members[i].cls) for i in mem])

    def caption(i, gen):
        return render.caption(members[mem[i]], render.DOMAINS[dom[i]], gen)

    losses = train_clip(clip, open_clip.get_tokenizer(CLIP_NAME), images, cls_idx, dom, [""] * len(images), c, cfg.seed, log,
                        caption=caption)
    save_clip(clip, model_cfg, CLIP_NAME, dest / "clip")
    return {"clip_final_loss": float(np.mean(losses[-50:])), "clip_train_s": time.perf_counter() - t}


def train_vqgan_into(cfg: EmojiworldConfig, data, dest: Path, log=print, npm_dir: Path | None = None, threads: int | None = None) -> dict:
    """The tiny VQGAN trained on the same renders, saved as taming config + ckpt in dest/vqgan
    (`data` None: prepared here, as in the child process of a parallel build)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if data is None:
        data = prepare(cfg, npm_dir or sources.DEFAULT_CACHE, log)

    from dfkd_assets.core.vqgan import build_vqgan
    from dfkd_assets.toyworld.train import save_vqgan, train_vqgan

    torch.manual_seed(cfg.seed)
    _, images, _, _ = training_images(cfg, data)
    params = _vqgan_params(cfg)
    vq = build_vqgan(params)
    t = time.perf_counter()
    stats = train_vqgan(vq, images, cfg.vqgan, cfg.seed, log)
    save_vqgan(vq, params, dest / "vqgan", cfg.vqgan.steps)
    return {**{f"vqgan_{k}": v for k, v in stats.items()}, "vqgan_train_s": time.perf_counter() - t}


def _train(cfg, tmp: Path, out: Path, data, t0, log, parallel: bool = False, npm_dir: Path = sources.DEFAULT_CACHE) -> dict:
    """Both models trained here; `parallel`: the VQGAN in a child process at one thread while the CLIP trains
    (two cores: about the CLIP's time for both)."""
    from dfkd_assets.toyworld.build import _machine

    log(f"emojiworld: training the tiny CLIP and VQGAN on {cfg.train_images} renders of the teacher's members")
    if parallel:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
            fut = pool.submit(train_vqgan_into, cfg, None, tmp, print, npm_dir, 1)
            a = train_clip_into(cfg, data, tmp, log)
            b = fut.result()
    else:
        a = train_clip_into(cfg, data, tmp, log)
        b = train_vqgan_into(cfg, data, tmp, log)
    timings = {"clip_train_s": a.pop("clip_train_s"), "vqgan_train_s": b.pop("vqgan_train_s")}
    extra = {**a, **b, "machine": _machine(), "source": "trained", "timings": timings}
    return _finish(cfg, tmp, out, data, extra, t0, log)


def write_split_set(root: Path, cfg: EmojiworldConfig, parts, sprites, which: str, per_class: int, stream: int) -> int:
    """root/<domain>/<class key>/*.png of the `which` members ("heldout" or "train"), cycling through them."""
    from PIL import Image

    n = 0
    for d_i, d in enumerate(render.DOMAINS):
        for c_i, (c, p) in enumerate(parts.items()):
            rng = np.random.default_rng([cfg.seed, stream, d_i, c_i])  # a stream no training image uses
            folder = Path(root) / d / class_key(c)
            folder.mkdir(parents=True, exist_ok=True)
            ms = p[which]
            for i in range(per_class):
                Image.fromarray(render.render(sprites[(ms[i % len(ms)].id, d)], rng, cfg.image_size)).save(folder / f"{i:04d}.png")
                n += 1
    return n


def tree_digest(root: Path) -> str:
    """sha256 over the relative paths and decoded pixels of every PNG under root (PNG encoders may differ, pixels must not)."""
    from PIL import Image

    h = hashlib.sha256()
    for p in sorted(Path(root).rglob("*.png")):
        h.update(str(p.relative_to(root)).encode())
        h.update(np.asarray(Image.open(p)).tobytes())
    return h.hexdigest()


def teacher_scores(tmp: Path, classes: list[str], size: int) -> dict:
    """The teacher in `tmp` loaded through the pipeline's loaders, zero-shot top-1 per domain on eval/ and eval_seen/."""
    import torch

    from dfkd_assets.core.evaluation import evaluate, scan_domainbed
    from dfkd_assets.core.teacher import load_teacher, teacher_logits, zero_shot_head
    from dfkd_assets.core.vqgan import load_vqgan

    cpu = torch.device("cpu")
    teacher = load_teacher(CLIP_NAME, str(tmp / "clip" / "open_clip_model.safetensors"), tmp / "clip" / f"{CLIP_NAME}.json", 0, cpu)
    load_vqgan(tmp / "vqgan" / "config.yaml", tmp / "vqgan" / "last.ckpt", 0, cpu)
    head = zero_shot_head(teacher, classes, render.TEMPLATES)
    out = {}
    for folder in ("eval", "eval_seen"):
        if not (tmp / folder).is_dir():
            continue
        sets = scan_domainbed(tmp / folder, classes, name=f"emoji {folder}")
        res = evaluate({"teacher": lambda x: teacher_logits(teacher, head, x)}, sets, len(classes), size, 256, cpu)["teacher"]
        out[folder] = (res.top1, res.mean_top1)
    return out


def _finish(cfg, tmp: Path, out: Path, data, extra: dict, t0: float, log, expect: dict | None = None, expect_eval: str | None = None) -> dict:
    tarballs, parts, sprites = data
    classes = list(cfg.classes)
    log("emojiworld: writing the held-out evaluation set")
    n_eval = write_split_set(tmp / "eval", cfg, parts, sprites, "heldout", cfg.eval_per_class, 7_777)
    n_seen = write_split_set(tmp / "eval_seen", cfg, parts, sprites, "train", cfg.seen_eval_per_class, 8_888) if cfg.seen_eval_per_class else 0
    eval_digest = tree_digest(tmp / "eval")
    if expect_eval is not None and eval_digest != expect_eval:
        raise PinnedWorldError(f"the evaluation set rendered here (pixel digest {eval_digest[:16]}) differs from the pin's "
                               f"({expect_eval[:16]}): the packages or the renderer changed")
    tm = train_members(parts)
    np.savez_compressed(tmp / "train_sprites.npz", **{f"{m.id}|{d}": sprites[(m.id, d)] for m in tm for d in render.DOMAINS})
    (tmp / "members.json").write_text(json.dumps(
        {c: {k: [{"id": m.id, "name": m.name} for m in p[k]] for k in ("train", "heldout")} for c, p in parts.items()}, indent=1) + "\n")
    (tmp / "style_words.txt").write_text(
        "# Mix-Prompt dictionary in the emoji world's vocabulary (style words its tiny CLIP was trained on)\n"
        + "\n".join(["emoji", *(w for ws in render.DOMAIN_WORDS.values() for w in ws)]) + "\n")
    scores = teacher_scores(tmp, classes, cfg.image_size)
    top1, mean = scores["eval"]
    tol = 2.5 / (cfg.eval_per_class * len(classes))
    if expect is not None and any(abs(top1.get(d, -1.0) - a) > tol for d, a in expect.items()):
        raise PinnedWorldError(f"the pinned teacher scores {top1} here, the pin recorded {expect}: its weights or the evaluation "
                               "set changed; restore the pinned files from git, or build with --train")
    seconds = time.perf_counter() - t0
    manifest = {
        **extra, "settings": cfg.model_dump(mode="json"), "settings_hash": cfg.settings_hash(), "classes": classes,
        "domains": render.DOMAINS, "templates": render.TEMPLATES,
        "members": {c: {"train": len(p["train"]), "heldout": len(p["heldout"])} for c, p in parts.items()},
        "teacher_zero_shot": top1, "teacher_zero_shot_mean": mean,
        "teacher_zero_shot_seen_members": scores.get("eval_seen", (None, None))[0],
        "teacher_zero_shot_seen_members_mean": scores.get("eval_seen", (None, None))[1],
        "eval_images": n_eval, "eval_seen_images": n_seen, "eval_sha256": eval_digest,
        "packages": {k: {"name": p.name, "version": p.version, "tarball_sha256": p.sha256, "licence": p.licence}
                     for k, p in sources.PACKAGES.items()},
        "timings": {**extra.get("timings", {}), "total_s": seconds},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        remove_owned(out, OWNER)
    tmp.rename(out)
    log(f"emojiworld {'restored' if expect is not None else 'built'} in {seconds:.0f} s: teacher zero-shot on held-out members "
        + ", ".join(f"{d} {a:.2f}" for d, a in top1.items()) + f" (mean {mean:.3f}); on its own members "
        + ", ".join(f"{d} {a:.2f}" for d, a in (scores.get("eval_seen", ({}, 0))[0] or {}).items()))
    return manifest


def pin(out: Path, root: Path = PINNED) -> Path:
    """`dfkd emojiworld pin DIR`: the trained weights and record of the world in DIR copied to root/<settings hash>/."""
    keep = ("settings", "settings_hash", "teacher_zero_shot", "teacher_zero_shot_mean", "teacher_zero_shot_seen_members",
            "teacher_zero_shot_seen_members_mean", "eval_sha256", "members", "clip_final_loss", "machine", "timings", "packages")
    return pinned_world.pin_world(out, root, PINNED_FILES, MANIFEST, keep, OWNER)
