import math

import pytest
import torch

from core_settings import distill_settings
from dfkd_assets.core.distill import DistillDiverged, augment_batch, distill, kd_loss
from dfkd_assets.core.student import build_student, load_student
from dfkd_assets.core.teacher import zero_shot_head


def test_kd_loss_hand_computed():
    zs = torch.tensor([[1.0, 0.0]])
    zt = torch.tensor([[0.0, 2.0]])
    t = 2.0
    ps = [math.exp(0.5) / (math.exp(0.5) + 1), 1 / (math.exp(0.5) + 1)]
    pt = [1 / (1 + math.e), math.e / (1 + math.e)]
    expected = t * t * sum(p * math.log(p / q) for p, q in zip(pt, ps))
    assert kd_loss(zs, zt, t).item() == pytest.approx(expected, rel=1e-5)
    assert kd_loss(zt, zt, t).item() == pytest.approx(0.0, abs=1e-6)


@pytest.fixture()
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (24, 32, 32, 3), dtype=torch.uint8, generator=g), torch.arange(24) % 3


def test_kd_augmentations_are_seeded_bounded_and_do_what_they_say(data):
    x = data[0][:8].permute(0, 3, 1, 2).contiguous()
    plain = distill_settings(min_crop_scale=1.0)
    strong = distill_settings(min_crop_scale=0.25, color_jitter=0.4, grayscale_prob=0.5, blur_prob=0.5, noise_std=0.2, mixup_alpha=1.0, cutmix_prob=0.5)
    a = augment_batch(x, 24, strong, torch.Generator().manual_seed(3))
    b = augment_batch(x, 24, strong, torch.Generator().manual_seed(3))
    assert a.shape == (8, 3, 24, 24) and torch.equal(a, b)  # the epoch seed alone decides the batch
    assert a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, augment_batch(x, 24, strong, torch.Generator().manual_seed(4)))
    # the same seed draws the same crops, so each option is compared with crop + flip alone
    p = augment_batch(x, 32, plain, torch.Generator().manual_seed(0))
    gray = augment_batch(x, 32, distill_settings(min_crop_scale=1.0, grayscale_prob=1.0), torch.Generator().manual_seed(0))
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    blur = augment_batch(x, 32, distill_settings(min_crop_scale=1.0, blur_prob=1.0), torch.Generator().manual_seed(0))
    assert blur.diff(dim=-1).abs().mean() < 0.5 * p.diff(dim=-1).abs().mean()  # noise images: blur removes most edges
    mixed = augment_batch(x, 32, distill_settings(min_crop_scale=1.0, mixup_alpha=1.0), torch.Generator().manual_seed(0))
    assert (mixed - p).abs().mean() > 0.05  # pairs blended (a pair may be an image with itself)


def test_distill_learns_the_teacher_and_resumes(teacher, data, tmp_path, cpu):
    head = zero_shot_head(teacher, ["dog", "cat", "house"], "single")
    images, labels = data
    s = distill_settings(epochs=4, batch_size=8, lr=0.05)
    student = build_student("resnet10t", ["dog", "cat", "house"], 32, 0)
    hist = distill(student, teacher, head, images, labels, s, tmp_path / "ck", "fp")
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]
    assert hist[-1]["kd_loss"] < hist[0]["kd_loss"]

    # resume: a longer run with the same fingerprint continues after epoch 4
    s6 = distill_settings(epochs=6, batch_size=8, lr=0.05)
    resumed = build_student("resnet10t", ["dog", "cat", "house"], 32, 0)
    hist6 = distill(resumed, teacher, head, images, labels, s6, tmp_path / "ck", "fp")
    assert hist6[:4] == hist and len(hist6) == 6
    # another fingerprint starts over
    fresh = distill(build_student("resnet10t", ["dog", "cat", "house"], 32, 0), teacher, head, images, labels, s, tmp_path / "ck", "other")
    assert len(fresh) == 4


def test_nan_stops_with_clear_error_and_keeps_checkpoint(teacher, data, tmp_path):
    head = zero_shot_head(teacher, ["dog", "cat", "house"], "single")
    images, labels = data
    student = build_student("resnet10t", ["dog", "cat", "house"], 32, 0)
    distill(student, teacher, head, images, labels, distill_settings(epochs=1, batch_size=8), tmp_path, "fp")
    before = (tmp_path / "last.pt").read_bytes()
    poisoned = head.clone()
    poisoned[0, 0] = float("nan")  # teacher logits become NaN in the resumed second epoch
    with pytest.raises(DistillDiverged, match="last good checkpoint"):
        distill(student, teacher, poisoned, images, labels, distill_settings(epochs=2, batch_size=8), tmp_path, "fp")
    assert (tmp_path / "last.pt").read_bytes() == before


def test_student_save_load_round_trip(tmp_path):
    s = build_student("resnet10t", ["a", "b"], 32, 0).eval()
    s.save(tmp_path)
    back = load_student(tmp_path)
    x = torch.rand(2, 3, 50, 50)
    torch.testing.assert_close(back(x), s(x))
    assert back.classes == ["a", "b"]


def test_unknown_arch_is_named():
    with pytest.raises(ValueError, match="student.arch"):
        build_student("resnet-does-not-exist", ["a", "b"], 32, 0)


def test_timm_kwargs_build_a_narrower_student_that_its_files_rebuild(tmp_path):
    """student.model_kwargs reach timm (a half-width ResNet has about a quarter of the weights), are
    written to student.json and rebuild the same network through the registry model's loader."""
    from dfkd_assets.registry_model import SPEC, WEIGHTS, build_student as rebuild

    full = build_student("resnet18", ["a", "b"], 32, 0)
    half = build_student("resnet18", ["a", "b"], 32, 0, model_kwargs={"channels": [32, 64, 128, 256]}).eval()
    ratio = sum(p.numel() for p in half.parameters()) / sum(p.numel() for p in full.parameters())
    assert 0.2 < ratio < 0.3
    half.save(tmp_path)
    back = rebuild({SPEC: tmp_path / "student.json", WEIGHTS: tmp_path / "model.safetensors"})
    assert back.model_kwargs == {"channels": [32, 64, 128, 256]}
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(back(x), half(x))
    assert "model_kwargs" not in full.spec()  # a default student's student.json is unchanged
    with pytest.raises(ValueError, match="student.model_kwargs"):
        build_student("resnet18", ["a", "b"], 32, 0, model_kwargs={"chanels": [32, 64, 128, 256]})


def test_without_augmentation_teacher_logits_are_cached_and_equal(teacher, data, tmp_path):
    """augment=False trains on whole images; the cached teacher logits are the ones computed per batch."""
    from dfkd_assets.core.distill import cached_teacher_logits, resize_batch
    from dfkd_assets.core.teacher import teacher_logits

    head = zero_shot_head(teacher, ["dog", "cat", "house"], "single")
    images, labels = data
    x = images.permute(0, 3, 1, 2).contiguous()
    cached = cached_teacher_logits(teacher, head, x, 32, 5, False)
    with torch.no_grad():
        direct = teacher_logits(teacher, head, resize_batch(x[3:9], 32))
    torch.testing.assert_close(cached[3:9], direct, atol=1e-5, rtol=1e-5)
    s = distill_settings(epochs=3, batch_size=8, lr=0.05, augment=False)
    hist = distill(build_student("resnet10t", ["dog", "cat", "house"], 32, 0), teacher, head, images, labels, s, tmp_path / "ck", "fp")
    assert hist[-1]["kd_loss"] < hist[0]["kd_loss"]


def test_zoom_out_shrinks_onto_a_background_and_is_seeded():
    """The image lands inside the frame, smaller; outside it a background unlike the image; same seed, same result."""
    from dfkd_assets.core.distill import zoom_out

    x = torch.zeros(4, 3, 32, 32)
    x[:, 0] = 1.0  # pure red images
    a = zoom_out(x, 1.0, 0.5, torch.Generator().manual_seed(3), "procedural")
    b = zoom_out(x, 1.0, 0.5, torch.Generator().manual_seed(3), "procedural")
    assert torch.equal(a, b)
    red = (a[:, 0] > 0.99) & (a[:, 1] < 0.01) & (a[:, 2] < 0.01)
    frac = red.float().mean((1, 2))
    assert ((frac > 0.2) & (frac < 0.95)).all()  # shrunk to 0.5-1.0 of the side: 25-100 % of the area, minus edges
    assert (a[:, 1:].amax((1, 2, 3)) > 0.05).all()  # the background is not the image's colour
    kept = zoom_out(x, 0.0, 0.5, torch.Generator().manual_seed(3), "procedural")
    assert torch.equal(kept, x)


def test_zoom_out_batch_background_is_another_inputs_texture():
    """zoom_out_background='batch': outside the shrunk image lies a magnified crop of another input
    of the batch (here: each input one flat colour, so the background takes a partner's colour)."""
    from dfkd_assets.core.distill import zoom_out

    colours = torch.eye(3)[torch.tensor([0, 1, 2, 0, 1, 2])]  # red, green, blue, ...
    x = colours[:, :, None, None].expand(6, 3, 32, 32).clone()
    a = zoom_out(x, 1.0, 0.5, torch.Generator().manual_seed(5), "batch")
    assert torch.equal(a, zoom_out(x, 1.0, 0.5, torch.Generator().manual_seed(5), "batch"))
    corner = a[:, :, [0, 0, -1, -1], [0, -1, 0, -1]].mean(-1)  # pixels no shrunk image covers at least partly
    dominant = corner.argmax(1)
    assert (corner.amax(1) > 0.6).all()  # mostly one flat partner colour (plus grain), not a procedural texture
    assert (dominant != colours.argmax(1)).any()  # some backgrounds come from an image of another colour


def test_adversarial_inputs_raise_disagreement_within_the_ball(teacher, data):
    """PGD on the KD loss: the moved inputs stay within adversarial_eps of the inputs and in [0, 1],
    student and teacher disagree more on them than on the inputs, and the random start comes from `gen`."""
    from dfkd_assets.core.distill import adversarial_inputs, resize_batch
    from dfkd_assets.core.teacher import logits_from_features

    head = zero_shot_head(teacher, ["dog", "cat", "house"], "single")
    x = resize_batch(data[0][:8].permute(0, 3, 1, 2), 32)
    student = build_student("resnet10t", ["dog", "cat", "house"], 32, 0).eval()
    s = distill_settings(adversarial_eps=8 / 255, adversarial_steps=3, temperature=1.0)
    xa = adversarial_inputs(student, teacher, head, x, s, torch.Generator().manual_seed(0))
    assert (xa - x).abs().max() <= 8 / 255 + 1e-6 and xa.min() >= 0 and xa.max() <= 1
    assert (xa - x).abs().max() > 4 / 255

    def disagreement(v):
        with torch.no_grad():
            return kd_loss(student(v), logits_from_features(teacher, head, teacher.encode_images(v)), 1.0).item()

    assert disagreement(xa) > 1.05 * disagreement(x)
    assert torch.equal(xa, adversarial_inputs(student, teacher, head, x, s, torch.Generator().manual_seed(0)))


def test_distill_with_adversarial_inputs_learns_and_is_reproducible(teacher, data, tmp_path):
    """The KD loop with adversarial_eps > 0: it still learns the teacher (loss falls), and the ascent's
    random starts come from the epoch seed, so two runs give the same weights."""
    head = zero_shot_head(teacher, ["dog", "cat", "house"], "single")
    images, labels = data
    s = distill_settings(epochs=3, batch_size=8, lr=0.05, adversarial_eps=8 / 255)
    runs = [build_student("resnet10t", ["dog", "cat", "house"], 32, 0) for _ in range(2)]
    hists = [distill(st, teacher, head, images, labels, s, tmp_path / f"ck{i}", "fp") for i, st in enumerate(runs)]
    assert hists[0][-1]["kd_loss"] < hists[0][0]["kd_loss"]
    assert hists[0] == hists[1]
    for a, b in zip(runs[0].state_dict().values(), runs[1].state_dict().values()):
        assert torch.equal(a, b)


def test_feature_distillation_pulls_the_embedding_to_the_teachers(teacher, data, tmp_path):
    """distill.feature_weight > 0: the student's projected features move towards the teacher's image
    embedding of the same images (1 - cosine falls), the logits keep being distilled, and the
    embedding head survives a save/load; a student without that head is refused by name."""
    from dfkd_assets.core.distill import feature_loss, resize_batch
    from dfkd_assets.core.student import load_student

    head = zero_shot_head(teacher, ["dog", "cat", "house"], "single")
    images, labels = data
    x = resize_batch(images.permute(0, 3, 1, 2), 32)
    with torch.no_grad():
        target = teacher.encode_images(x)

    def gap(model):
        with torch.no_grad():
            return float(feature_loss(model.eval().logits_and_embedding(x)[1], target))

    student = build_student("resnet10t", ["dog", "cat", "house"], 32, 0, embed_dim=head.shape[1])
    before = gap(student)
    hist = distill(student, teacher, head, images, labels, distill_settings(epochs=6, batch_size=8, lr=0.05, feature_weight=1.0), tmp_path / "f", "fp")
    assert gap(student) < before - 0.1, (before, gap(student))
    assert all(math.isfinite(h["kd_loss"]) for h in hist)
    student.save(tmp_path / "saved")
    back = load_student(tmp_path / "saved")
    assert back.embed_dim == head.shape[1] and torch.allclose(back.logits_and_embedding(x)[1], student.logits_and_embedding(x)[1], atol=1e-5)
    with pytest.raises(ValueError, match="feature_weight"):
        distill(build_student("resnet10t", ["dog", "cat", "house"], 32, 0), teacher, head, images, labels,
                distill_settings(epochs=1, batch_size=8, feature_weight=1.0), tmp_path / "g", "fp")


def test_images_made_for_no_class_are_distilled_and_left_out_of_cross_entropy(teacher, data, tmp_path):
    """distill.broad_images: class-free images carry the label -1 (stages/training.training_set); KD learns
    the teacher on them like on any input, and the cross-entropy term skips them, even in a batch of only them."""
    import numpy as np

    from dfkd_assets.stages.training import UNLABELLED, training_set

    classes = ["dog", "cat", "house"]
    head = zero_shot_head(teacher, classes, "single")
    images, labels = data
    x, y = training_set([images[labels == k].numpy() for k in range(3)], images[:6].numpy())
    assert len(x) == 30 and (y[24:] == UNLABELLED).all() and sorted(y[:24].tolist()) == sorted(labels.tolist())
    s = distill_settings(epochs=2, batch_size=8, lr=0.05, ce_weight=1.0)
    broad_only = training_set([np.zeros((0, 32, 32, 3), np.uint8)] * 3, images.numpy())
    hist = distill(build_student("resnet10t", classes, 32, 0), teacher, head, *broad_only, s, tmp_path / "broad", "fp")
    assert all(math.isfinite(h["kd_loss"]) for h in hist)
    kd_only = distill(build_student("resnet10t", classes, 32, 0), teacher, head, images, torch.full_like(labels, UNLABELLED), s,
                      tmp_path / "kd", "fp")
    with_ce = distill(build_student("resnet10t", classes, 32, 0), teacher, head, images, labels, s, tmp_path / "ce", "fp")
    assert with_ce[0]["kd_loss"] > kd_only[0]["kd_loss"] + 0.5  # labelled images do add the cross-entropy (about ln 3)


def test_history_names_every_loss_term_and_their_total(teacher, data, tmp_path):
    """kd_losses' named terms each get a per-epoch column (loss_<term>), and kd_loss is their sum."""
    head = zero_shot_head(teacher, ["dog", "cat", "house"], "single")
    images, labels = data
    s = distill_settings(epochs=2, batch_size=8, ce_weight=0.5, feature_weight=1.0)
    student = build_student("resnet10t", ["dog", "cat", "house"], 32, 0, embed_dim=int(head.shape[1]))
    hist = distill(student, teacher, head, images, labels, s, tmp_path / "ck", "fp")
    for h in hist:
        assert {"loss_kd", "loss_feature", "loss_ce", "teacher_agreement", "lr"} <= set(h)
        assert h["kd_loss"] == pytest.approx(h["loss_kd"] + h["loss_feature"] + h["loss_ce"], rel=1e-5)
        assert h["loss_feature"] > 0 and h["loss_ce"] > 0


def test_view_pool_holds_the_teachers_labels_of_its_own_views_and_trains_reproducibly(teacher, data, tmp_path, cpu):
    """distill.teacher_views: K views per image are augmented and labelled once; the stored features
    are the teacher's on those very (uint8-stored) views; training on the pool learns the teacher,
    is reproducible from its seed, and resumes like the online loop."""
    from dfkd_assets.core.distill import view_pool

    head = zero_shot_head(teacher, ["dog", "cat", "house"], "single")
    images, labels = data
    s = distill_settings(epochs=3, batch_size=8, lr=0.05, teacher_views=3, mixup_alpha=1.0)
    student = build_student("resnet10t", ["dog", "cat", "house"], 32, 0)
    x = images.permute(0, 3, 1, 2).contiguous()
    pool = view_pool(student, teacher, head, x, s)
    assert pool.views.shape == (3, 24, 3, 32, 32) and pool.features.shape[:2] == (3, 24)
    assert not torch.equal(pool.views[0], pool.views[1])  # different augmentations per view
    with torch.no_grad():
        again = teacher.encode_images(pool.views[1].float() / 255)
    cos = torch.nn.functional.cosine_similarity(again, pool.features[1], dim=-1)
    assert cos.min() > 0.98  # the label belongs to its view (uint8 storage moves it by < 1/510 per pixel)
    wrong = torch.nn.functional.cosine_similarity(again, pool.features[1].roll(1, 0), dim=-1)
    assert wrong.mean() < cos.mean()

    hist = distill(student, teacher, head, images, labels, s, tmp_path / "a", "fp")
    assert hist[-1]["kd_loss"] < hist[0]["kd_loss"]
    twin = build_student("resnet10t", ["dog", "cat", "house"], 32, 0)
    assert distill(twin, teacher, head, images, labels, s, tmp_path / "b", "fp") == hist
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), twin.state_dict().values()))
    online = build_student("resnet10t", ["dog", "cat", "house"], 32, 0)
    online_hist = distill(online, teacher, head, images, labels, distill_settings(epochs=3, batch_size=8, lr=0.05, mixup_alpha=1.0),
                          tmp_path / "c", "fp")
    assert online_hist != hist  # the pool is a different input stream from the online loop's


def test_view_pool_refuses_inputs_that_cannot_be_labelled_in_advance(tmp_path):
    from dfkd_assets.config import ConfigError, load_config

    cfg = tmp_path / "s.yaml"
    cfg.write_text("classes: [a, b]\ngenerator: {config_file: x.yaml}\ndistill: {teacher_views: 4, adversarial_eps: 0.03}\n")
    with pytest.raises(ConfigError, match="teacher_views"):
        load_config(cfg)
