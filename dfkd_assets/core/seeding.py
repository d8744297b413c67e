"""Seeds derived from names, so a class's images do not depend on which other classes exist."""

from __future__ import annotations

import hashlib
import torch


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts, e.g. (run seed, class name, image index)."""
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def resolve_device(spec: str) -> torch.device:
    """'auto' picks CUDA when present; an explicit CUDA device that does not exist is an error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device: {spec} requested but CUDA is not available (set device: cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(f"device: {spec} requested but only {torch.cuda.device_count()} GPU(s) exist")
    return dev
