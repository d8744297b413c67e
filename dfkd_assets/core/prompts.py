"""The prompt bank and the three prompt-diversification methods (docs/ALGORITHM.md §2).

Style lives in the prompt: `a X style of a {class}`, where the token X is a placeholder whose
*token embedding* is replaced by a style vector v before the text transformer runs (textual
inversion / PromptStyler style). The methods differ only in how the v's are chosen:
  vanilla      `a photo of a {class}`, no style slot (baseline)
  mix          convex mixtures of dictionary words' embeddings (Dirichlet weights)
  random       Gaussian draws with the token table's per-dimension statistics
  contrastive  learned one after another with InfoNCE: close to the class, far from earlier styles
Reconstructed (the paper's full text was unavailable): the template wording, the dictionary,
k=2 words, alpha=1, the number of styles, the InfoNCE positives/negatives, Adam lr 0.01, 100
steps, tau 0.1 and the optional orthogonality term; each is a config value (`prompts.*`).

Per (style, class) the bank holds the readable prompt and its text feature (the synthesis
target); per style the style vector and diagnostics. It remembers which teacher produced its
features and refuses to be used with another one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save

from dfkd_assets.core.io import atomic_write_bytes, atomic_write_json
from dfkd_assets.core.teacher import PromptTooLong, Teacher, check_prompts_fit

BANK_TENSORS = "bank.safetensors"
BANK_META = "bank.json"


class PromptBankMismatch(RuntimeError):
    pass


@dataclass
class PromptBank:
    method: str
    classes: list[str]
    styles: list[str]  # readable style names, one per style id
    prompts: list[list[str]]  # [style][class]
    features: torch.Tensor  # [S, K, D] normalised text features
    teacher_id: str
    style_vectors: torch.Tensor | None = None  # [S, W] token-embedding-space style vectors
    diagnostics: dict | None = None  # see bank_diagnostics

    @property
    def num_styles(self) -> int:
        return len(self.styles)

    def check_teacher(self, teacher_id: str) -> None:
        if teacher_id != self.teacher_id:
            raise PromptBankMismatch(
                f"prompt bank was built with teacher {self.teacher_id!r} but the current teacher is {teacher_id!r}: "
                "re-materialize prompt_bank"
            )

    def class_index(self, class_name: str) -> int:
        try:
            return self.classes.index(class_name)
        except ValueError:
            raise PromptBankMismatch(f"class {class_name!r} is not in the prompt bank {self.classes}: re-materialize prompt_bank") from None

    def assignments(self, count: int) -> list[int]:
        """Style id of each of `count` images of a class: spread evenly (round-robin) over the styles
        (the same spread for every class)."""
        return [i % self.num_styles for i in range(count)]

    def save(self, directory: Path) -> None:
        tensors = {"features": self.features.contiguous().cpu()}
        if self.style_vectors is not None:
            tensors["style_vectors"] = self.style_vectors.contiguous().cpu()
        atomic_write_bytes(Path(directory) / BANK_TENSORS, save(tensors))
        atomic_write_json(
            Path(directory) / BANK_META,
            {
                "method": self.method, "classes": self.classes, "styles": self.styles, "prompts": self.prompts,
                "teacher_id": self.teacher_id, "diagnostics": self.diagnostics,
            },
        )

    @classmethod
    def load(cls, directory: Path) -> "PromptBank":
        directory = Path(directory)
        if not (directory / BANK_META).is_file() or not (directory / BANK_TENSORS).is_file():
            raise FileNotFoundError(f"prompt bank not found in {directory}: materialize prompt_bank first")
        meta = json.loads((directory / BANK_META).read_text())
        t = load_file(directory / BANK_TENSORS)
        return cls(
            method=meta["method"], classes=meta["classes"], styles=meta["styles"], prompts=meta["prompts"],
            features=t["features"], teacher_id=meta["teacher_id"], style_vectors=t.get("style_vectors"),
            diagnostics=meta.get("diagnostics"),
        )


PLACEHOLDER = "*"  # one BPE token in CLIP's vocabulary; its embedding is replaced by a style vector


class PromptError(ValueError):
    pass


# ---------------------------------------------------------------- style token substitution


def _text_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The module that owns `token_embedding`: the CLIP model itself, or `.text` of a CustomTextCLIP."""
    for cand in (model, getattr(model, "text", None)):
        if cand is not None and isinstance(getattr(cand, "token_embedding", None), torch.nn.Embedding):
            return cand
    raise PromptError(
        "style prompts need an open_clip text tower with a token embedding table "
        "(Hugging Face text towers are not supported): choose another teacher.model_name or prompts.method: vanilla"
    )


def token_table(teacher: Teacher) -> torch.Tensor:
    return _text_tower(teacher.model).token_embedding.weight.detach()


def word_embedding(teacher: Teacher, words: str) -> torch.Tensor:
    """e(w): mean token embedding of the BPE tokens of `words`."""
    ids = teacher.tokenizer.encode(words)
    if not ids:
        raise PromptError(f"style word {words!r} has no tokens")
    return token_table(teacher)[torch.tensor(ids, device=teacher.device)].mean(0)


def tokenize_checked(teacher: Teacher, texts: Sequence[str]) -> torch.Tensor:
    """Tokenize, refusing prompts longer than the context instead of letting the tokenizer cut them."""
    try:
        return teacher.tokenize(texts)
    except PromptTooLong as e:
        raise PromptError(f"{e}: shorten the class name") from None


def encode_styled(teacher: Teacher, texts: Sequence[str], vectors: torch.Tensor) -> torch.Tensor:
    """Normalised text features of `texts`, each containing PLACEHOLDER once, with that token's
    embedding replaced by the matching row of `vectors` [N, W]. Differentiable w.r.t. `vectors`.

    The substitution is a forward hook on the tower's own `token_embedding`, so positional
    embeddings, attention masks and EOT pooling are exactly the tower's own code paths.
    """
    tokens = tokenize_checked(teacher, texts)
    ph = teacher.tokenizer.encode(PLACEHOLDER)
    assert len(ph) == 1, "placeholder must be a single token"
    hits = tokens == ph[0]
    counts = hits.sum(1)
    if (counts != 1).any():
        bad = [t for t, c in zip(texts, counts.tolist()) if c != 1]
        raise PromptError(f"each style prompt needs exactly one {PLACEHOLDER!r} token; got {bad[:3]} (class names must not contain it)")
    rows, cols = hits.nonzero(as_tuple=True)
    vec = vectors.to(teacher.device)

    def hook(module, inputs, output):
        return output.index_put((rows, cols), vec[rows].to(output.dtype))

    handle = _text_tower(teacher.model).token_embedding.register_forward_hook(hook)
    try:
        return F.normalize(teacher.model.encode_text(tokens).float(), dim=-1)
    finally:
        handle.remove()


# ---------------------------------------------------------------- the four methods


@dataclass(frozen=True)
class StyleSettings:
    """Style-diversification settings; filled from `prompts.*` by dfkd_assets/loaders.py, where
    each value has its one default (docs/ALGORITHM.md §2)."""

    num_styles: int
    style_template: str
    positive_template: str
    style_words: tuple[str, ...]
    mix_words: int
    mix_alpha: float
    steps: int
    lr: float
    temperature: float
    orthogonality_weight: float
    seed: int


def style_prompt(template: str, class_name: str, style: str = PLACEHOLDER) -> str:
    return template.replace("{style}", style).format(class_name)


def _styled_bank(teacher: Teacher, classes: list[str], st: StyleSettings, vectors: torch.Tensor, names: list[str], method: str) -> PromptBank:
    feats = []
    with torch.no_grad():
        for v in vectors:
            texts = [style_prompt(st.style_template, c) for c in classes]
            feats.append(encode_styled(teacher, texts, v.expand(len(classes), -1)).cpu())
    prompts = [[style_prompt(st.style_template, c, name) for c in classes] for name in names]
    return PromptBank(method, list(classes), names, prompts, torch.stack(feats), teacher.teacher_id, vectors.detach().cpu())


def vanilla_bank(teacher: Teacher, classes: list[str], template: str) -> PromptBank:
    prompts = [template.format(c) for c in classes]
    tokenize_checked(teacher, prompts)
    return PromptBank(
        method="vanilla", classes=list(classes), styles=["vanilla"], prompts=[prompts],
        features=teacher.encode_text(prompts)[None].cpu(), teacher_id=teacher.teacher_id,
    )


def mix_vectors(teacher: Teacher, st: StyleSettings) -> tuple[torch.Tensor, list[str]]:
    """Mix-Prompt: v = sum_i lambda_i e(w_i), k distinct dictionary words, lambda ~ Dirichlet(alpha)."""
    words = list(st.style_words)
    if len(words) < st.mix_words:
        raise PromptError(f"prompts.mix_words={st.mix_words} but the style dictionary has only {len(words)} entries")
    table = torch.stack([word_embedding(teacher, w) for w in words])
    vecs, names = [], []
    with torch.random.fork_rng(devices=[]):  # Dirichlet has no generator argument: seed a private CPU stream
        torch.manual_seed(st.seed)
        dirichlet = torch.distributions.Dirichlet(torch.full((st.mix_words,), float(st.mix_alpha)))
        for _ in range(st.num_styles):
            pick = torch.randperm(len(words))[: st.mix_words]
            lam = dirichlet.sample()
            vecs.append((lam.to(table.device)[:, None] * table[pick.to(table.device)]).sum(0))
            names.append("[" + " + ".join(f"{w:.2f} {words[i]}" for w, i in zip(lam.tolist(), pick.tolist())) + "]")
    return torch.stack(vecs), names


def random_vectors(teacher: Teacher, n: int, gen: torch.Generator) -> torch.Tensor:
    """Random-Prompt: v ~ N(mu, diag(sigma^2)) with the token table's per-dimension mean/std."""
    table = token_table(teacher).float()
    mu, sigma = table.mean(0), table.std(0)
    z = torch.randn(n, table.shape[1], generator=gen).to(table.device)
    return mu + sigma * z


def contrastive_vectors(teacher: Teacher, classes: list[str], st: StyleSettings, on_step=None) -> tuple[torch.Tensor, list[list[float]]]:
    """Contrastive-Prompt: learn styles one after another with InfoNCE (temperature tau).

    For style j and class k: anchor u_jk = g("a v_j style of a c_k"), positive g_k = g("a c_k"),
    negatives the other classes' g_c and the detached anchors u_ik of earlier styles i < j.
    Only v_j is optimised (Adam), initialised as in Random-Prompt. Optional: PromptStyler's
    orthogonality of style-only features g("a v_j style of a") to earlier ones (weight 0 default).
    Returns the vectors [P, W] and the loss curve of every style.
    """
    gen = torch.Generator().manual_seed(st.seed)
    k = len(classes)
    with torch.no_grad():
        positives = F.normalize(teacher.model.encode_text(tokenize_checked(teacher, [st.positive_template.format(c) for c in classes])).float(), dim=-1)
    texts = [style_prompt(st.style_template, c) for c in classes]
    style_only = [st.style_template.replace("{style}", PLACEHOLDER).replace("{}", "").strip()]
    memory: list[torch.Tensor] = []  # [K, D] anchors of earlier styles
    style_feats: list[torch.Tensor] = []
    vectors, curves = [], []
    labels = torch.arange(k, device=teacher.device)
    for j in range(st.num_styles):
        v = random_vectors(teacher, 1, gen)[0].clone().requires_grad_(True)
        opt = torch.optim.Adam([v], lr=st.lr)
        curve = []
        for _ in range(st.steps):
            u = encode_styled(teacher, texts, v.expand(k, -1))  # K, D
            logits = u @ positives.t()  # positive on the diagonal, other classes off it
            if memory:
                mem = torch.stack(memory, 1)  # K, j, D
                logits = torch.cat([logits, torch.einsum("kd,kjd->kj", u, mem)], 1)
            loss = F.cross_entropy(logits / st.temperature, labels)
            if st.orthogonality_weight > 0 and style_feats:
                s = encode_styled(teacher, style_only, v[None])[0]
                loss = loss + st.orthogonality_weight * (torch.stack(style_feats) @ s).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            curve.append(loss.detach())
        with torch.no_grad():
            memory.append(encode_styled(teacher, texts, v.detach().expand(k, -1)))
            if st.orthogonality_weight > 0:
                style_feats.append(encode_styled(teacher, style_only, v.detach()[None])[0])
        vectors.append(v.detach())
        curves.append(torch.stack(curve).cpu().tolist())
        if on_step is not None:
            on_step(j + 1, curves[-1][-1])
    return torch.stack(vectors), curves


def check_bank_prompts_fit(teacher: Teacher, classes: Sequence[str], method: str, st: StyleSettings, vanilla_template: str) -> None:
    """Every class's prompts of `method` fit the text context; else an error naming the class and template setting."""
    if method == "vanilla":
        templates = [("prompts.vanilla_template", vanilla_template)]
    else:
        templates = [("prompts.style_template", st.style_template.replace("{style}", PLACEHOLDER))]
        if method == "contrastive":
            templates.append(("prompts.positive_template", st.positive_template))
    for c in classes:
        for setting, template in templates:
            check_prompts_fit(teacher, c, [template.format(c)], setting)


def build_bank(teacher: Teacher, classes: list[str], method: str, st: StyleSettings, vanilla_template: str,
               on_style=None) -> tuple[PromptBank, list[list[float]]]:
    """The bank of `method` (vanilla | mix | random | contrastive) and, for contrastive, its loss curves."""
    check_bank_prompts_fit(teacher, classes, method, st, vanilla_template)
    if method == "vanilla":
        return vanilla_bank(teacher, classes, vanilla_template), []
    if method == "mix":
        vecs, names = mix_vectors(teacher, st)
        return _styled_bank(teacher, classes, st, vecs, names, method), []
    names = [f"<S_{j}>" for j in range(st.num_styles)]
    if method == "random":
        vecs = random_vectors(teacher, st.num_styles, torch.Generator().manual_seed(st.seed))
        return _styled_bank(teacher, classes, st, vecs, names, method), []
    if method == "contrastive":
        vecs, curves = contrastive_vectors(teacher, classes, st, on_step=on_style)
        return _styled_bank(teacher, classes, st, vecs, names, method), curves
    raise PromptError(f"prompts.method {method!r} is not one of vanilla, mix, random, contrastive")


def bank_diagnostics(bank: PromptBank, head: torch.Tensor) -> dict:
    """How diverse the bank is, and whether its styles keep their class.

    mean_pairwise_cosine: mean cosine between features of different styles of the same class
    (lower = more diverse; 1.0 for a single style). class_preserved: fraction of (style, class)
    features whose top-1 under the zero-shot head is their own class. Per style: the same two
    numbers restricted to that style.
    """
    feats = bank.features.float()  # S,K,D
    s, k, _ = feats.shape
    top1 = (feats @ head.float().cpu().t()).argmax(-1)  # S,K
    correct = (top1 == torch.arange(k)[None]).float()  # S,K
    if s > 1:
        sims = torch.einsum("skd,tkd->kst", feats, feats)  # K,S,S
        off = ~torch.eye(s, dtype=torch.bool)
        diversity = sims[:, off].mean().item()
        per_style_cos = (sims.sum(-1) - sims.diagonal(dim1=1, dim2=2)).div(s - 1).mean(0)  # S
    else:
        diversity, per_style_cos = 1.0, torch.ones(1)
    per_style = [
        {"style": bank.styles[i], "class_preserved": correct[i].mean().item(), "mean_cosine_to_other_styles": per_style_cos[i].item()}
        for i in range(s)
    ]
    return {
        "method": bank.method, "styles": s, "classes": k, "mean_pairwise_cosine": diversity,
        "class_preserved": correct.mean().item(), "per_style": per_style,
    }
