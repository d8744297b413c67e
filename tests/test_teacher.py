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
