"""What both offline worlds (toyworld, emojiworld) share about pinned weights: whether a built world
is up to date, and copying a trained world's weights into a pin. A world's module keeps what differs
(its files, what its record keeps, how it renders and trains)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from pydantic import BaseModel, Field

from dfkd_assets.core.io import sha256_file
from dfkd_assets.ownership import remove_owned

# json_schema_extra of a world setting added after worlds were pinned: at its default it is left out of
# the settings hash, so every pin made before it existed (trained with that same value) still restores
ADDED_AFTER_PINS = {"hash_only_when_changed": True}


def later_field(default, description: str, **constraints):
    """A world setting added after pins exist (see ADDED_AFTER_PINS); its default must be the value
    the pinned worlds were trained with."""
    return Field(default, description=description, json_schema_extra=ADDED_AFTER_PINS, **constraints)


def _drop_later_defaults(cfg: BaseModel, dumped: dict) -> dict:
    for name, info in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        if info.json_schema_extra == ADDED_AFTER_PINS and value == info.default:
            del dumped[name]
        elif isinstance(value, BaseModel):
            _drop_later_defaults(value, dumped[name])
    return dumped


def settings_hash(cfg: BaseModel) -> str:
    """16 hex digits naming a world's settings: the build cache key and the pin's directory name."""
    dumped = _drop_later_defaults(cfg, cfg.model_dump(mode="json"))
    return hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()[:16]


def is_built(out: Path, manifest_name: str, settings_hash: str, pin: Path, train: bool) -> bool:
    """A world of these settings is in `out`, and of the wanted kind: the pinned weights when these
    settings have a pin (`pin` exists; so a machine that once trained its own teacher moves to the
    shared one), trained ones otherwise or with `train`."""
    try:
        manifest = json.loads((Path(out) / manifest_name).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("settings_hash") != settings_hash:
        return False
    return (manifest.get("source") == f"pinned {settings_hash}") == (pin.is_dir() and not train)


def pin_world(out: Path, root: Path, files: tuple[str, ...], manifest_name: str, keep: tuple[str, ...], owner: str) -> Path:
    """The trained `files` of the world in `out` and the `keep` entries of its manifest (plus each
    file's sha256) copied to root/<settings hash>/, replacing an earlier pin of the same settings."""
    manifest = json.loads((Path(out) / manifest_name).read_text())
    dest = Path(root) / manifest["settings_hash"]
    tmp = dest.with_name(dest.name + ".pinning")  # ours by name, under the package's pinned root
    shutil.rmtree(tmp, ignore_errors=True)
    for f in files:
        (tmp / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(out) / f, tmp / f)
    record = {**{k: manifest[k] for k in keep if k in manifest}, "files": {f: sha256_file(tmp / f) for f in files}}
    (tmp / manifest_name).write_text(json.dumps(record, indent=2) + "\n")
    remove_owned(dest, owner, legacy=manifest_name)  # an earlier pin of these settings
    tmp.rename(dest)
    return dest
