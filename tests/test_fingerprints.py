"""Issue 37, item 5: fingerprints over content, not paths. The generator checkpoint and config, the
style-words file and the teacher's files enter shard, round, resume and prompt-bank fingerprints by
their bytes: replaced in place, they make new fingerprints (old shards and resume batches are not
reused, a stale bank is refused); the same bytes under another name keep them.
"""

import os
import shutil
from pathlib import Path

import pytest
import yaml

from dfkd_assets.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY_CLIP = ROOT / "configs" / "models" / "dfkd-tiny-clip.json"
TINY_VQGAN = ROOT / "configs" / "models" / "tiny-vqgan.yaml"


def _cfg(tmp_path: Path, **sections):
    d = yaml.safe_load((ROOT / "configs" / "ci.yaml").read_text())
    d["workspace"] = str(tmp_path / "ws")
    d["teacher"]["model_config_file"] = str(TINY_CLIP)
    d["generator"]["config_file"] = str(TINY_VQGAN)
    for section, values in sections.items():
        d.setdefault(section, {}).update(values)
    path = tmp_path / f"settings-{len(list(tmp_path.glob('settings-*')))}.yaml"
    path.write_text(yaml.safe_dump(d))
    return load_config(path)


def _replace_in_place(path: Path, data: bytes) -> None:
    """New bytes at the same path, same size and the old mtime: only the content says it changed."""
    st = path.stat()
    with open(path, "r+b") as f:  # same inode
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def _fps(cfg):
    from dfkd_assets.fingerprints import class_fingerprint, round_fingerprint

    return class_fingerprint(cfg, "teacher-x", "dog"), round_fingerprint(cfg, "teacher-x", "dog", 2)


def test_generator_checkpoint_and_config_count_by_bytes_not_path(tmp_path):
    ckpt = tmp_path / "vqgan.ckpt"
    ckpt.write_bytes(b"A" * 4096)
    cfg = _cfg(tmp_path, generator={"checkpoint": str(ckpt)})
    before = _fps(cfg)
    assert _fps(cfg) == before  # stable

    renamed = tmp_path / "elsewhere" / "renamed.ckpt"
    renamed.parent.mkdir()
    shutil.copy(ckpt, renamed)  # byte-identical, another name and folder
    assert _fps(_cfg(tmp_path, generator={"checkpoint": str(renamed)})) == before

    _replace_in_place(ckpt, b"B" * 4096)
    after = _fps(cfg)
    assert after[0] != before[0] and after[1] != before[1]  # the class shard and its rounds are stale

    conf = tmp_path / "vqgan.yaml"
    shutil.copy(TINY_VQGAN, conf)
    with_conf = _cfg(tmp_path, generator={"checkpoint": str(ckpt), "config_file": str(conf)})
    assert _fps(with_conf) == after  # the packaged config copied elsewhere: same bytes, same fingerprint
    conf.write_text(conf.read_text() + "\n# edited\n")
    assert _fps(with_conf) != after


def test_style_words_count_by_bytes_for_mix_prompts_only(tmp_path):
    from dfkd_assets.fingerprints import bank_inputs_hash, prompt_settings_hash

    words = tmp_path / "styles.txt"
    words.write_text("oil painting\nsketch\ncartoon\n")
    mix = _cfg(tmp_path, prompts={"method": "mix", "style_words_file": str(words)})
    before = (_fps(mix), prompt_settings_hash(mix), bank_inputs_hash(mix))

    copy = tmp_path / "other-name.txt"
    shutil.copy(words, copy)
    moved = _cfg(tmp_path, prompts={"method": "mix", "style_words_file": str(copy)})
    assert (_fps(moved), prompt_settings_hash(moved), bank_inputs_hash(moved)) == before

    _replace_in_place(words, b"watercolor\nsketch\ncartoon\n"[: words.stat().st_size].ljust(words.stat().st_size, b"\n"))
    after = (_fps(mix), prompt_settings_hash(mix), bank_inputs_hash(mix))
    assert all(a != b for a, b in zip(after, before))  # shards, the bank (sensor) and the bank check all see it

    # methods that do not read the dictionary do not depend on it
    vanilla = _cfg(tmp_path, prompts={"method": "vanilla", "style_words_file": str(words)})
    fp = _fps(vanilla)
    words.write_text("anything else\n")
    assert _fps(vanilla) == fp

    # no file set: the packaged dictionary, by content as well
    packaged = _cfg(tmp_path, prompts={"method": "mix"})
    shutil.copy(ROOT / "dfkd_assets" / "resources" / "style_words.txt", copy)
    assert _fps(packaged) == _fps(_cfg(tmp_path, prompts={"method": "mix", "style_words_file": str(copy)}))


def test_teacher_files_count_by_bytes_in_the_prompt_bank_hash(tmp_path):
    from dfkd_assets.fingerprints import prompt_settings_hash

    weights = tmp_path / "clip.safetensors"
    weights.write_bytes(b"W" * 1000)
    cfg = _cfg(tmp_path, teacher={"pretrained": str(weights)})
    before = prompt_settings_hash(cfg)
    other = tmp_path / "moved.safetensors"
    shutil.copy(weights, other)
    assert prompt_settings_hash(_cfg(tmp_path, teacher={"pretrained": str(other)})) == before
    _replace_in_place(weights, b"V" * 1000)
    assert prompt_settings_hash(cfg) != before


def test_a_missing_input_file_matches_no_fingerprint_and_does_not_crash(tmp_path):
    from dfkd_assets.fingerprints import file_digest

    cfg = _cfg(tmp_path, generator={"checkpoint": str(tmp_path / "nope.ckpt")})
    assert file_digest(tmp_path / "nope.ckpt") == f"missing:{tmp_path / 'nope.ckpt'}"
    ckpt = tmp_path / "nope.ckpt"
    ckpt.write_bytes(b"x")
    assert _fps(cfg) != _fps(_cfg(tmp_path, generator={"checkpoint": str(tmp_path / "nope2.ckpt")}))


def test_file_hash_is_cached_per_file_version(tmp_path, monkeypatch):
    """A big checkpoint is hashed once per version, however often the sensor recomputes fingerprints."""
    from dfkd_assets.core import io

    calls = []
    real = io.sha256_file
    monkeypatch.setattr(io, "sha256_file", lambda p: calls.append(p) or real(p))
    f = tmp_path / "big.ckpt"
    f.write_bytes(b"1" * 10000)
    first = io.sha256_file_cached(f)
    for _ in range(5):
        assert io.sha256_file_cached(f) == first
    assert len(calls) == 1
    _replace_in_place(f, b"2" * 10000)  # same size and mtime: ctime still moves
    assert io.sha256_file_cached(f) != first and len(calls) == 2
    tmp = tmp_path / "new.ckpt"
    tmp.write_bytes(b"3" * 10000)
    os.utime(tmp, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns))
    os.replace(tmp, f)  # replaced by rename: another inode
    assert io.sha256_file_cached(f) == real(tmp_path / "big.ckpt") != first


def test_a_replaced_checkpoint_makes_the_old_shard_and_its_resume_batches_stale(tmp_path):
    """What make_shard decides with: the shard on disk carries the old fingerprint, so it is not reused;
    the resume batches are kept under the fingerprint they were made with (core/synthesis: another
    fingerprint discards them, tests/test_synthesis.py), so they are not reused either."""
    import numpy as np

    from dfkd_assets import artifacts

    ckpt = tmp_path / "vqgan.ckpt"
    ckpt.write_bytes(b"A" * 512)
    cfg = _cfg(tmp_path, generator={"checkpoint": str(ckpt)})
    fp, _ = _fps(cfg)
    images = np.zeros((2, 8, 8, 3), np.uint8)
    records = [{"seed": i, "prompt": "p", "style_id": 0} for i in range(2)]
    artifacts.write_class_shard(cfg, "dog", images, records, {"fingerprint": fp, "teacher_id": "teacher-x", "image_size": 8})
    assert artifacts.current_shard(cfg, "dog", fp) is not None
    _replace_in_place(ckpt, b"B" * 512)
    new_fp, _ = _fps(cfg)
    assert new_fp != fp and artifacts.current_shard(cfg, "dog", new_fp) is None


def test_a_bank_made_from_other_style_words_is_refused_before_new_images(tmp_path):
    import torch

    from dfkd_assets import artifacts
    from dfkd_assets.core.prompts import PromptBank, PromptBankMismatch

    words = tmp_path / "styles.txt"
    words.write_text("oil painting\nsketch\n")
    cfg = _cfg(tmp_path, prompts={"method": "mix", "style_words_file": str(words)})
    bank = PromptBank("mix", list(cfg.classes), ["s"], [list(cfg.classes)], torch.zeros(1, len(cfg.classes), 4), "teacher-x",
                      diagnostics={"mean_pairwise_cosine": 0.0})
    artifacts.write_prompt_bank(cfg, bank, [])
    artifacts.check_prompt_bank_inputs(cfg)  # current: fine
    renamed = tmp_path / "renamed.txt"
    shutil.copy(words, renamed)
    artifacts.check_prompt_bank_inputs(_cfg(tmp_path, prompts={"method": "mix", "style_words_file": str(renamed)}))
    words.write_text("watercolor\nsketch\n")
    with pytest.raises(PromptBankMismatch, match="re-materialize prompt_bank"):
        artifacts.check_prompt_bank_inputs(cfg)


def test_local_dir_teacher_id_covers_its_config_not_its_path(tmp_path, cpu):
    import json

    from safetensors.torch import save_file

    from dfkd_assets.core.teacher import load_teacher

    sd = load_teacher("dfkd-tiny-clip", None, TINY_CLIP, 3, cpu).model.state_dict()
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    config = {"model_cfg": json.loads(TINY_CLIP.read_text()), "preprocess_cfg": {}}
    (bundle / "open_clip_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in sd.items()}, bundle / "open_clip_model.safetensors")
    first = load_teacher(f"local-dir:{bundle}", None, None, 0, cpu).teacher_id
    moved = tmp_path / "moved-bundle"
    shutil.copytree(bundle, moved)
    assert load_teacher(f"local-dir:{moved}", None, None, 0, cpu).teacher_id == first
    config["preprocess_cfg"] = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}  # another preprocessing, same weights
    (bundle / "open_clip_config.json").write_text(json.dumps(config))
    assert load_teacher(f"local-dir:{bundle}", None, None, 0, cpu).teacher_id != first


def test_warm_start_enters_the_student_fingerprint_by_its_weights(cpu):
    import torch

    from dfkd_assets.fingerprints import module_id

    a = torch.nn.Linear(3, 2)
    b = torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert module_id(a) == module_id(b)
    with torch.no_grad():
        b.bias[0] += 1e-3
    assert module_id(a) != module_id(b)
