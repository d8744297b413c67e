"""The emoji artwork world 2 is made of: three npm packages, fetched at build/install time with npm's
own client (`npm pack NAME@VERSION`), each tarball checked against the sha256 recorded here before a
single file of it is read. Nothing is fetched at run time: a build finds the tarballs in the cache
folder (filled by `make install` or `dfkd emojiworld fetch`) and only runs npm when one is missing.

Licences (cited in every world's manifest and in docs/experiments/2026-12-07-emoji-world.md):
  emoji-datasource-google   Noto Emoji artwork, Apache License 2.0 (Google); the package's data MIT (iamcal)
  emoji-datasource-twitter  Twemoji artwork, CC-BY 4.0 (Twitter, Inc and other contributors); data MIT (iamcal)
  openmoji                  OpenMoji colour and black SVGs, CC BY-SA 4.0 (HfG Schwäbisch Gmünd, openmoji.org)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from dfkd_assets.core.io import sha256_file


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    sha256: str  # of the tarball `npm pack` writes
    licence: str

    @property
    def tarball(self) -> str:
        return f"{self.name}-{self.version}.tgz"


PACKAGES = {
    "google": Package("emoji-datasource-google", "16.0.0", "fb5fd131b362aab7a55542d2a147a79708cce0a8b1c1bbacd470172708b5c438",
                      "Noto Emoji artwork: Apache License 2.0 (Google); emoji-datasource data: MIT"),
    "twitter": Package("emoji-datasource-twitter", "16.0.0", "f64a530c63bca463bd8317fdc4615ce63a53a0c65018e4ce2d848aaba7a28877",
                       "Twemoji artwork: CC-BY 4.0 (Twitter, Inc and other contributors); emoji-datasource data: MIT"),
    "openmoji": Package("openmoji", "17.0.0", "55ee7d13485dec86e9f38c1f3a645a13382d33ff97c0cd845ee824b0aef45e68",
                        "OpenMoji: CC BY-SA 4.0 (HfG Schwäbisch Gmünd, openmoji.org)"),
}
DEFAULT_CACHE = Path(os.environ.get("DFKD_EMOJI_NPM_DIR", "storage/emoji-npm"))


class SourceError(RuntimeError):
    """A package tarball that is missing and cannot be fetched, or whose sha256 is not the pinned one."""


def fetch(cache: Path = DEFAULT_CACHE, packages: dict[str, Package] = PACKAGES, log=print) -> dict[str, Path]:
    """Every package's tarball in `cache`, fetched with `npm pack` when absent, checked against its sha256."""
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    for key, p in packages.items():
        path = cache / p.tarball
        if not path.is_file():
            npm = shutil.which("npm")
            if npm is None:
                raise SourceError(f"{path} is missing and npm is not installed: install Node.js/npm and run `make install`")
            log(f"emojiworld: npm pack {p.name}@{p.version}")
            subprocess.run([npm, "pack", f"{p.name}@{p.version}", "--pack-destination", str(cache.resolve()), "--silent"],
                           check=True, stdout=subprocess.DEVNULL)
        out[key] = verified(cache, p)
    return out


def verified(cache: Path, p: Package) -> Path:
    """The tarball of `p` in `cache` if its sha256 is the pinned one; refuses it otherwise."""
    path = Path(cache) / p.tarball
    if not path.is_file():
        raise SourceError(f"{path} is missing: run `make install` or `dfkd emojiworld fetch`")
    got = sha256_file(path)
    if got != p.sha256:
        raise SourceError(f"{path} has sha256 {got}, the pin is {p.sha256}: delete it and fetch again "
                          f"(`dfkd emojiworld fetch`); a different file is never used")
    return path


def read_members(tgz: Path, wanted: set[str]) -> dict[str, bytes]:
    """The bytes of the `wanted` paths (relative to the package root) of a checked tarball, one pass."""
    found = {}
    with tarfile.open(tgz, "r:gz") as tar:
        for m in tar:
            if not m.isfile():
                continue
            rel = m.name.split("/", 1)[1] if "/" in m.name else m.name
            if rel in wanted:
                found[rel] = tar.extractfile(m).read()
    missing = wanted - found.keys()
    if missing:
        raise SourceError(f"{tgz} lacks {len(missing)} files, e.g. {sorted(missing)[:3]}")
    return found


def read_json(tgz: Path, rel: str):
    return json.loads(read_members(tgz, {rel})[rel])
