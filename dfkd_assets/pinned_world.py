"""What both offline worlds (toyworld, emojiworld) share about pinned weights: whether a built world
is up to date, and copying a trained world's weights into a pin. A world's module keeps what differs
(its files, what its record keeps, how it renders and trains)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dfkd_assets.core.io import sha256_file
from dfkd_assets.ownership import remove_owned


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
