"""What decides an asset's content, as short hashes: the synthesis asset records them, the
`stale_partitions` sensor recomputes them to find missing or stale class partitions.

A class shard depends on *its own* targets (its rows of the prompt bank and their style
assignment), not on the whole bank, so adding a class leaves the other shards current whenever
their targets do not change (vanilla, Mix and Random prompts: per-class features). Contrastive
styles are learned against every class, so a new class changes every class's targets there:
that is the method, and those shards are stale by right.
"""

import hashlib
import json

from dfkd_assets.config import DfkdConfig


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prompt_settings_hash(cfg: DfkdConfig) -> str:
    """Everything teacher_head and prompt_bank are built from."""
    return _hash({"classes": cfg.classes, "teacher": cfg.teacher.model_dump(mode="json"), "prompts": cfg.prompts.model_dump(mode="json")})


def class_targets_hash(bank, class_name: str, count: int) -> str:
    """This class's synthesis targets: the assigned styles and their features (rounded, so a
    batch-size-dependent last bit of the text encoder does not count as a change)."""
    import numpy as np

    k = bank.class_index(class_name)
    styles = bank.assignments(class_name, count)
    feats = np.round(bank.features[:, k].float().numpy(), 4)
    h = hashlib.sha256(json.dumps({"styles": styles, "prompts": [bank.prompts[s][k] for s in sorted(set(styles))]}).encode())
    h.update(np.ascontiguousarray(feats[sorted(set(styles))]).tobytes())
    return h.hexdigest()[:16]


def class_fingerprint(cfg: DfkdConfig, targets_hash: str, teacher_id: str, class_name: str) -> str:
    return _hash({
        "synthesis": cfg.synthesis.model_dump(mode="json", exclude={"batch_size", "log_every"}),
        "generator": cfg.generator.model_dump(mode="json"),
        "teacher_id": teacher_id,
        "targets": targets_hash,
        "class": class_name,
    })


def expected_class_fingerprints(cfg: DfkdConfig) -> dict[str, str]:
    """class -> the fingerprint its shard must carry under the current settings and prompt bank."""
    from dfkd_assets.core.prompts import PromptBank

    bank = PromptBank.load(cfg.path("prompt_bank"))
    out = {}
    for c in cfg.classes:
        try:
            out[c] = class_fingerprint(cfg, class_targets_hash(bank, c, cfg.synthesis.images_per_class), bank.teacher_id, c)
        except Exception:  # class not in the bank yet: the bank is rebuilt first
            out[c] = "missing-from-bank"
    return out
