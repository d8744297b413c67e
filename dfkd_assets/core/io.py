"""Files that never appear half-written: atomic writes, hashed shards and their manifests.

A class shard is an uncompressed tar of PNG files with fixed headers (mtime 0, uid 0), so the
same images always give the same bytes; DVC then deduplicates and `dvc pull` restores them
byte-identically. The manifest (JSON) holds one record per image with its sha256.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import secrets
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from PIL import Image

SHARD_NAME = "images.tar"
MANIFEST_NAME = "manifest.json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    # O_EXCL: a name no other writer holds; mode 0o666 less the process umask, as for any new file
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def exclusive_lock(path: Path, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created if missing) until the block ends.

    Why: two runs of the same class partition can start at once where no run queue is in
    between (two `dagster asset materialize`, two Dagster instances, a GPU pool above one); both
    would then resume from, write and delete the same work folder. With the lock, the second
    waits and finds the shard the first wrote. An flock belongs to the open file, so the OS
    drops it when its holder dies (kill -9 included): a crashed run never blocks the next one.
    `on_wait` gets one message when the lock is busy, naming the holder's pid.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                on_wait(f"{path} is held by pid {holder}; waiting for it")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_SHA256_CACHE: dict[tuple, str] = {}


def sha256_file_cached(path: Path) -> str:
    """`sha256_file`, remembered per (real path, size, mtime_ns, inode, ctime_ns) for this process, so a
    multi-GB checkpoint is hashed once however often a fingerprint is recomputed (the stale-partition
    sensor does every tick). A file written or replaced in place changes mtime or ctime (and a
    rename-over its inode), so it is hashed again."""
    path = Path(path)
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
    digest = _SHA256_CACHE.get(key)
    if digest is None:
        digest = sha256_file(path)
        if len(_SHA256_CACHE) > 256:
            _SHA256_CACHE.clear()
        _SHA256_CACHE[key] = digest
    return digest


def encode_png(image: np.ndarray) -> bytes:
    """uint8 HxWx3 -> deterministic PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def write_shard(directory: Path, items: Iterable[tuple[str, bytes]], records: list[dict], meta: dict) -> dict:
    """Write `images.tar` then `manifest.json` atomically; the manifest is written last and names the shard hash.

    `items` are (file name, PNG bytes); `records` one dict per image, in the same order.
    """
    directory = Path(directory)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for (name, data), rec in zip(items, records, strict=True):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
            rec["file"], rec["sha256"] = name, sha256_bytes(data)
    shard = buf.getvalue()
    atomic_write_bytes(directory / SHARD_NAME, shard)
    manifest = {**meta, "shard": SHARD_NAME, "shard_sha256": sha256_bytes(shard), "count": len(records), "images": records}
    atomic_write_json(directory / MANIFEST_NAME, manifest)
    return manifest


class ShardError(RuntimeError):
    pass


def read_manifest(directory: Path) -> dict:
    """The manifest of a class shard, checked for shape: unreadable JSON, missing fields or a shard
    name that points outside the class folder are ShardErrors naming the file (never a KeyError
    three calls later, never a read of another file)."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise ShardError(f"manifest {path} is missing: re-materialize this class partition")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardError(f"manifest {path} is not valid JSON ({e}): re-materialize this class partition") from None
    if not isinstance(manifest, dict) or not {"shard", "shard_sha256", "count", "images"} <= set(manifest):
        raise ShardError(f"manifest {path} lacks shard, shard_sha256, count or images: re-materialize this class partition")
    if manifest["shard"] != Path(str(manifest["shard"])).name or manifest["shard"] in ("", ".", ".."):
        raise ShardError(f"manifest {path} names shard {manifest['shard']!r}, not a file in its own folder")
    if not isinstance(manifest["images"], list) or not all(isinstance(r, dict) and {"file", "sha256"} <= set(r) for r in manifest["images"]):
        raise ShardError(f"manifest {path}: every entry of images needs file and sha256")
    return manifest


def read_shard(directory: Path, verify: bool = True) -> tuple[np.ndarray, dict]:
    """Return (uint8 N x H x W x 3, manifest); with `verify`, every image's sha256 must match the manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    path = directory / manifest["shard"]
    if not path.is_file():
        raise ShardError(f"shard {path} is missing")
    images = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            members = {m.name: m for m in tar.getmembers()}
            for rec in manifest["images"]:
                if rec["file"] not in members:
                    raise ShardError(f"{path}: image {rec['file']} listed in the manifest is not in the shard")
                data = tar.extractfile(members[rec["file"]]).read()
                if verify and sha256_bytes(data) != rec["sha256"]:
                    raise ShardError(f"{path}: sha256 of {rec['file']} does not match {MANIFEST_NAME}")
                images.append(decode_png(data))
    except (tarfile.TarError, OSError, ValueError) as e:  # truncated tar, undecodable PNG
        raise ShardError(f"shard {path} is unreadable ({type(e).__name__}: {e}): re-materialize this class partition") from e
    if len(images) != manifest["count"]:
        raise ShardError(f"{path}: manifest says {manifest['count']} images, found {len(images)}")
    return np.stack(images), manifest
