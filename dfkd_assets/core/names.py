"""Class names and their keys: the one rule for what a class name may be and the filesystem- and
partition-safe key derived from it. Standard library only: settings validation (config.py), core/
and the orchestration all use it."""

from __future__ import annotations

import hashlib
import re
import unicodedata

KEY_MAX = 64
RESERVED_CLASS_NAMES = ("label", "score")  # the served model's fixed output columns (registry_model.LABEL, SCORE)
_METRIC_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")

# zero-width (non-)joiners glue emoji sequences and Indic scripts; every other control or format
# character (NUL, escapes, bidi overrides that make a name read differently than it is) is refused
_JOINERS = {"\u200c", "\u200d"}


def clean_class_name(name: str) -> str:
    """A class name with its whitespace collapsed; ValueError, naming it, when it is empty or holds a
    control/format character (the rule for `classes` and for classes added by name)."""
    clean = " ".join(name.split())
    if not clean:
        raise ValueError(f"class name {name!r} is empty (or only whitespace): class names must not be empty")
    bad = [ch for ch in clean if unicodedata.category(ch).startswith("C") and ch not in _JOINERS]
    if bad:
        raise ValueError(f"class name {name!r} contains the control/format character U+{ord(bad[0]):04X}")
    return clean


def class_key(name: str) -> str:
    """Filesystem- and partition-safe key of a class name: stays inside the data root whatever the name.

    Lowercase ASCII words joined by '_'; names with no ASCII letters/digits get a hash-based key.
    A key longer than KEY_MAX ends in a hash of the whole key, so two long names that share their
    first 64 characters keep distinct folders and partitions.
    """
    norm = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().lower()
    key = "_".join(re.findall(r"[a-z0-9]+", norm))
    if len(key) > KEY_MAX:
        key = key[: KEY_MAX - 13].rstrip("_") + "_" + hashlib.sha256(key.encode()).hexdigest()[:12]
    if not key:  # CJK, emoji, Greek...: a hash of the name as a person compares it (case, width, spaces)
        folded = " ".join(unicodedata.normalize("NFKC", name).casefold().split())
        key = "c_" + hashlib.sha256(folded.encode()).hexdigest()[:12]
    return key


def metric_key(name: str) -> str:
    """`name` (a domain folder, a class) as part of an MLflow metric key: MLflow accepts letters,
    digits, '_', '-', '.', ' ' and '/'; every other character becomes '_' (a domain folder
    `photos (2019)` is `photos _2019_`), so no folder name can fail a run after its reports are written."""
    return _METRIC_UNSAFE.sub("_", name)
