"""Bad inputs and security: every bad setting, weight file, evaluation image or shard is
refused with an error naming the setting or file, before anything is written; secrets never reach
logs, Dagster metadata or MLflow; services bind to loopback.

Cases already covered elsewhere are listed in docs/RELIABILITY.md and not repeated here. Real
tiny open_clip / taming models, a real Dagster instance, real MLflow stores, real files.
"""

import io
import json
import os
import re
import resource
import struct
import subprocess
import zlib
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import ROOT, TINY_CLIP, TINY_VQGAN, create_postgres_db, drop_postgres_db
from core_settings import VANILLA, distill_settings, style_settings
from dfkd_assets.config import ConfigError, load_config
from dfkd_assets.core.evaluation import MAX_IMAGE_PIXELS, EvalDataError, evaluate, load_image, scan_domainbed
from dfkd_assets.core.names import class_key

CI = yaml.safe_load((ROOT / "configs" / "ci.yaml").read_text())


def _settings(tmp_path: Path, changes: dict) -> Path:
    """configs/ci.yaml with `changes` ({"a.b": value}, None deletes) written to a file."""
    d = json.loads(json.dumps(CI))
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = d
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump(d, allow_unicode=True))
    return path


def _refused(tmp_path, changes: dict, match: str) -> str:
    path = _settings(tmp_path, changes)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path) in msg  # names the file ...
    assert re.search(match, msg), msg  # ... and the dotted key
    return msg


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"synthesis.images_per_class": True}, r"synthesis\.images_per_class: .*boolean true"),
        ({"synthesis.images_per_class": "8"}, r"synthesis\.images_per_class: .*string '8'"),
        ({"distill.lr": False}, r"distill\.lr: .*boolean false"),
        ({"distill.lr": "fast"}, r"distill\.lr: .*string 'fast'"),
        ({"distill.epochs": 2.5}, r"distill\.epochs: .*fractional"),
        ({"classes": "dog"}, r"classes: Input should be a valid list"),
        ({"classes": [1, 2]}, r"classes\.0: Input should be a valid string"),
        ({"synthesis": [8]}, r"synthesis: Input should be a valid dictionary"),
        ({"evaluation.datasets": {"name": "x", "root": "y"}}, r"evaluation\.datasets: Input should be a valid list"),
        ({"teacher.templates": 3}, r"teacher\.templates"),
        ({"operations.max_retries": None}, None),  # a deleted key falls back to its default: accepted
    ],
)
def test_wrong_types_are_refused_naming_the_key(tmp_path, changes, match):
    if match is None:
        assert load_config(_settings(tmp_path, changes)).operations.max_retries == 2
        return
    _refused(tmp_path, changes, match)


COUNTS_POSITIVE = [
    "synthesis.images_per_class", "synthesis.cutn", "synthesis.batch_size", "synthesis.image_size",
    "prompts.num_styles", "prompts.steps", "prompts.mix_words", "student.input_size", "distill.epochs", "distill.batch_size",
    "evaluation.batch_size", "evaluation.max_images_per_class", "fewshot.steps", "fewshot.batch_size", "steps_per_gpu",
    "operations.max_runtime_s",
]
COUNTS_NON_NEGATIVE = ["synthesis.iterations", "operations.max_retries"]  # 0 is meaningful for these


@pytest.mark.parametrize("key, value", [(k, v) for k in COUNTS_POSITIVE for v in (0, -1)] + [(k, -1) for k in COUNTS_NON_NEGATIVE])
def test_zero_and_negative_counts_are_refused_naming_the_key(tmp_path, key, value):
    _refused(tmp_path, {key: value}, rf"{key.replace('.', chr(92) + '.')}: Input should be greater than")


@pytest.mark.parametrize("key, value, match", [("fewshot.shots", [0, 5], "shots must be positive"), ("fewshot.shots", [], "at least 1"),
                                               ("fewshot.seeds", [], "at least 1")])
def test_bad_count_lists_are_refused(tmp_path, key, value, match):
    _refused(tmp_path, {key: value}, rf"{key.replace('.', chr(92) + '.')}: .*{match}")


@pytest.mark.parametrize("classes", [[], None])
def test_empty_or_missing_class_list_is_refused(tmp_path, classes):
    _refused(tmp_path, {"classes": classes}, r"classes: (List should have at least 2 items|Field required)")


@pytest.mark.parametrize("a, b", [("Dog", "  dog  "), ("hot  dog", "Hot Dog"), ("dog", "DOG\t"), ("Ice-Cream", "ice cream"),
                                  ("Ω", "ω"), ("ДОМ", "дом"), ("ＡＢＣ", "abc"), ("狗", " 狗 ")])
def test_duplicate_classes_case_and_whitespace_insensitive_name_both(tmp_path, a, b):
    msg = _refused(tmp_path, {"classes": [a, "house", b]}, r"classes: .*duplicates")
    assert repr(a) in msg and repr(b) in msg


@pytest.mark.parametrize("name, code", [("ca\x00t", "U+0000"), ("ca\x1bt", "U+001B"), ("ca\x7ft", "U+007F"), ("ab\u202ecd", "U+202E"),
                                        ("do\u200bg", "U+200B")])
def test_control_and_format_characters_in_class_names_are_refused(tmp_path, name, code):
    _refused(tmp_path, {"classes": ["house", name]}, rf"classes: .*{re.escape(code)}")


@pytest.mark.parametrize("key, value", [("teacher.templates", ["a {x} photo of {}"]), ("prompts.vanilla_template", "a {0} {}"),
                                        ("prompts.style_template", "a {style} {kind} of {}"), ("prompts.positive_template", "{} {")])
def test_templates_with_stray_fields_are_refused_at_load(tmp_path, key, value):
    _refused(tmp_path, {key: value}, rf"{re.escape(key)}: .*cannot be filled with a class name")


def test_placeholder_token_in_a_class_name_is_refused_for_style_prompts(teacher):
    from dfkd_assets.core.prompts import PromptError, build_bank

    with pytest.raises(PromptError, match=r"exactly one '\*' token.*star \*.*class names must not contain it"):
        build_bank(teacher, ["dog", "star *"], "random", style_settings(num_styles=1), VANILLA)
    assert build_bank(teacher, ["dog", "star *"], "vanilla", style_settings(), VANILLA)[0].features.shape[:2] == (1, 2)  # no style slot: fine


NASTY = ["a/b", "..", "../../etc/passwd", "/abs/path", "狗", "猫", "🐶 dog", "👨\u200d👩\u200d👧", "x" * 300, "x" * 299 + "y", "CON", "nul.txt"]


def test_any_class_name_maps_to_a_distinct_partition_and_folder_inside_the_data_root(tmp_path):
    from dfkd_assets.definitions import build_defs

    path = _settings(tmp_path, {"classes": NASTY, "workspace": str(tmp_path / "ws")})
    cfg = load_config(path)
    assert cfg.classes == NASTY  # accepted as written (names are prompts, not paths)
    keys = [class_key(c) for c in cfg.classes]
    assert len(set(keys)) == len(keys)  # 300-char names sharing 299 characters stay apart
    root = cfg.synthetic_dir.resolve()
    for c, k in zip(cfg.classes, keys):
        assert len(k) <= 64 and k.replace("_", "").isalnum() and k.isascii()
        d = cfg.class_dir(c).resolve()
        assert d.parent == root, (c, d)
        assert (cfg.work_dir / "synthetic" / k).resolve().parent == (cfg.work_dir / "synthetic").resolve()
        assert cfg.class_for_key(k) == c
    part = build_defs(path).resolve_asset_graph().get(dg.AssetKey("synthetic_images")).partitions_def
    assert part.get_partition_keys() == keys
    with pytest.raises(KeyError, match="matches no class"):
        cfg.class_for_key("../dog")


def test_class_names_longer_than_the_text_context_are_refused_naming_class_and_setting(teacher):
    from dfkd_assets.core.prompts import build_bank
    from dfkd_assets.core.teacher import PromptTooLong, zero_shot_head

    long = "x" * 300  # 75 BPE tokens: fits alone (77 with start/end), not inside any template
    with pytest.raises(PromptTooLong, match=rf"class '{long}' \(in `classes`\).*teacher\.templates.*more than the encoder's context of 77"):
        zero_shot_head(teacher, ["dog", long], "simple")
    for method, setting in (("vanilla", "prompts.vanilla_template"), ("contrastive", "prompts.style_template"), ("random", "prompts.style_template")):
        with pytest.raises(PromptTooLong, match=rf"class '{long}'.*{setting}"):
            build_bank(teacher, ["dog", long], method, style_settings(num_styles=1, steps=1), VANILLA)
    with pytest.raises(PromptTooLong, match="more than the text encoder's context"):
        teacher.encode_text(["a photo of a " + long])  # no path encodes a cut prompt
    # emoji, CJK and a ZWJ sequence fit and give distinct, finite class embeddings
    head = zero_shot_head(teacher, ["狗", "🐶 dog", "👨\u200d👩\u200d👧", "dog"], "simple")
    assert head.shape == (4, 64) and torch.isfinite(head).all()
    assert (head @ head.t()).fill_diagonal_(0).max() < 0.9999


def test_too_long_class_name_fails_the_first_step_at_once_and_writes_nothing(tmp_path, monkeypatch):
    from conftest import make_workspace
    from dfkd_assets.definitions import build_defs
    from dfkd_assets.defs.jobs import PREPARE

    cfg_path = make_workspace(tmp_path, {"classes": ["dog", "elephant", "very " * 70 + "long house"],
                                         "operations": {"max_retries": 2, "retry_delay_s": 0}})
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    cfg = load_config(cfg_path)
    with dg.DagsterInstance.get() as instance:
        r = build_defs(cfg_path).resolve_job_def(PREPARE).execute_in_process(instance=instance, raise_on_error=False)
        assert not r.success
        kinds = [e.dagster_event.event_type_value for e in instance.all_logs(r.run_id) if e.dagster_event]
        assert "STEP_UP_FOR_RETRY" not in kinds  # a settings problem is not retried
        msg = r.failure_data_for_node("teacher_head").error.message
        assert "PromptTooLong" in msg and "very very" in msg and "teacher.templates" in msg
    assert not cfg.path("teacher_head").exists() and not cfg.path("prompt_bank").exists()


def test_env_references_in_store_urls_resolve_and_a_missing_variable_is_named(tmp_path, monkeypatch):
    cfg = load_config(_settings(tmp_path, {"mlflow.tracking_uri": "postgresql+psycopg2://ml:{env:DFKD_TEST_DB_PW}@db/ml"}))
    monkeypatch.delenv("DFKD_TEST_DB_PW", raising=False)
    with pytest.raises(ConfigError, match="environment variable DFKD_TEST_DB_PW is not set"):
        cfg.resolve(cfg.mlflow.tracking_uri)
    monkeypatch.setenv("DFKD_TEST_DB_PW", "hunter2")
    assert cfg.resolve(cfg.mlflow.tracking_uri) == "postgresql+psycopg2://ml:hunter2@db/ml"
    assert "hunter2" not in json.dumps(cfg.public_dump())


# ----------------------------------------------------------------------------------------- weights


class _Payload:
    """Unpickles as a call to os.system: what a hostile checkpoint would smuggle in."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_teacher_weights_of_another_architecture_are_refused_naming_file_and_setting(tmp_path, cpu, vqgan):
    from safetensors.torch import save_file

    from dfkd_assets.core.teacher import TeacherLoadError, load_teacher

    save_file({k: v.contiguous() for k, v in vqgan.state_dict().items()}, tmp_path / "vqgan.safetensors")
    with pytest.raises(TeacherLoadError, match=r"vqgan\.safetensors could not be loaded into teacher\.model_name='dfkd-tiny-clip'.*(Missing|Unexpected) key"):
        load_teacher("dfkd-tiny-clip", str(tmp_path / "vqgan.safetensors"), TINY_CLIP, 0, cpu)


def test_teacher_pickle_that_would_execute_code_is_refused_unexecuted(tmp_path, cpu):
    from dfkd_assets.core.teacher import TeacherLoadError, load_teacher

    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hook": _Payload(marker)}, tmp_path / "hostile.bin")
    with pytest.raises(TeacherLoadError, match=r"hostile\.bin could not be loaded into teacher\.model_name.*(Unsupported global|weights_only)"):
        load_teacher("dfkd-tiny-clip", str(tmp_path / "hostile.bin"), TINY_CLIP, 0, cpu)
    assert not marker.exists()


def test_any_weights_reader_refuses_a_code_executing_pickle_unexecuted(tmp_path):
    """core/weights.read_state_dict backs the VQGAN checkpoint and the few-shot ImageNet weights."""
    from dfkd_assets.core.weights import WeightsReadError, read_state_dict

    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"w": torch.ones(2)}, "x": _Payload(marker)}, tmp_path / "imagenet.pth")
    with pytest.raises(WeightsReadError, match=r"imagenet\.pth could not be read safely"):
        read_state_dict(tmp_path / "imagenet.pth")
    assert not marker.exists()


def test_vqgan_checkpoint_with_another_codebook_size_names_both_settings(tmp_path, cpu):
    from dfkd_assets.core.vqgan import GeneratorLoadError, build_vqgan, load_vqgan, read_model_params

    params = read_model_params(TINY_VQGAN)
    params["embed_dim"] = params["embed_dim"] * 2  # an embedding size the config does not have
    torch.save({"state_dict": build_vqgan(params).state_dict()}, tmp_path / "wide.ckpt")
    with pytest.raises(GeneratorLoadError, match=r"(?s)generator\.checkpoint .*wide\.ckpt: shapes do not match generator\.config_file "
                                                 r".*tiny-vqgan\.yaml.*size mismatch for quantize\.embedding"):
        load_vqgan(TINY_VQGAN, tmp_path / "wide.ckpt", 0, cpu)


def test_own_distillation_checkpoint_is_read_weights_only(tmp_path, teacher):
    """Our resumable checkpoint is a torch pickle (optimizer state); it is read with weights_only=True,
    so a planted one cannot run code."""
    from dfkd_assets.core.distill import CHECKPOINT, CorruptCheckpoint, distill
    from dfkd_assets.core.student import build_student
    from dfkd_assets.core.teacher import zero_shot_head

    marker = tmp_path / "pwned"
    (tmp_path / "ck").mkdir()
    torch.save({"fingerprint": "f", "model": _Payload(marker)}, tmp_path / "ck" / CHECKPOINT)
    head = zero_shot_head(teacher, ["dog", "cat"], "single")
    student = build_student("resnet10t", ["dog", "cat"], 32, 0)
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    with pytest.raises(CorruptCheckpoint, match="(?s)Delete it.*(Unsupported global|weights_only)|(Unsupported global|weights_only).*Delete it"):
        distill(student, teacher, head, images, torch.tensor([0, 1, 0, 1]), distill_settings(epochs=1, batch_size=4),
                checkpoint_dir=tmp_path / "ck", fingerprint="f")
    assert not marker.exists()


# --------------------------------------------------------------------------------- evaluation data

CLASSES = ["dog", "hot dog", "house"]


def _tree(root: Path, domains=("photo",), classes=CLASSES, n=1):
    for d in domains:
        for c in classes:
            (root / d / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(np.full((12, 12, 3), 40 * i, np.uint8)).save(root / d / c / f"{i}.png")


def test_empty_domain_is_named(tmp_path):
    _tree(tmp_path)
    (tmp_path / "sketch").mkdir()  # a domain folder with nothing in it
    with pytest.raises(EvalDataError, match=r"domain 'sketch' has no images for classes \['dog', 'hot dog', 'house'\]"):
        scan_domainbed(tmp_path, CLASSES, name="ci")
    for c in CLASSES:
        (tmp_path / "sketch" / c).mkdir()  # class folders, but no images in them
    with pytest.raises(EvalDataError, match=r"evaluation dataset ci: domain 'sketch' has no images"):
        scan_domainbed(tmp_path, CLASSES, name="ci")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalDataError, match="no domain folders"):
        scan_domainbed(tmp_path / "empty", CLASSES)


def test_dot_files_next_to_images_are_not_images(tmp_path):
    _tree(tmp_path)
    (tmp_path / "photo" / "dog" / "._0.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    (tmp_path / "photo" / ".DS_Store").write_bytes(b"junk")
    sets = scan_domainbed(tmp_path, CLASSES)
    assert [p.name for p in sets[0].paths] == ["0.png"] * 3


@pytest.mark.parametrize("kind", ["garbage", "truncated_png", "truncated_jpeg", "zero_bytes", "text_named_jpg"])
def test_corrupt_image_fails_evaluation_naming_the_file(tmp_path, kind):
    _tree(tmp_path, n=2)
    bad = tmp_path / "photo" / "house" / ("bad.jpg" if "jpeg" in kind or "jpg" in kind else "bad.png")
    buf = io.BytesIO()
    if kind == "truncated_jpeg":
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    else:
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    data = {"garbage": os.urandom(300), "truncated_png": buf.getvalue()[: len(buf.getvalue()) // 2],
            "truncated_jpeg": buf.getvalue()[: len(buf.getvalue()) // 2], "zero_bytes": b"",
            "text_named_jpg": b"<html>not an image</html>"}[kind]
    bad.write_bytes(data)
    sets = scan_domainbed(tmp_path, CLASSES)
    with pytest.raises(EvalDataError, match=rf"image {bad} cannot be decoded"):
        evaluate({"const": lambda x: torch.zeros(len(x), 3)}, sets, 3, 16, 4, torch.device("cpu"))


def test_image_modes_become_correct_rgb(tmp_path):
    """Values, not only shapes: 16-bit scans keep their tones (PIL alone clips them to white)."""
    ramp16 = (np.arange(64, dtype=np.uint16)[None].repeat(64, 0) * 1024 + 512)  # 0.5 .. 63.5 in 8-bit terms x4
    Image.fromarray(ramp16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I;16")
    got = load_image(tmp_path / "g16.png", 64)
    np.testing.assert_allclose(got[0, :, 0], (ramp16[0] >> 8), atol=1)
    assert got.mean() < 140  # not saturated (PIL's own convert gives ~255)
    Image.fromarray(np.full((20, 20), 100, np.uint8), "L").save(tmp_path / "g8.png")
    assert (load_image(tmp_path / "g8.png", 16) == 100).all()
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(tmp_path / "red.jpg", quality=100)  # pure red in CMYK
    r, g, b = load_image(tmp_path / "red.jpg", 16).reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60
    Image.new("RGBA", (20, 20), (0, 0, 255, 128)).save(tmp_path / "rgba.png")
    assert tuple(load_image(tmp_path / "rgba.png", 16)[0, 0]) == (0, 0, 255)
    Image.new("P", (20, 20), 3).save(tmp_path / "pal.gif")
    assert load_image(tmp_path / "pal.gif", 16).shape == (16, 16, 3)
    Image.fromarray(np.full((20, 30), 0.25, np.float32), "F").save(tmp_path / "f.tiff")
    assert abs(int(load_image(tmp_path / "f.tiff", 16)[0, 0, 0]) - 64) <= 1


def _png_header_only(path: Path, w: int, h: int) -> None:
    """A valid PNG signature + IHDR declaring w x h, then one tiny IDAT: a few dozen bytes that
    would decode to w*h*3 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [20000, 9000, 100000])
def test_decompression_bomb_is_refused_by_name_without_decoding(tmp_path, side):
    path = tmp_path / f"bomb{side}.png"
    _png_header_only(path, side, side)
    assert path.stat().st_size < 200
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(EvalDataError, match=rf"image {path} is (too large|{side} x {side} pixels, more than the {MAX_IMAGE_PIXELS})"):
        load_image(path, 32)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 100, f"peak memory grew by {grown_mib:.0f} MiB"  # decoding 20000^2 RGB would take 1.1 GiB


def test_large_image_within_the_limit_loads(tmp_path):
    rng = np.random.default_rng(0)
    big = np.repeat(np.repeat(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), 100, 0), 100, 1)  # 3000 x 4000
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=90)
    out = load_image(tmp_path / "big.jpg", 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8 and out.std() > 10


# ------------------------------------------------------------------------------------------ shards


def _shards(cfg, n: int) -> None:
    """Well-formed shards for every class, as synthetic_images writes them."""
    from dfkd_assets.core.io import encode_png, write_shard

    rng = np.random.default_rng(0)
    for c in cfg.classes:
        imgs = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        items = [(f"{class_key(c)}_{i:06d}.png", encode_png(im)) for i, im in enumerate(imgs)]
        recs = [{"index": i, "class": c, "teacher_top1": c, "final_cosine": 0.3} for i in range(n)]
        write_shard(cfg.class_dir(c), items, recs, {"class": c, "fingerprint": "x", "teacher_id": "t", "image_size": 32})


def _truncate(d: Path):
    shard = d / "images.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])


def _flip_a_byte(d: Path):  # same length, one image's bytes changed: the shard no longer matches its manifest
    shard = d / "images.tar"
    data = bytearray(shard.read_bytes())
    data[1024 + 600] ^= 0xFF
    shard.write_bytes(bytes(data))


def _drop_manifest(d: Path):
    (d / "manifest.json").unlink()


def _garble_manifest(d: Path):
    (d / "manifest.json").write_text('{"shard": "images.tar", "images": [')


def _escape_manifest(d: Path):
    m = json.loads((d / "manifest.json").read_text())
    m["shard"] = "../dog/images.tar"  # points at another class's (valid) shard
    (d / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("damage, match", [
    (_truncate, r"house/images\.tar"), (_flip_a_byte, r"house/images\.tar"), (_drop_manifest, r"manifest .*house/manifest\.json is missing"),
    (_garble_manifest, r"house/manifest\.json is not valid JSON"), (_escape_manifest, r"house/manifest\.json names shard '\.\./dog/images\.tar'"),
])
def test_damaged_shard_is_caught_by_the_check_and_never_trained_on(tmp_path, monkeypatch, damage, match):
    from conftest import make_workspace
    from dfkd_assets.definitions import build_defs
    from dfkd_assets.defs.checks import shard_integrity
    from dfkd_assets.defs.jobs import TRAIN
    from dfkd_assets.defs.resources import PipelineSettings

    cfg_path = make_workspace(tmp_path, {"operations": {"max_retries": 2, "retry_delay_s": 0}})
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    cfg = load_config(cfg_path)
    _shards(cfg, cfg.synthesis.images_per_class)
    assert shard_integrity(settings=PipelineSettings(config_file=str(cfg_path))).passed  # well-formed shards pass
    damage(cfg.class_dir("house"))

    check = shard_integrity(settings=PipelineSettings(config_file=str(cfg_path)))
    assert not check.passed
    problems = check.metadata["problems"].value
    assert problems.startswith("house: ") and re.search(match, problems), problems
    assert "dog" not in problems.split(":", 1)[0] and "elephant:" not in problems

    with dg.DagsterInstance.get() as instance:
        r = build_defs(cfg_path).resolve_job_def(TRAIN).execute_in_process(instance=instance, raise_on_error=False)
        assert not r.success
        assert not r.asset_materializations_for_node("student_model")  # never trained on it
        msg = r.failure_data_for_node("synthetic_dataset").error.message
        assert "ShardError" in msg and "house:" in msg and "materialize these synthetic_images partitions" in msg
        kinds = [e.dagster_event.event_type_value for e in instance.all_logs(r.run_id) if e.dagster_event]
        assert "STEP_UP_FOR_RETRY" not in kinds
    # nothing written half-way: no snapshot, no index, no student, no report
    assert not (cfg.data_dir / "synthetic.dvc").exists() and not (cfg.synthetic_dir / "index.json").exists()
    assert not cfg.path("student").exists() and not cfg.path("reports").exists()
    assert not [p for p in cfg.data_dir.rglob("*") if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------- security


_SERVER = re.compile(r'dagster dev|dagster-webserver|mlflow server|mlflow ui|"mlflow", "server"|"dagster", "dev"')
_LOOPBACK_HOST = re.compile(r'(--host|-h)\W+(127\.0\.0\.1|localhost)\b')


def _server_commands() -> list[tuple[str, str]]:
    """(where, command) for every server start the project runs or documents: `make ui` as make
    expands it, shell lines in infra/, scripts/ and the docs, subprocess argument lists in tests."""
    make = subprocess.run(["make", "-n", "-s", "ui"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    found = [("make ui", line) for line in make.splitlines() if _SERVER.search(line)]
    paths = [*ROOT.glob("infra/**/*"), *ROOT.glob("scripts/*"), *ROOT.glob("docs/*.md"), ROOT / "README.md", *ROOT.glob("tests/*.py"),
             *ROOT.glob("dfkd_assets/**/*.py")]
    for path in paths:
        if not path.is_file() or path.resolve() == Path(__file__).resolve():
            continue
        text = re.sub(r"\\\n\s*", " ", path.read_text(errors="replace"))  # shell line continuations
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if _SERVER.search(line):
                stmt = " ".join(lines[i : i + 3]) if path.suffix == ".py" else line  # argument lists span lines
                if re.search(r"(^|\s|\")--?[a-z]", stmt[_SERVER.search(stmt).end():]):  # has options: a command, not prose
                    found.append((f"{path.relative_to(ROOT)}:{i + 1}", stmt.strip()))
    return found


def test_every_service_the_project_starts_binds_to_loopback():
    cmds = _server_commands()
    where = {w.split(":")[0] for w, _ in cmds}
    assert {"make ui", "infra/README.md", "tests/test_scaleout.py", "tests/test_browser.py"} <= where, where
    for w, cmd in cmds:
        assert _LOOPBACK_HOST.search(cmd), f"{w}: a server started without an explicit 127.0.0.1 bind: {cmd}"
    wide = subprocess.run(["make", "-n", "-s", "ui", "UI_HOST=192.0.2.7"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "--host 192.0.2.7" in wide  # configurable, loopback unless configured
    for path in [*ROOT.glob("infra/**/*"), *ROOT.glob("scripts/*"), ROOT / "Makefile", *ROOT.glob("dfkd_assets/**/*.py"), *ROOT.glob("configs/*.yaml")]:
        if path.is_file():
            assert "0.0.0.0" not in path.read_text(errors="replace"), path


def test_mlflow_server_password_never_reaches_the_event_log(tmp_path, monkeypatch, capfd):
    """An unreachable tracking server whose URL carries user:password@: the step fails (a real MLflow
    HTTP error), and neither the Dagster event log nor the output shows the password."""
    import socket

    from conftest import make_workspace
    from dfkd_assets.definitions import build_defs
    from dfkd_assets.defs.jobs import PREPARE

    secret = "httppw-" + os.urandom(6).hex()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg_path = make_workspace(tmp_path, {"operations": {"max_retries": 0, "retry_delay_s": 0},
                                         "mlflow": {"tracking_uri": f"http://alice:{secret}@127.0.0.1:{port}", "artifact_location": None}})
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(var, "")  # recorded, so the values the resource sets for MLflow are undone after the test
        monkeypatch.delenv(var)
    with dg.DagsterInstance.get() as instance:
        r = build_defs(cfg_path).resolve_job_def(PREPARE).execute_in_process(instance=instance, raise_on_error=False)
        assert not r.success
        err = r.failure_data_for_node("prompt_bank").error.to_string()
        assert f"127.0.0.1:{port}" in err  # the error still names the server ...
        leaks = _leaks_in_dagster(instance, [secret])
    out = capfd.readouterr()
    assert not leaks and secret not in out.out + out.err  # ... but not its password
    assert secret not in os.environ.get("MLFLOW_TRACKING_PASSWORD", "")  # handed to MLflow for the step only (issue 37)


def _leaks_in_dagster(instance, secrets: list[str]) -> list[str]:
    found = []
    for run in instance.get_runs():
        blobs = [dg.serialize_value(run)] + [dg.serialize_value(e) for e in instance.all_logs(run.run_id)]
        for s in secrets:
            found += [f"run {run.run_id[:8]} holds {s[:8]}..." for b in blobs if s in b][:1]
    return found


def _leaks_in_files(root: Path, secrets: list[str], skip: set[Path]) -> list[str]:
    found = []
    for p in root.rglob("*"):
        if p.is_file() and p not in skip:
            data = p.read_bytes()
            found += [f"{p} holds {s[:8]}..." for s in secrets if s.encode() in data]
    return found


@pytest.mark.e2e
def test_secrets_never_reach_logs_metadata_mlflow_or_files(tmp_path, monkeypatch, capfd):
    """The whole tiny pipeline with a webhook token, S3 keys and database passwords in the
    environment, and (with Postgres here) Dagster and MLflow on databases whose URLs carry a
    password. Afterwards no event, run record, MLflow param/tag/artifact, written file or printed
    line holds any of them."""
    from conftest import make_workspace
    from dfkd_assets.definitions import build_defs
    from dfkd_assets.defs.runner import run_pipeline

    tag = os.urandom(4).hex()
    secrets = {k: f"{k}-{os.urandom(8).hex()}" for k in ("webhook", "aws", "dagsterpw", "mlflowpw")}
    dagster_db, mlflow_db = f"dfkd_sec_dagster_{tag}", f"dfkd_sec_mlflow_{tag}"
    dagster_url = create_postgres_db(dagster_db, secrets["dagsterpw"])
    mlflow_url = create_postgres_db(mlflow_db, secrets["mlflowpw"]) if dagster_url else None
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    monkeypatch.setenv("DFKD_FAILURE_WEBHOOK", f"http://127.0.0.1:{dead_port}/hook?token={secrets['webhook']}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIADFKDTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secrets["aws"])
    monkeypatch.setenv("DAGSTER_PG_URL", dagster_url or f"postgresql+psycopg2://dagster:{secrets['dagsterpw']}@127.0.0.1:1/none")
    tiny = {
        "classes": ["dog", "house"],
        "prompts": {"method": "contrastive", "num_styles": 2, "steps": 2},
        "synthesis": {"images_per_class": 4, "iterations": 2, "cutn": 4, "image_size": 32, "batch_size": 4},
        "distill": {"epochs": 1, "batch_size": 8},
        "mlflow": {"registered_model_name": "dfkd-sec", "artifact_location": str(tmp_path / "mlartifacts"),
                   **({"tracking_uri": mlflow_url} if mlflow_url else {})},
    }
    cfg_path = make_workspace(tmp_path, tiny)
    home = tmp_path / "dagster_home"
    if dagster_url:
        (home / "dagster.yaml").write_text((ROOT / "infra" / "dagster-postgres.yaml").read_text())
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    cfg = load_config(cfg_path)
    defs = build_defs(cfg_path)
    try:
        with dg.DagsterInstance.get() as instance:
            assert (type(instance.run_storage).__name__ == "PostgresRunStorage") == bool(dagster_url)
            results = run_pipeline(defs, instance)
            assert all(r.success for r in results)
            # a failed run, recorded by the failure sensor (webhook unreachable: it warns)
            bad = defs.resolve_job_def("rollback_champion").execute_in_process(
                instance=instance, raise_on_error=False, run_config={"ops": {"move_champion_back": {"config": {"to_version": "99"}}}})
            assert not bad.success
            failure = next(e for e in instance.all_logs(bad.run_id) if e.dagster_event and e.dagster_event.event_type_value == "PIPELINE_FAILURE")
            ctx = dg.build_run_status_sensor_context(sensor_name="record_failures", dagster_event=failure.dagster_event,
                                                     dagster_instance=instance, dagster_run=instance.get_run_by_id(bad.run_id)).for_run_failure()
            defs.resolve_sensor_def("record_failures")(ctx)
            leaks = _leaks_in_dagster(instance, list(secrets.values()))
            student_meta = instance.get_latest_materialization_event(dg.AssetKey("student_model")).asset_materialization.metadata

        import mlflow

        from dfkd_assets.defs.resources import MlflowTracking

        client = MlflowTracking().client(cfg)
        runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
        assert runs and any("mlflow.tracking_uri" in r.data.params for r in runs)
        for r in runs:
            blob = json.dumps({"params": r.data.params, "tags": r.data.tags})
            leaks += [f"MLflow run {r.info.run_id[:8]} params/tags hold {s[:8]}..." for s in secrets.values() if s in blob]
        for mv in client.search_model_versions("name='dfkd-sec'"):
            leaks += [f"model version {mv.version} tags" for s in secrets.values() if s in json.dumps(mv.tags)]
        # every file the run wrote: workspace (data, reports, params.yaml, run_failures.jsonl, DVC),
        # MLflow artifacts, DAGSTER_HOME; only the settings file the user wrote may hold the password
        leaks += _leaks_in_files(tmp_path, list(secrets.values()), skip={cfg_path})
        assert (cfg.storage_dir / "run_failures.jsonl").is_file() and (cfg.data_dir / "params.yaml").is_file()
        out = capfd.readouterr()
        leaks += [f"captured output holds {s[:8]}..." for s in secrets.values() if s in out.out + out.err]
        assert not leaks, "\n".join(leaks)
        if mlflow_url:  # the password was in the settings: recorded masked, not dropped
            assert any(r.data.params.get("mlflow.tracking_uri", "").startswith("postgresql+psycopg2://postgres:***@") for r in runs)
            assert student_meta["mlflow_tracking_uri"].value.startswith("postgresql+psycopg2://postgres:***@127.0.0.1")
    finally:
        if dagster_url:
            drop_postgres_db(dagster_db)
            drop_postgres_db(mlflow_db)


# --------------------------------------------------------------- settings known at load

@pytest.mark.parametrize("section,value,match", [
    ({"classes": ["label", "dog"]}, None, "reserved"),
    ({"classes": ["dog", "Score"]}, None, "reserved"),
    ({"promotion": {"metric": "student_mean_top5"}}, None, "promotion.metric"),
    ({"student": {"model_kwargs": {"pretrained_cfg_overlay": {"file": "/etc/passwd"}}}}, None, "student.model_kwargs"),
    ({"student": {"model_kwargs": {"checkpoint_path": "weights.pth"}}}, None, "checkpoint_path"),
    ({"student": {"model_kwargs": {"act_layer": "/etc/passwd"}}}, None, "look like file paths"),
])
def test_settings_that_would_fail_after_training_are_refused_at_load(tmp_path, section, value, match):
    """What can be known when the settings load fails then, naming the key: a class named like an
    output column, a promotion metric the evaluation never writes, a student keyword that reads a file."""
    base = {"classes": ["dog", "cat"], "generator": {"config_file": "x.yaml"}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**base, **section}))
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_a_domain_folder_name_mlflow_refuses_becomes_a_safe_metric_key():
    from dfkd_assets.core.names import RESERVED_CLASS_NAMES, metric_key
    from dfkd_assets.registry_model import LABEL, SCORE

    assert metric_key("photos (2019)") == "photos _2019_" and metric_key("art/painting-1.b") == "art/painting-1.b"
    assert metric_key("été") == "_t_"
    assert set(RESERVED_CLASS_NAMES) == {LABEL, SCORE}
