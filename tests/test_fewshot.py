import numpy as np
import pytest
import torch

from core_settings import fewshot_settings
from dfkd_assets.core.fewshot import copy_of, draw_shots, few_shot_curves, load_backbone_weights, summarize
from dfkd_assets.core.student import build_student


def test_draw_shots_is_k_per_class_disjoint_and_seeded():
    labels = np.repeat(np.arange(3), 6)
    train, test = draw_shots(labels, 2, seed=1, num_classes=3)
    assert np.bincount(labels[train]).tolist() == [2, 2, 2]
    assert set(train).isdisjoint(test) and len(train) + len(test) == len(labels)
    assert np.array_equal(train, draw_shots(labels, 2, 1, 3)[0])
    assert not np.array_equal(train, draw_shots(labels, 2, 2, 3)[0])
    with pytest.raises(ValueError, match="domain 'sketch' has 6 images of class 0; 6 shots need at least 7"):
        draw_shots(labels, 6, 0, 3, "sketch")


def _colour_domain(n_per_class, rng):
    """Two classes any learner separates from a few shots: reddish vs bluish noise images."""
    imgs, labels = [], []
    for c in range(2):
        base = np.array([200, 40, 40] if c == 0 else [40, 40, 200])
        imgs.append(np.clip(base + rng.normal(0, 30, (n_per_class, 16, 16, 3)), 0, 255).astype(np.uint8))
        labels += [c] * n_per_class
    return np.concatenate(imgs), np.array(labels)


def test_fine_tuning_learns_from_few_shots_and_leaves_the_original_untouched(cpu):
    rng = np.random.default_rng(0)
    domains = {"a": _colour_domain(8, rng), "b": _colour_domain(8, rng)}
    distilled = build_student("resnet10t", ["red", "blue"], 16, 0)
    before = {k: v.clone() for k, v in distilled.state_dict().items()}
    s = fewshot_settings(shots=(1, 5), seeds=(0, 1), steps=12, lr=0.05, batch_size=10)
    rows = few_shot_curves({"distilled": copy_of(distilled), "scratch": lambda: build_student("resnet10t", ["red", "blue"], 16, 1)},
                           domains, 2, s, cpu)
    assert len(rows) == 2 * 2 * 2 * 2  # domains x shots x seeds x starts
    assert all(0 <= r["top1"] <= 1 for r in rows)
    summary = summarize(rows)
    assert summary[("scratch", "a", 5)][0] > 0.8  # five shots of an easy task are learned
    assert all(torch.equal(v, before[k]) for k, v in distilled.state_dict().items())


def test_backbone_weights_load_except_the_classifier_and_wrong_arch_is_refused():
    src = build_student("resnet10t", [str(i) for i in range(5)], 32, 3)
    dst = load_backbone_weights(build_student("resnet10t", ["a", "b"], 32, 0), src.backbone.state_dict(), "imagenet.safetensors")
    torch.testing.assert_close(dst.backbone.state_dict()["conv1.0.weight"], src.backbone.state_dict()["conv1.0.weight"])
    other = build_student("resnet18", ["a", "b"], 32, 0).backbone.state_dict()
    with pytest.raises(ValueError, match="fewshot.imagenet_weights imagenet.pth does not fit student.arch resnet10t"):
        load_backbone_weights(build_student("resnet10t", ["a", "b"], 32, 0), other, "imagenet.pth")
