import json

import pytest
import torch

from conftest import TINY_CLIP
from core_settings import VANILLA, style_settings
from dfkd_assets.core.prompts import (
    PromptBank,
    PromptBankMismatch,
    PromptError,
    bank_diagnostics,
    build_bank,
    encode_styled,
    mix_vectors,
    random_vectors,
    token_table,
    word_embedding,
)
from dfkd_assets.core.teacher import load_teacher, zero_shot_head

CLASSES = ["dog", "elephant", "house", "guitar"]
WORDS = ("photo", "sketch", "painting", "cartoon", "oil painting", "pixel art")


@pytest.fixture(scope="module")
def head(teacher):
    return zero_shot_head(teacher, CLASSES, "simple")


def test_placeholder_with_a_real_word_equals_the_written_prompt(teacher):
    assert len(teacher.tokenizer.encode("sketch")) == 1
    v = word_embedding(teacher, "sketch")
    styled = encode_styled(teacher, ["a * style of a dog", "a * style of a big house"], v.expand(2, -1))
    written = teacher.encode_text(["a sketch style of a dog", "a sketch style of a big house"])
    torch.testing.assert_close(styled, written, atol=1e-5, rtol=1e-5)


def test_substitution_works_for_a_custom_text_tower(tmp_path, cpu):
    cfg = json.loads(TINY_CLIP.read_text())
    cfg["custom_text"] = True
    path = tmp_path / "dfkd-tiny-custom-text.json"
    path.write_text(json.dumps(cfg))
    t = load_teacher("dfkd-tiny-custom-text", None, path, 0, cpu)
    assert hasattr(t.model, "text")
    v = word_embedding(t, "sketch")
    torch.testing.assert_close(encode_styled(t, ["a * style of a dog"], v[None]), t.encode_text(["a sketch style of a dog"]), atol=1e-5, rtol=1e-5)


def test_styled_features_are_differentiable_in_the_style_vector(teacher):
    v = word_embedding(teacher, "photo").clone().requires_grad_(True)
    encode_styled(teacher, ["a * style of a dog"], v[None]).sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0


def test_bad_prompts_are_refused(teacher):
    v = torch.zeros(1, token_table(teacher).shape[1])
    with pytest.raises(PromptError, match="exactly one"):
        encode_styled(teacher, ["a * style of a * star"], v)
    with pytest.raises(PromptError, match="context"):
        encode_styled(teacher, ["a * style of a " + "very " * 80 + "long name"], v)


def test_mix_with_one_word_at_weight_one_is_that_word(teacher):
    vecs, names = mix_vectors(teacher, style_settings(num_styles=3, mix_words=1, style_words=("watercolor",)))
    for v in vecs:
        torch.testing.assert_close(v, word_embedding(teacher, "watercolor"))
    assert names[0] == "[1.00 watercolor]"


def test_mix_weights_are_convex_and_words_distinct(teacher):
    vecs, names = mix_vectors(teacher, style_settings(num_styles=20, mix_words=2, style_words=WORDS, seed=3))
    for n in names:
        parts = n.strip("[]").split(" + ")
        weights = [float(p.split(" ", 1)[0]) for p in parts]
        assert len({p.split(" ", 1)[1] for p in parts}) == 2 and abs(sum(weights) - 1) < 0.011
    again, _ = mix_vectors(teacher, style_settings(num_styles=20, mix_words=2, style_words=WORDS, seed=3))
    torch.testing.assert_close(vecs, again)


def test_random_vectors_match_the_table_statistics(teacher):
    table = token_table(teacher).float()
    v = random_vectors(teacher, 4000, torch.Generator().manual_seed(0))
    mu, sigma = table.mean(0), table.std(0)
    assert ((v.mean(0) - mu).abs() < 4 * sigma / 4000**0.5).float().mean() > 0.99
    torch.testing.assert_close(v.std(0), sigma, rtol=0.08, atol=1e-4)


def test_contrastive_diversifies_keeps_the_class_and_is_deterministic(teacher, head):
    st = style_settings(num_styles=6, steps=50, seed=1)
    bank, curves = build_bank(teacher, CLASSES, "contrastive", st, VANILLA)
    assert len(curves) == 6 and all(len(c) == 50 for c in curves)
    assert all(sum(c[-5:]) < sum(c[:5]) for c in curves), "InfoNCE must decrease for every style"
    random_bank, _ = build_bank(teacher, CLASSES, "random", st, VANILLA)
    d_con, d_rand = bank_diagnostics(bank, head), bank_diagnostics(random_bank, head)
    assert d_con["mean_pairwise_cosine"] < d_rand["mean_pairwise_cosine"] - 0.1
    assert d_con["class_preserved"] >= 0.9
    again, _ = build_bank(teacher, CLASSES, "contrastive", st, VANILLA)
    torch.testing.assert_close(again.style_vectors, bank.style_vectors, rtol=0, atol=0)
    assert bank.prompts[2][1] == "a <S_2> style of a elephant"


def test_vanilla_bank_has_one_style(teacher, head):
    bank, curves = build_bank(teacher, CLASSES, "vanilla", style_settings(), VANILLA)
    assert bank.num_styles == 1 and bank.style_vectors is None and curves == []
    assert bank_diagnostics(bank, head)["mean_pairwise_cosine"] == 1.0
    assert bank.assignments(5) == [0, 0, 0, 0, 0]


def test_bank_round_trip_and_teacher_check(teacher, head, tmp_path, cpu):
    bank, _ = build_bank(teacher, CLASSES, "mix", style_settings(num_styles=3, style_words=WORDS), VANILLA)
    bank.diagnostics = bank_diagnostics(bank, head)
    bank.save(tmp_path)
    back = PromptBank.load(tmp_path)
    torch.testing.assert_close(back.features, bank.features)
    torch.testing.assert_close(back.style_vectors, bank.style_vectors)
    assert (back.prompts, back.styles, back.method, back.diagnostics) == (bank.prompts, bank.styles, "mix", bank.diagnostics)
    assert back.assignments(7) == [0, 1, 2, 0, 1, 2, 0]
    back.check_teacher(teacher.teacher_id)
    other = load_teacher("dfkd-tiny-clip", None, TINY_CLIP, 99, cpu)
    with pytest.raises(PromptBankMismatch, match="re-materialize prompt_bank"):
        back.check_teacher(other.teacher_id)
