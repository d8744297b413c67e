"""What decides an asset's content, as short hashes: the synthesis asset records them, the
`stale_partitions` sensor recomputes them to find missing or stale class partitions, and
`dfkd compare` keys its resumable work by the same ones.

A class shard's fingerprint covers the settings that make its images (synthesis, generator,
teacher, prompt method and its settings) and its class name, not the list of other classes. So
adding a class synthesizes that class only, for every prompt method. With Contrastive-Prompt the
styles are learned against all classes, so the existing shards keep the styles of the bank they
were made from (each image's prompt is in its manifest); change any prompt setting to rebuild all.

A round r >= 1 of a class (rounds: docs/ARCHITECTURE.md) has a fingerprint of its own: the class's
settings less `synthesis.images_per_class` (the size of round 0), plus the round number. So a
new teacher or other synthesis settings make every round stale, while changing the size of
round 0 or `operations.images_per_round` leaves the rounds that exist as they are.

Input files count by their bytes, never by their paths (issue 37): the generator's config and
checkpoint, the Mix-Prompt style-words file (the packaged one when none is set) and the teacher's
weights, model config or local-dir bundle enter as the sha256 of their content (`file_digest`,
hashed once per file version in a process: core/io.sha256_file_cached). A file replaced in place
makes new fingerprints, so its old shards, resume batches and prompt bank are not reused; the same
bytes under another name or path keep them. A file that is missing enters as `missing:<path>`,
which matches nothing: the run that needs it then fails naming the setting. (An open_clip
pretrained *tag* is a name of published weights and enters as the tag; the loaded weights' sha256
is in `teacher_id`.)
"""

import hashlib
import json
from pathlib import Path

from dfkd_assets.config import DfkdConfig, SynthesisConfig, scheduling_fields

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")  # a `teacher.pretrained` with one of these is a file (core/teacher.py)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path) -> str | None:
    """'sha256:<hex>' of a file's bytes; None for no file; 'missing:<path>' when it cannot be read."""
    if path is None:
        return None
    from dfkd_assets.core.io import sha256_file_cached

    try:
        return "sha256:" + sha256_file_cached(Path(path))
    except OSError:
        return f"missing:{path}"


def style_words_path(cfg: DfkdConfig) -> Path:
    """The Mix-Prompt dictionary in use: prompts.style_words_file, or the packaged one."""
    from importlib.resources import files

    return Path(cfg.prompts.style_words_file or files("dfkd_assets") / "resources" / "style_words.txt")


def generator_inputs(cfg: DfkdConfig) -> dict:
    """generator.* with its files as content digests."""
    g = cfg.generator.model_dump(mode="json")
    return {**g, "config_file": file_digest(cfg.generator.config_file), "checkpoint": file_digest(cfg.generator.checkpoint)}


def prompt_inputs(cfg: DfkdConfig) -> dict:
    """prompts.* with the style-words file as a content digest (it shapes Mix-Prompt banks only)."""
    p = cfg.prompts.model_dump(mode="json")
    return {**p, "style_words_file": file_digest(style_words_path(cfg)) if cfg.prompts.method == "mix" else None}


def teacher_inputs(cfg: DfkdConfig) -> dict:
    """teacher.* with its files as content digests: a weights file, the model config, a local-dir bundle."""
    t = cfg.teacher.model_dump(mode="json")
    out = {**t, "model_config_file": file_digest(cfg.teacher.model_config_file)}
    if cfg.teacher.pretrained and Path(cfg.teacher.pretrained).suffix in WEIGHT_SUFFIXES:
        out["pretrained"] = file_digest(cfg.teacher.pretrained)
    if cfg.teacher.model_name.startswith("local-dir:"):
        bundle = Path(cfg.teacher.model_name.removeprefix("local-dir:"))
        files = sorted(p for p in bundle.iterdir() if p.name == "open_clip_config.json" or p.suffix in WEIGHT_SUFFIXES) if bundle.is_dir() else []
        out["model_name"] = "local-dir:" + _hash({p.name: file_digest(p) for p in files}) if files else f"missing:{bundle}"
    return out


def bank_inputs_hash(cfg: DfkdConfig) -> str:
    """The prompt settings and style-words bytes a prompt bank is made from (recorded beside it; new
    images are refused from a bank whose inputs changed: artifacts.check_prompt_bank_inputs)."""
    return _hash(prompt_inputs(cfg))


def prompt_settings_hash(cfg: DfkdConfig) -> str:
    """Everything teacher_head and prompt_bank are built from (input files by content)."""
    return _hash({"classes": cfg.classes, "teacher": teacher_inputs(cfg), "prompts": prompt_inputs(cfg)})


def class_fingerprint(cfg: DfkdConfig, teacher_id: str, class_name: str) -> str:
    """Fingerprint of a class's round-0 shard (`synthesis.student_weight` left out: round 0 has no student)."""
    return _hash({
        "synthesis": cfg.synthesis.model_dump(mode="json", exclude=scheduling_fields(SynthesisConfig) | {"student_weight"}),
        "generator": generator_inputs(cfg),
        "prompts": prompt_inputs(cfg),
        "teacher_id": teacher_id,
        "class": class_name,
    })


def round_fingerprint(cfg: DfkdConfig, teacher_id: str, class_name: str, round_: int, against: str = "") -> str:
    """Fingerprint of round `round_` of a class (round 0: `class_fingerprint`, as before rounds existed).
    `against`: the id of the student a student-aware round is made against, where the caller keeps one
    round per student (`dfkd compare`); the pipeline makes a round once and records the version instead."""
    if round_ == 0:
        return class_fingerprint(cfg, teacher_id, class_name)
    synthesis = cfg.synthesis.model_dump(mode="json", exclude=scheduling_fields(SynthesisConfig) | {"images_per_class"})
    if not cfg.synthesis.student_weight:  # the paper's synthesis: rounds made before the setting existed keep their fingerprint
        del synthesis["student_weight"]
    return _hash({
        "synthesis": synthesis, "generator": generator_inputs(cfg), "prompts": prompt_inputs(cfg),
        "teacher_id": teacher_id, "class": class_name, "round": round_, **({"against": against} if against else {}),
    })


def expected_class_fingerprints(cfg: DfkdConfig) -> dict[str, str]:
    """class -> the fingerprint its shard must carry under the current settings and prompt bank."""
    from dfkd_assets.artifacts import read_prompt_bank

    teacher_id = read_prompt_bank(cfg).teacher_id
    return {c: class_fingerprint(cfg, teacher_id, c) for c in cfg.classes}


def expected_round_fingerprints(cfg: DfkdConfig, rounds: list[int]) -> dict[tuple[str, int], str]:
    """(class, round) -> the fingerprint that round's shard must carry, for rounds >= 1."""
    from dfkd_assets.artifacts import read_prompt_bank

    teacher_id = read_prompt_bank(cfg).teacher_id
    return {(c, r): round_fingerprint(cfg, teacher_id, c, r) for c in cfg.classes for r in rounds if r > 0}


def array_id(images) -> str:
    """Short hash of an array's bytes (images a distillation trains on that no DVC hash covers)."""
    return hashlib.sha256(images.tobytes()).hexdigest()[:16]


def module_id(module) -> str:
    """Short hash of a network's weights (its state dict's names, shapes, dtypes and bytes)."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def student_fingerprint(cfg: DfkdConfig, teacher_id: str, data_id: str) -> str:
    """Everything a distillation run depends on: a checkpoint with another fingerprint is not resumed."""
    return _hash({"distill": cfg.distill.model_dump(), "student": cfg.student.model_dump(), "teacher": teacher_id, "data": data_id})
