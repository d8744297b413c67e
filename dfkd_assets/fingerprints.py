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
"""

import hashlib
import json

from dfkd_assets.config import DfkdConfig, SynthesisConfig, scheduling_fields


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prompt_settings_hash(cfg: DfkdConfig) -> str:
    """Everything teacher_head and prompt_bank are built from."""
    return _hash({"classes": cfg.classes, "teacher": cfg.teacher.model_dump(mode="json"), "prompts": cfg.prompts.model_dump(mode="json")})


def class_fingerprint(cfg: DfkdConfig, teacher_id: str, class_name: str) -> str:
    return _hash({
        "synthesis": cfg.synthesis.model_dump(mode="json", exclude=scheduling_fields(SynthesisConfig)),
        "generator": cfg.generator.model_dump(mode="json"),
        "prompts": cfg.prompts.model_dump(mode="json"),
        "teacher_id": teacher_id,
        "class": class_name,
    })


def round_fingerprint(cfg: DfkdConfig, teacher_id: str, class_name: str, round_: int) -> str:
    """Fingerprint of round `round_` of a class (round 0: `class_fingerprint`, as before rounds existed)."""
    if round_ == 0:
        return class_fingerprint(cfg, teacher_id, class_name)
    synthesis = cfg.synthesis.model_dump(mode="json", exclude=scheduling_fields(SynthesisConfig) | {"images_per_class"})
    return _hash({
        "synthesis": synthesis, "generator": cfg.generator.model_dump(mode="json"), "prompts": cfg.prompts.model_dump(mode="json"),
        "teacher_id": teacher_id, "class": class_name, "round": round_,
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


def student_fingerprint(cfg: DfkdConfig, teacher_id: str, data_id: str) -> str:
    """Everything a distillation run depends on: a checkpoint with another fingerprint is not resumed."""
    return _hash({"distill": cfg.distill.model_dump(), "student": cfg.student.model_dump(), "teacher": teacher_id, "data": data_id})
