import dataclasses

import numpy as np
import pytest
import torch

from core_settings import synthesis_settings
from dfkd_assets.core.augment import ImageRngs
from dfkd_assets.core.synthesis import (
    clamp_st,
    init_latents,
    render,
    spherical_distance,
    synthesize_batch,
    synthesize_resumable,
)
from dfkd_assets.core.teacher import zero_shot_head
from dfkd_assets.core.vqgan import codebook

FAST = synthesis_settings(iterations=6, cutn=4, image_size=32)


def targets(teacher, n):
    return teacher.encode_text([f"a photo of a thing number {i}" for i in range(n)])


def test_spherical_distance_matches_angle():
    a = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    angle = torch.arccos((a * b).sum(-1).clamp(-1, 1))
    torch.testing.assert_close(spherical_distance(a, b), angle**2 / 2, atol=1e-5, rtol=1e-4)


def test_clamp_st_passes_gradient():
    x = torch.tensor([-0.5, 0.5, 1.5], requires_grad=True)
    y = clamp_st(x)
    assert y.tolist() == [0.0, 0.5, 1.0]
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0]


def test_latents_start_on_codebook_and_gradients_reach_them(vqgan, teacher):
    z = init_latents(vqgan, ImageRngs([0, 1], torch.device("cpu")), 32, 0.0)
    assert z.shape == (2, 16, 8, 8)
    book = codebook(vqgan)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 16)
    assert (flat[:, None, :] == book[None]).all(-1).any(-1).all()  # every position is exactly a code
    z.requires_grad_(True)
    x = render(vqgan, z)
    assert x.shape == (2, 3, 32, 32) and x.min() >= 0 and x.max() <= 1
    (teacher.encode_images(x) * targets(teacher, 2)).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_noise_start_is_each_images_own_colour_field(vqgan):
    """synthesis.noise_start_fraction: an image chosen by its seed starts from the encoding of a
    random colour field drawn from its own stream, the others from random codes exactly as with
    fraction 0; so a batch starts where its images start alone, and a mixed start is, image by
    image, either the all-codes or the all-noise start."""
    from dfkd_assets.core.augment import GRAIN_STD, TEXTURE_STD, procedural_texture
    from dfkd_assets.core.synthesis import starts_from_noise
    from dfkd_assets.core.vqgan import encode

    cpu = torch.device("cpu")
    seeds = list(range(12))
    noise, codes, mixed = (init_latents(vqgan, ImageRngs(seeds, cpu), 32, f) for f in (1.0, 0.0, 0.5))
    assert noise.shape == codes.shape == (12, 16, 8, 8)
    assert torch.equal(noise, torch.cat([init_latents(vqgan, ImageRngs([s], cpu), 32, 1.0) for s in seeds]))
    chosen = [starts_from_noise(s, 0.5) for s in seeds]
    assert 0 < sum(chosen) < len(seeds)  # both starts occur at fraction 0.5
    for i, c in enumerate(chosen):
        assert torch.equal(mixed[i], noise[i] if c else codes[i])
        assert not torch.allclose(noise[i], codes[i])
    assert not any(starts_from_noise(s, 0.0) for s in seeds) and all(starts_from_noise(s, 1.0) for s in seeds)
    g = torch.Generator().manual_seed(0)  # image 0's field by hand, drawn as init_latents draws it
    field = procedural_texture(torch.rand(1, 3, 1, 1, generator=g), torch.randn(1, 3, 4, 4, generator=g) * TEXTURE_STD,
                               torch.randn(1, 3, 32, 32, generator=g) * GRAIN_STD)
    with torch.no_grad():
        assert torch.equal(noise[:1], encode(vqgan, field * 2 - 1))


def test_image_size_must_fit_the_generator(vqgan):
    with pytest.raises(ValueError, match="synthesis.image_size"):
        init_latents(vqgan, ImageRngs([0], torch.device("cpu")), 30, 0.0)


def test_loss_decreases(vqgan, teacher):
    res = synthesize_batch(vqgan, teacher, targets(teacher, 2), [5, 6], synthesis_settings(iterations=40, cutn=8, image_size=32))
    assert np.mean(res.losses[-8:]) < np.mean(res.losses[:8])
    assert res.images.dtype == np.uint8 and res.images.shape == (2, 32, 32, 3)



def test_bf16_autocast_on_cpu_keeps_the_quality_of_fp32(vqgan, teacher):
    """precision: bf16 on a CPU changes the decoder's and encoder's arithmetic, not the outcome."""
    t, seeds = targets(teacher, 8), list(range(8))
    s = synthesis_settings(iterations=20, cutn=8, image_size=32)
    fp32 = synthesize_batch(vqgan, teacher, t, seeds, s)
    bf16 = synthesize_batch(vqgan, teacher, t, seeds, dataclasses.replace(s, bf16=True))
    assert np.isfinite(bf16.cosines).all() and np.mean(bf16.losses[-4:]) < np.mean(bf16.losses[:4])
    sem = fp32.cosines.std() / np.sqrt(len(seeds))
    assert abs(float(bf16.cosines.mean() - fp32.cosines.mean())) < sem  # within the noise between images
    assert not np.array_equal(bf16.images, fp32.images)  # bf16 was really used

def test_batch_equals_single_image_trajectories(vqgan, teacher):
    t = targets(teacher, 3)
    batch = synthesize_batch(vqgan, teacher, t, [11, 12, 13], FAST)
    single = synthesize_batch(vqgan, teacher, t[1:2], [12], FAST)
    assert np.abs(batch.images[1].astype(int) - single.images[0]).max() <= 1
    assert abs(batch.cosines[1] - single.cosines[0]) < 1e-3
    assert not np.array_equal(batch.images[0], batch.images[1])


def test_same_seed_same_image(vqgan, teacher):
    t = targets(teacher, 1)
    a = synthesize_batch(vqgan, teacher, t, [3], FAST)
    b = synthesize_batch(vqgan, teacher, t, [3], FAST)
    np.testing.assert_array_equal(a.images, b.images)


def test_resume_recomputes_only_missing_batches(vqgan, teacher, tmp_path):
    head = zero_shot_head(teacher, ["a", "b"], "single")
    t = targets(teacher, 5)
    seeds = [1, 2, 3, 4, 5]
    full = synthesize_resumable(vqgan, teacher, head, t, seeds, FAST, 2, tmp_path / "w", "fp1")
    batches = sorted((tmp_path / "w").glob("batch_*.npz"))
    assert len(batches) == 3
    batches[1].unlink()  # as if killed while computing the second batch
    mtimes = {p.name: p.stat().st_mtime_ns for p in batches if p.exists()}
    calls = []
    again = synthesize_resumable(vqgan, teacher, head, t, seeds, FAST, 2, tmp_path / "w", "fp1", on_step=lambda m, loss: calls.append(m))
    for a, b in zip(full[:4], again[:4]):  # images, cosines, preds, seeds
        np.testing.assert_array_equal(a, b)
    assert (full.resumed, again.resumed) == (0, 3)  # kept: the batches of images 0-1 and 4
    assert {p.name: p.stat().st_mtime_ns for p in batches if p.name in mtimes} == mtimes  # kept, not recomputed
    assert sum(calls) == 5 * FAST.iterations
    synthesize_resumable(vqgan, teacher, head, t[:1], seeds[:1], FAST, 2, tmp_path / "w", "fp2")
    assert len(list((tmp_path / "w").glob("batch_*.npz"))) == 1  # other settings: stale batches dropped


def test_a_corrupt_resume_batch_is_made_again_not_failed_on_forever(vqgan, teacher, tmp_path):
    """A finished batch that cannot be read (truncated, not a zip) is deleted with a warning and
    synthesized again: the class's images equal an uninterrupted run's, and a re-run succeeds."""
    head = zero_shot_head(teacher, ["a", "b"], "single")
    t = targets(teacher, 4)
    seeds = [1, 2, 3, 4]
    full = synthesize_resumable(vqgan, teacher, head, t, seeds, FAST, 2, tmp_path / "w", "fp1")
    second = sorted((tmp_path / "w").glob("batch_*.npz"))[1]
    second.write_bytes(second.read_bytes()[:100])  # torn
    with pytest.warns(UserWarning, match="cannot be read"):
        again = synthesize_resumable(vqgan, teacher, head, t, seeds, FAST, 2, tmp_path / "w", "fp1")
    for a, b in zip(full[:4], again[:4]):
        np.testing.assert_array_equal(a, b)
    assert again.resumed == 2
    assert synthesize_resumable(vqgan, teacher, head, t, seeds, FAST, 2, tmp_path / "w", "fp1").resumed == 4


@pytest.mark.parametrize("lr_schedule", ["constant", "cosine"])
def test_engine_equals_reference_loop_at_batch_one(vqgan, teacher, lr_schedule):
    """The engine changes scheduling only: at batch 1 it makes the reference loop's image.

    Equal to float rounding, not always bit for bit: the reference cuts each view in its own
    branch, so autograd sums the views' gradients into the image in its own order, while the
    engine sums one batched op's; the last bit of a gradient can differ, and then, rarely, one
    pixel rounds to the next uint8 level (seen on one machine: 1 pixel of 3072, by 1).
    """
    from dfkd_assets.core.reference_synthesis import reference_synthesize_one

    t = targets(teacher, 2)
    s = synthesis_settings(iterations=10, cutn=6, image_size=32, lr_schedule=lr_schedule)
    images = []
    for i, seed in enumerate([21, 22]):
        ref_image, ref_cos, ref_losses = reference_synthesize_one(vqgan, teacher, t[i], seed, s)
        eng = synthesize_batch(vqgan, teacher, t[i : i + 1], [seed], s)
        diff = np.abs(eng.images[0].astype(int) - ref_image)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.005, (diff.max(), (diff > 0).sum())
        np.testing.assert_allclose(eng.losses, ref_losses, rtol=1e-5, atol=0)  # the same trajectory, step by step
        assert abs(eng.cosines[0] - ref_cos) < 1e-4
        images.append(ref_image)
    assert np.abs(images[0].astype(int) - images[1]).mean() > 5  # different seeds, different images


def test_compiled_step_is_one_graph_and_keeps_the_image(vqgan, teacher, tmp_path, monkeypatch):
    """synthesis.compile compiles the whole step (decoder, cutouts, augmentation, image tower, loss)
    as one graph, so no host work sits inside it, and it is a scheduling choice: the same seeds
    give the same image as the eager engine, to float rounding."""
    from dfkd_assets.core.synthesis import compiled_step_loss, draw_step, step_loss

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # a cold, private cache
    t = targets(teacher, 2)
    z = init_latents(vqgan, ImageRngs([3, 4], torch.device("cpu")), 32, 0.0).requires_grad_(True)
    draws = draw_step(ImageRngs([3, 4], torch.device("cpu")), FAST, teacher.image_size, torch.device("cpu"))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(step_loss)(vqgan, teacher, z, draws, t, FAST)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    try:
        plain = synthesize_batch(vqgan, teacher, t, [3, 4], FAST)
        compiled = synthesize_batch(vqgan, teacher, t, [3, 4], synthesis_settings(iterations=6, cutn=4, image_size=32, compile=True))
        assert compiled_step_loss.cache_info().currsize >= 1  # the compiled step was the one used
    finally:
        torch._dynamo.reset()
    assert np.abs(plain.images.astype(int) - compiled.images).max() <= 2
    np.testing.assert_allclose(compiled.cosines, plain.cosines, atol=1e-3)


def test_channels_last_engine_keeps_the_image(tmp_path):
    """NHWC layout is a scheduling choice: same latents, same image (to float rounding)."""
    from conftest import TINY_CLIP, TINY_VQGAN
    from dfkd_assets.core.teacher import load_teacher
    from dfkd_assets.core.vqgan import load_vqgan

    cpu = torch.device("cpu")
    teacher, vqgan = load_teacher("dfkd-tiny-clip", None, TINY_CLIP, 0, cpu), load_vqgan(TINY_VQGAN, None, 0, cpu)
    t = targets(teacher, 2)
    plain = synthesize_batch(vqgan, teacher, t, [3, 4], FAST)
    nhwc = synthesize_batch(vqgan, teacher, t, [3, 4], synthesis_settings(iterations=6, cutn=4, image_size=32, channels_last=True))
    assert vqgan.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not vqgan.decoder.conv_in.weight.is_contiguous()
    assert np.abs(plain.images.astype(int) - nhwc.images).max() <= 2


def test_cosine_lr_schedule_decays_the_step_to_zero_and_changes_the_image(vqgan, teacher):
    """synthesis.lr_schedule: cosine gives the latents large early steps and near-zero late ones:
    the last step moves them far less than under the constant rate, so the image differs."""
    from dfkd_assets.core.augment import ImageRngs
    from dfkd_assets.core.synthesis import LatentOptimizer, draw_step, step_loss

    t = targets(teacher, 1)

    def last_move(schedule):
        s = synthesis_settings(iterations=8, cutn=4, image_size=32, lr_schedule=schedule)
        rngs = ImageRngs([3], torch.device("cpu"))
        lat = LatentOptimizer.start(vqgan, rngs, s)
        for _ in range(s.iterations):
            before = lat.z.detach().clone()
            lat.step(step_loss(vqgan, teacher, lat.z, draw_step(rngs, s, teacher.image_size, lat.z.device), t, s).sum())
        return (lat.z.detach() - before).abs().max().item(), lat.opt.param_groups[0]["lr"]

    (move_c, lr_c), (move_k, lr_k) = last_move("constant"), last_move("cosine")
    assert lr_c == pytest.approx(0.1) and lr_k == pytest.approx(0.0, abs=1e-9)
    assert move_k < 0.2 * move_c
    a = synthesize_batch(vqgan, teacher, t, [3], synthesis_settings(iterations=8, cutn=4, image_size=32))
    b = synthesize_batch(vqgan, teacher, t, [3], synthesis_settings(iterations=8, cutn=4, image_size=32, lr_schedule="cosine"))
    assert np.abs(a.images.astype(int) - b.images).mean() > 0.5


def test_random_code_images_are_seeded_codebook_grids_at_several_cell_sizes(vqgan):
    """distill.broad_images: each image is its own seed's grid of random codes, in cells of 1, 2 or 4
    positions, decoded without guidance; the same seeds give the same images in any batching."""
    from dfkd_assets.core.synthesis import CODE_CELLS, random_code_grid, random_code_images

    book = codebook(vqgan)
    cells = set()
    for seed in range(30):
        z = random_code_grid(book, seed, 8)
        assert z.shape == (16, 8, 8)
        flat = z.permute(1, 2, 0).reshape(-1, 16)
        assert (flat[:, None, :] == book[None]).all(-1).any(-1).all()  # every position is a code
        # the largest cell whose blocks are constant is the image's cell size
        cells.add(max(c for c in CODE_CELLS if torch.equal(z, z[:, ::c, ::c].repeat_interleave(c, 1).repeat_interleave(c, 2))))
        assert torch.equal(z, random_code_grid(book, seed, 8))
    assert cells == set(CODE_CELLS)
    images = random_code_images(vqgan, list(range(6)), 32, batch_size=4)
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
    again = np.concatenate([random_code_images(vqgan, [s], 32) for s in range(6)])
    assert np.abs(images.astype(int) - again).max() <= 1  # batching does not change an image
    assert len({im.tobytes() for im in images}) == 6
    with pytest.raises(ValueError, match="synthesis.image_size"):
        random_code_images(vqgan, [0], 30)


def test_student_aware_synthesis_finds_images_the_student_gets_wrong(vqgan, teacher):
    """synthesis.student_weight with a Competition: the images move towards teacher-student
    disagreement (their Jensen-Shannon divergence rises over the same seeds' plain images), the
    student itself is not touched, and weight 0 gives the plain images exactly."""
    from dfkd_assets.core.student import build_student
    from dfkd_assets.core.synthesis import Competition, disagreement, frozen_student, student_disagreement

    classes = ["dog", "elephant", "house"]
    head = zero_shot_head(teacher, classes, "simple")
    student = build_student("resnet10t", classes, 32, 0, None, {})
    before = {k: v.clone() for k, v in student.state_dict().items()}
    comp = Competition(frozen_student(student), head, 4.0)
    t, seeds = head[[0, 1, 2, 0, 1, 2]], list(range(6))
    s = synthesis_settings(iterations=12, cutn=4, image_size=32, lr=0.2)

    def js(images) -> float:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            return float(student_disagreement(x, teacher, comp).mean())

    plain = synthesize_batch(vqgan, teacher, t, seeds, s, competition=comp)  # weight 0: the competition is ignored
    np.testing.assert_array_equal(plain.images, synthesize_batch(vqgan, teacher, t, seeds, s).images)
    aware = synthesize_batch(vqgan, teacher, t, seeds, dataclasses.replace(s, student_weight=5.0), competition=comp)
    assert js(aware.images) > 1.5 * js(plain.images)
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
    # the divergence itself: 0 for equal distributions, ln 2 at most, symmetric
    a, b = torch.tensor([[9.0, 0, 0]]), torch.tensor([[0.0, 9, 0]])
    assert float(disagreement(a, a, 1.0)) == pytest.approx(0, abs=1e-6)
    assert float(disagreement(a, b, 1.0)) == pytest.approx(float(disagreement(b, a, 1.0))) and float(disagreement(a, b, 1.0)) <= np.log(2)
