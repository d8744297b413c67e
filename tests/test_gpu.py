"""CUDA checks (skipped without a GPU): the synthesis and distillation paths on the device."""

import dataclasses

import numpy as np
import pytest
import torch

from conftest import TINY_CLIP, TINY_VQGAN
from core_settings import distill_settings, synthesis_settings

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_models():
    from dfkd_assets.core.teacher import load_teacher
    from dfkd_assets.core.vqgan import load_vqgan

    dev = torch.device("cuda")
    return load_teacher("dfkd-tiny-clip", None, TINY_CLIP, 0, dev), load_vqgan(TINY_VQGAN, None, 0, dev)


def test_synthesis_on_cuda_batch_equals_single(cuda_models):
    from dfkd_assets.core.synthesis import synthesize_batch

    teacher, vqgan = cuda_models
    t = teacher.encode_text(["a photo of a dog", "a photo of a cat"])
    s = synthesis_settings(iterations=8, cutn=4, image_size=32)
    batch = synthesize_batch(vqgan, teacher, t, [1, 2], s)
    single = synthesize_batch(vqgan, teacher, t[1:], [2], s)
    assert np.abs(batch.images[1].astype(int) - single.images[0]).mean() < 1.0
    assert np.isfinite(batch.cosines).all() and batch.losses[-1] < batch.losses[0] + 0.5


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_step_on_cuda_keeps_the_image(cuda_models, mode, tmp_path, monkeypatch):
    """The whole step compiled on the device, with CUDA graphs too (reduce-overhead), follows the
    eager engine: same seeds, same image to bf16 rounding."""
    from dfkd_assets.core.synthesis import synthesize_batch

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    teacher, vqgan = cuda_models
    t = teacher.encode_text(["a photo of a dog", "a photo of a cat"])
    s = synthesis_settings(iterations=8, cutn=4, image_size=32, bf16=True)
    try:
        eager = synthesize_batch(vqgan, teacher, t, [1, 2], s)
        compiled = synthesize_batch(vqgan, teacher, t, [1, 2], dataclasses.replace(s, compile=True, compile_mode=mode))
    finally:
        torch._dynamo.reset()
    assert np.abs(eager.images.astype(int) - compiled.images).mean() < 2.0
    np.testing.assert_allclose(compiled.cosines, eager.cosines, atol=0.02)


def test_distillation_on_cuda(cuda_models, tmp_path):
    from dfkd_assets.core.distill import distill
    from dfkd_assets.core.student import build_student
    from dfkd_assets.core.teacher import zero_shot_head

    teacher, _ = cuda_models
    head = zero_shot_head(teacher, ["a", "b"], "single")
    images = torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8)
    hist = distill(build_student("resnet10t", ["a", "b"], 32, 0), teacher, head, images, torch.arange(16) % 2,
                   distill_settings(epochs=2, batch_size=8), tmp_path, "fp")
    assert len(hist) == 2 and all(np.isfinite(h["kd_loss"]) for h in hist)


def test_paper_size_generator_and_teacher_step_on_cuda():
    """One synthesis step at paper shapes (ViT-B-32, f16 VQGAN, 224 px) with random weights."""
    from conftest import ROOT
    from dfkd_assets.core.synthesis import synthesize_batch
    from dfkd_assets.core.teacher import load_teacher
    from dfkd_assets.core.vqgan import load_vqgan

    dev = torch.device("cuda")
    teacher = load_teacher("ViT-B-32", None, None, 0, dev)
    vqgan = load_vqgan(ROOT / "configs" / "models" / "vqgan_imagenet_f16_16384.yaml", None, 0, dev)
    res = synthesize_batch(vqgan, teacher, teacher.encode_text(["a photo of a dog"] * 2), [0, 1], synthesis_settings(iterations=2, cutn=8))
    assert res.images.shape == (2, 224, 224, 3) and np.isfinite(res.cosines).all()


def test_bf16_synthesis_keeps_the_quality_of_fp32(cuda_models):
    """bf16 autocast changes the arithmetic of decoder and encoder, not the outcome: final cosines agree."""
    from dfkd_assets.core.synthesis import synthesize_batch

    teacher, vqgan = cuda_models
    t = teacher.encode_text([f"a photo of a {c}" for c in ("dog", "cat", "house", "tree")])
    fp32 = synthesize_batch(vqgan, teacher, t, [1, 2, 3, 4], synthesis_settings(iterations=30, cutn=8, image_size=32))
    bf16 = synthesize_batch(vqgan, teacher, t, [1, 2, 3, 4], synthesis_settings(iterations=30, cutn=8, image_size=32, bf16=True))
    assert np.isfinite(bf16.cosines).all()
    assert bf16.losses[-1] < bf16.losses[0]
    assert abs(float(bf16.cosines.mean()) - float(fp32.cosines.mean())) < 0.05


def test_lease_gives_each_step_a_gpu(tmp_path):
    from dfkd_assets.core.devices import lease_device

    with lease_device("cuda", tmp_path, 1) as a:
        assert a.type == "cuda" and a.index is not None
        if torch.cuda.device_count() > 1:
            with lease_device("cuda", tmp_path, 1) as b:
                assert b.index != a.index


def test_engine_defaults_on_cuda_keep_the_reference_quality():
    """bf16 + channels-last change the schedule, not the result: final cosines stay close."""
    import dataclasses

    from dfkd_assets.core.reference_synthesis import reference_synthesize
    from dfkd_assets.core.synthesis import synthesize_batch
    from dfkd_assets.core.teacher import load_teacher
    from dfkd_assets.core.vqgan import load_vqgan

    dev = torch.device("cuda")
    teacher, vqgan = load_teacher("dfkd-tiny-clip", None, TINY_CLIP, 0, dev), load_vqgan(TINY_VQGAN, None, 0, dev)
    t = teacher.encode_text(["a photo of a dog", "a sketch of a cat", "a house"])
    s = synthesis_settings(iterations=20, cutn=8, image_size=32)
    ref = reference_synthesize(vqgan, teacher, t, [1, 2, 3], s)
    fast = synthesize_batch(vqgan, teacher, t, [1, 2, 3], dataclasses.replace(s, bf16=True, channels_last=True))
    assert np.isfinite(fast.cosines).all()
    assert abs(float(ref.cosines.mean()) - float(fast.cosines.mean())) < 0.05
