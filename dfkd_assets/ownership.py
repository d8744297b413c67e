"""Folders the project may delete: only those it can prove it wrote.

A command that replaces a folder it builds (`dfkd toyworld build --out DIR`, the emoji world's
build) writes a marker file naming what it is into the folder it creates, and before deleting
any folder checks that marker. A folder that does not exist or is empty is free to use; any
other folder without the marker is refused, naming it: a mistyped `--out ~` or `--out .` never
deletes a user's files. Standard library only."""

from __future__ import annotations

import json
from pathlib import Path

MARKER = ".dfkd-owned"


class NotOwned(RuntimeError):
    """The folder holds files the project did not write (the message names it)."""


def claim(folder: Path, kind: str) -> Path:
    """Create `folder` (it must be new or empty, or already ours) and mark it as written by `kind`."""
    folder = Path(folder)
    check_owned(folder, kind)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text(json.dumps({"kind": kind}) + "\n")
    return folder


def check_owned(folder: Path, kind: str, legacy: str | None = None) -> None:
    """NotOwned unless `folder` is absent, empty, or carries the marker of `kind` (or, for folders
    written before markers existed, the file `legacy` that only `kind` writes)."""
    folder = Path(folder)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise NotOwned(f"{folder} is not a folder dfkd made (a file or a link): choose a new or empty folder")
    if not folder.exists() or not any(folder.iterdir()):
        return
    try:
        if json.loads((folder / MARKER).read_text()).get("kind") == kind:
            return
    except (OSError, ValueError, AttributeError):
        pass
    if legacy is not None and (folder / legacy).is_file():
        return
    raise NotOwned(f"{folder} holds files dfkd did not write (no {MARKER} marker of a {kind}): it is not replaced. "
                   "Choose a new or empty folder, or remove it yourself")


def remove_owned(folder: Path, kind: str, legacy: str | None = None) -> None:
    """Delete `folder` after check_owned."""
    import shutil

    check_owned(folder, kind, legacy)
    if Path(folder).exists():
        shutil.rmtree(folder)
