"""The toyworld: a CI-sized build, its teacher, and a student that really learns (with controls)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT, pipeline_models
from dfkd_assets.config import DfkdConfig
from dfkd_assets.toyworld import world
from dfkd_assets.toyworld.build import CLIP_NAME, TEMPLATES, build, is_built
from dfkd_assets.toyworld.config import ToyworldConfig

CHANCE = 1 / len(world.CLASSES)


@pytest.fixture(scope="session")
def toyworld(tmp_path_factory):
    cfg = ToyworldConfig.model_validate(yaml.safe_load((ROOT / "configs" / "toyworld-ci.yaml").read_text()))
    out = tmp_path_factory.mktemp("toyworld") / "world"
    manifest = build(cfg, out, log=lambda s: None)
    return cfg, out, manifest


def test_render_is_deterministic_and_domains_differ():
    a = world.render("star", "sketch", "red", np.random.default_rng(3))
    b = world.render("star", "sketch", "red", np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    stats = {}
    for d in world.DOMAINS:
        ims, _, _, _ = world.sample(60, np.random.default_rng(0), domains=[d])
        gray = ims.mean(-1)
        edges = np.abs(np.diff(gray, axis=1)).mean()
        stats[d] = (gray.mean(), ims.std(-1).mean(), edges)
    assert stats["sketch"][0] > stats["photo"][0] + 40  # paper is bright
    assert stats["sketch"][1] < stats["cartoon"][1] / 2  # and nearly grey
    assert stats["painting"][2] > stats["photo"][2]  # colour noise everywhere
    assert len({world.caption("star", "sketch", "red", np.random.default_rng(i)) for i in range(40)}) > 10


def test_build_is_cached_and_loads_through_the_real_loaders(toyworld, cpu):
    from dfkd_assets.core.teacher import load_teacher
    from dfkd_assets.core.vqgan import load_vqgan

    cfg, out, manifest = toyworld
    assert is_built(out, cfg)
    assert not is_built(out, cfg.model_copy(update={"seed": 1}))
    again = build(cfg, out, log=lambda s: None)  # no rebuild: same manifest, same timings
    assert again == manifest
    t = load_teacher(CLIP_NAME, str(out / "clip" / "open_clip_model.safetensors"), out / "clip" / f"{CLIP_NAME}.json", 0, cpu)
    assert t.teacher_id.startswith(CLIP_NAME + ":") and "random" not in t.teacher_id
    vq = load_vqgan(out / "vqgan" / "config.yaml", out / "vqgan" / "last.ckpt", 0, cpu)
    x = torch.from_numpy(world.sample(8, np.random.default_rng(5))[0]).permute(0, 3, 1, 2).float() / 127.5 - 1
    rec, _ = vq(x)
    assert (rec - x).abs().mean() < 0.2, "the trained VQGAN reconstructs world images"
    assert sum(len(list((out / "eval" / d).rglob("*.png"))) for d in world.DOMAINS) == manifest["eval_images"]


def test_teacher_is_well_above_chance_in_every_domain(toyworld):
    _, _, manifest = toyworld
    for d, acc in manifest["teacher_zero_shot"].items():
        assert acc > CHANCE + 0.15, f"teacher zero-shot on {d}: {acc:.2f}"


def _pipeline_cfg(out: Path, synthesis: dict | None = None, **distill) -> DfkdConfig:
    return DfkdConfig.model_validate({
        "classes": world.CLASSES, "device": "cpu",
        "teacher": {"model_name": CLIP_NAME, "model_config_file": str(out / "clip" / f"{CLIP_NAME}.json"),
                    "pretrained": str(out / "clip" / "open_clip_model.safetensors"), "templates": TEMPLATES},
        "generator": {"config_file": str(out / "vqgan" / "config.yaml"), "checkpoint": str(out / "vqgan" / "last.ckpt")},
        "prompts": {"method": "contrastive", "num_styles": 4, "steps": 40, "style_words_file": str(out / "style_words.txt")},
        "synthesis": {"images_per_class": 16, "iterations": 30, "cutn": 8, "image_size": 32, "batch_size": 48, **(synthesis or {})},
        "student": {"arch": "resnet18", "input_size": 32},
        "distill": {"epochs": 15, "batch_size": 32, "lr": 0.05, **distill},
        "evaluation": {"datasets": [{"name": "toyworld", "root": str(out / "eval")}], "batch_size": 256},
    })


def test_student_learns_the_teacher_on_held_out_synthetic_images_and_the_control_does_not(toyworld, tmp_path):
    """KD works end to end: a student distilled on VQGAN-CLIP images of the trained world predicts the
    prompt class of *new* synthetic images (other seeds) far above chance, while the same run with
    teacher logits shuffled across each batch (negative control) stays at chance, and the same KD
    on as many decoded random latents (the no-guidance baseline: synthesis.iterations 0) learns less.

    Out-of-domain transfer to the real held-out set at this CI budget is near chance (see
    docs/RESULTS.md); it is measured by `dfkd compare`, not asserted here.
    """
    from dfkd_assets.fingerprints import class_fingerprint
    from dfkd_assets.stages.synthesis import class_plan, synthesize_class
    from dfkd_assets.stages.training import distill_student, training_set

    _, out, _ = toyworld
    cfg = _pipeline_cfg(out)
    cpu = torch.device("cpu")
    teacher, head, bank, vqgan = pipeline_models(cfg, cpu)

    def synthetic(seed: int, n: int, iterations: int = 30):
        v = _pipeline_cfg(out, synthesis={"seed": seed, "images_per_class": n, "iterations": iterations})
        shards = [synthesize_class(v, class_plan(v, bank, c), bank, vqgan, teacher, head, cpu, tmp_path / f"s{seed}i{iterations}" / c,
                                   class_fingerprint(v, teacher.teacher_id, c)) for c in v.classes]
        images, labels = training_set([s.images for s in shards])
        return images, labels, np.array([v.classes.index(r["teacher_top1"]) for s in shards for r in s.records])

    train_x, train_y, _ = synthetic(0, 16)
    test_x, test_y, test_teacher = synthetic(1, 8)
    assert (test_teacher == test_y.numpy()).mean() > 0.6, "synthesis makes images the teacher recognises"
    noopt_x, noopt_y, _ = synthetic(0, 16, iterations=0)
    acc = {}
    for run, (x, y, control) in {"none": (train_x, train_y, "none"), "shuffle_teacher": (train_x, train_y, "shuffle_teacher"),
                                 "noopt": (noopt_x, noopt_y, "none")}.items():
        student, _ = distill_student(_pipeline_cfg(out, control=control), teacher, head, x, y, cpu, tmp_path / run, run)
        with torch.no_grad():
            pred = student(test_x.permute(0, 3, 1, 2).float() / 255).argmax(-1)
        acc[run] = (pred == test_y).float().mean().item()
    assert acc["none"] > CHANCE + 0.3, acc
    assert acc["none"] > acc["noopt"] + 0.15, acc  # CLIP guidance, not the generator's prior, carries the classes
    assert acc["shuffle_teacher"] < CHANCE + 0.13, acc


def test_a_pinned_world_restores_the_same_teacher_and_refuses_changed_weights(toyworld, tmp_path):
    """`dfkd toyworld pin` ships a trained world's weights; a build of the same settings then restores
    them instead of training (the same teacher on every machine) and refuses a pinned file whose bytes
    changed, naming it, leaving the world already there untouched."""
    import shutil

    from dfkd_assets.core.io import sha256_file
    from dfkd_assets.toyworld.build import PINNED_FILES, PinnedWorldError, pin, pinned_dir

    cfg, out, manifest = toyworld
    root = tmp_path / "pinned"
    dest = pin(out, root)
    assert dest == pinned_dir(cfg, root)
    assert not is_built(out, cfg, pinned_root=root)  # a trained world gives way to the pin ...
    assert is_built(out, cfg, train=True, pinned_root=root)  # ... unless training is asked for
    restored = build(cfg, tmp_path / "world", log=lambda s: None, pinned_root=root)
    assert is_built(tmp_path / "world", cfg, pinned_root=root) and not is_built(tmp_path / "world", cfg, train=True, pinned_root=root)
    assert restored["source"] == f"pinned {cfg.settings_hash()}" and restored["teacher_zero_shot"] == manifest["teacher_zero_shot"]
    assert "clip_train_s" not in restored["timings"]  # nothing was trained
    for f in PINNED_FILES:
        assert sha256_file(tmp_path / "world" / f) == sha256_file(out / f)
    assert restored["eval_images"] == manifest["eval_images"]

    # a changed weight file is refused by name; the restored world stays as it was
    weights = dest / "clip" / "open_clip_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(PinnedWorldError, match="open_clip_model.safetensors"):
        build(cfg, tmp_path / "world", log=lambda s: None, pinned_root=root, force=True)
    assert sha256_file(tmp_path / "world" / "clip" / "open_clip_model.safetensors") == sha256_file(out / "clip" / "open_clip_model.safetensors")

    # weights whose recorded sha256 matches but whose teacher does not score what the pin says: refused too
    shutil.rmtree(dest)
    pin(out, root)
    record = json.loads((dest / "toyworld.json").read_text())
    record["teacher_zero_shot"] = {d: max(0.0, a - 0.2) for d, a in record["teacher_zero_shot"].items()}
    (dest / "toyworld.json").write_text(json.dumps(record))
    with pytest.raises(PinnedWorldError, match="pinned teacher scores"):
        build(cfg, tmp_path / "world2", log=lambda s: None, pinned_root=root)
    assert not (tmp_path / "world2").exists()


def test_build_never_replaces_a_folder_it_did_not_write(tmp_path):
    """`dfkd toyworld build --out DIR` on a folder holding someone's files refuses before any work,
    naming it, and leaves the files; a stale `DIR.building` of someone else's is refused alike. An
    empty folder, or one a build wrote (its marker), is used."""
    from dfkd_assets.ownership import MARKER, NotOwned, check_owned, claim
    from dfkd_assets.toyworld.build import build
    from dfkd_assets.toyworld.config import ToyworldConfig

    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("years of work")
    with pytest.raises(NotOwned, match="thesis holds files dfkd did not write"):
        build(ToyworldConfig(), mine, log=lambda _: None)
    assert (mine / "chapter1.tex").read_text() == "years of work" and not (tmp_path / "thesis.building").exists()

    out = tmp_path / "world"
    (tmp_path / "world.building").mkdir()
    (tmp_path / "world.building" / "notes.txt").write_text("not a build")
    with pytest.raises(NotOwned, match="world.building"):
        build(ToyworldConfig(), out, log=lambda _: None)
    assert (tmp_path / "world.building" / "notes.txt").exists()

    claim(tmp_path / "ours", "toyworld")
    (tmp_path / "ours" / "eval").mkdir()
    check_owned(tmp_path / "ours", "toyworld")  # marked: may be replaced
    assert (tmp_path / "ours" / MARKER).is_file()
    with pytest.raises(NotOwned):
        check_owned(tmp_path / "ours", "emojiworld")  # another kind's folder is not this build's
    (tmp_path / "link").symlink_to(mine)
    with pytest.raises(NotOwned, match="a file or a link"):
        check_owned(tmp_path / "link", "toyworld")


def test_world_optimiser_settings_keep_the_pins_and_change_the_hash_when_set():
    """The worlds' optimiser hyperparameters are settings (no literal in train.py); added after the pins,
    at their defaults they leave the settings hash (so the pins' directory names) unchanged, and any other
    value names another world."""
    from dfkd_assets.emojiworld.build import pinned_dir as emoji_pinned_dir
    from dfkd_assets.emojiworld.config import EmojiworldConfig
    from dfkd_assets.toyworld.build import pinned_dir

    for cfg, pin in ((ToyworldConfig(), pinned_dir), (EmojiworldConfig(), emoji_pinned_dir)):
        assert pin(cfg).is_dir(), f"{type(cfg).__name__}'s default settings still name their pin"
        kind = type(cfg)
        for change in ({"clip": {"weight_decay": 0.05}}, {"clip": {"betas": [0.9, 0.999]}}, {"vqgan": {"betas": [0.9, 0.99]}}):
            changed = kind.model_validate(change)
            assert changed.settings_hash() != cfg.settings_hash(), change
        same = kind.model_validate({"clip": {"weight_decay": 0.1, "betas": [0.9, 0.98]}, "vqgan": {"betas": [0.5, 0.9]}})
        assert same.settings_hash() == cfg.settings_hash()
    src = (ROOT / "dfkd_assets" / "toyworld" / "train.py").read_text()
    assert "betas=(" not in src and '"weight_decay": 0.1' not in src
