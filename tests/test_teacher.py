import shutil

import pytest
import torch

from conftest import TINY_CLIP
from dfkd_assets.core.teacher import TeacherLoadError, load_teacher, teacher_logits, zero_shot_head


def test_head_is_normalised_and_logits_use_scale(teacher):
    head = zero_shot_head(teacher, ["dog", "cat", "house"], "simple")
    assert head.shape == (3, 64)
    torch.testing.assert_close(head.norm(dim=-1), torch.ones(3))
    x = torch.rand(2, 3, 40, 40)
    z = teacher_logits(teacher, head, x)
    f = teacher.encode_images(x)
    torch.testing.assert_close(z, teacher.logit_scale * f @ head.t())



def test_logits_keep_fp32_under_bf16_autocast(teacher):
    """KD's targets: the image tower may run in bf16, the product with the head stays fp32."""
    head = zero_shot_head(teacher, ["dog", "cat", "house"], "simple")
    x = torch.rand(16, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = teacher_logits(teacher, head, x)
        f = teacher.encode_images(x)  # fp32 out of a bf16 tower
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, teacher.logit_scale * f @ head.t(), rtol=0, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_bf16 = teacher.logit_scale * f @ head.t()  # what autocast would have made of the product
    assert (in_bf16.float() - z).abs().max() > 1e-3

def test_templates_matter(teacher):
    a = zero_shot_head(teacher, ["dog", "cat"], "single")
    b = zero_shot_head(teacher, ["dog", "cat"], "openai")
    assert not torch.allclose(a, b)


def test_encode_images_is_differentiable(teacher):
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    teacher.encode_images(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_config_name_must_match(tmp_path, cpu):
    other = tmp_path / "other-name.json"
    shutil.copy(TINY_CLIP, other)
    with pytest.raises(TeacherLoadError, match="teacher.model_name must be 'other-name'"):
        load_teacher("dfkd-tiny-clip", None, other, 0, cpu)


def test_missing_weights_file_is_named(tmp_path, cpu):
    with pytest.raises(TeacherLoadError, match="teacher.pretrained weights file .*nope.pt"):
        load_teacher("dfkd-tiny-clip", str(tmp_path / "nope.pt"), TINY_CLIP, 0, cpu)


def test_teacher_id_tracks_init(cpu):
    a = load_teacher("dfkd-tiny-clip", None, TINY_CLIP, 0, cpu)
    b = load_teacher("dfkd-tiny-clip", None, TINY_CLIP, 1, cpu)
    assert a.teacher_id != b.teacher_id


def _tiny_state(seed, cpu):
    return load_teacher("dfkd-tiny-clip", None, TINY_CLIP, seed, cpu).model.state_dict()


@pytest.mark.parametrize("suffix", [".safetensors", ".bin", ".pt"])
def test_weights_load_from_every_local_file_format(tmp_path, cpu, suffix):
    from safetensors.torch import save_file

    sd = _tiny_state(7, cpu)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    elif suffix == ".bin":
        torch.save(sd, path)
    else:  # a training checkpoint: weights under 'state_dict' with DDP 'module.' prefixes
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    t = load_teacher("dfkd-tiny-clip", str(path), TINY_CLIP, 0, cpu)
    for k, v in sd.items():
        torch.testing.assert_close(t.model.state_dict()[k], v)
    assert t.teacher_id.startswith("dfkd-tiny-clip:")


def test_local_dir_bundle_loads_and_a_bundle_without_weights_is_refused(tmp_path, cpu):
    import json

    from safetensors.torch import save_file

    sd = _tiny_state(3, cpu)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "open_clip_config.json").write_text(json.dumps({"model_cfg": json.loads(TINY_CLIP.read_text()), "preprocess_cfg": {}}))
    with pytest.raises(TeacherLoadError, match="no weights file"):
        load_teacher(f"local-dir:{bundle}", None, None, 0, cpu)
    save_file({k: v.contiguous() for k, v in sd.items()}, bundle / "open_clip_model.safetensors")
    t = load_teacher(f"local-dir:{bundle}", None, None, 0, cpu)
    torch.testing.assert_close(t.model.state_dict()["text_projection"], sd["text_projection"])
    with pytest.raises(TeacherLoadError, match="open_clip_config.json not found"):
        load_teacher(f"local-dir:{tmp_path / 'nothing'}", None, None, 0, cpu)


def test_wrong_architecture_and_truncated_weights_name_the_setting(tmp_path, cpu):
    import json

    wide = json.loads(TINY_CLIP.read_text())
    wide["embed_dim"] = 96  # an embedding size that does not match the weights
    cfg = tmp_path / "dfkd-tiny-clip-wide.json"
    cfg.write_text(json.dumps(wide))
    torch.save(_tiny_state(0, cpu), tmp_path / "w.bin")
    with pytest.raises(TeacherLoadError, match="w.bin could not be loaded into teacher.model_name='dfkd-tiny-clip-wide'.*size mismatch"):
        load_teacher("dfkd-tiny-clip-wide", str(tmp_path / "w.bin"), cfg, 0, cpu)
    data = (tmp_path / "w.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 3])
    with pytest.raises(TeacherLoadError, match="cut.bin could not be loaded"):
        load_teacher("dfkd-tiny-clip", str(tmp_path / "cut.bin"), TINY_CLIP, 0, cpu)


def test_pretrained_tag_missing_offline_fails_at_once_with_the_file_to_fetch(tmp_path, cpu):
    import time

    t0 = time.perf_counter()
    with pytest.raises(TeacherLoadError, match=r"not in the local cache.*timm/resnet50_clip.openai.*teacher.pretrained"):
        load_teacher("RN50", "openai", None, 0, cpu, cache_dir=tmp_path)
    assert time.perf_counter() - t0 < 10  # no hub retries (the RN50 build itself is never reached)
    with pytest.raises(TeacherLoadError, match="its tags: .*openai"):
        load_teacher("RN50", "no-such-tag", None, 0, cpu, cache_dir=tmp_path)


def test_pretrained_tag_resolves_from_a_hugging_face_cache(tmp_path):
    from dfkd_assets.core.teacher import resolve_pretrained

    snap = tmp_path / "models--timm--resnet50_clip.openai" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "open_clip_pytorch_model.bin").write_bytes(b"x")
    (tmp_path / "models--timm--resnet50_clip.openai" / "refs").mkdir()
    (tmp_path / "models--timm--resnet50_clip.openai" / "refs" / "main").write_text("abc123")
    assert resolve_pretrained("RN50", "openai", tmp_path) == str(snap / "open_clip_pytorch_model.bin")
    (snap / "open_clip_model.safetensors").write_bytes(b"y")  # safetensors preferred, as open_clip does
    assert resolve_pretrained("RN50", "openai", tmp_path) == str(snap / "open_clip_model.safetensors")
