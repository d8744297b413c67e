"""Devices: which one a step runs on, at which precision, and one GPU per step on a multi-GPU host.

Dagster's `gpu` pool bounds how many GPU steps run at once (set it to the number of GPUs);
`lease_device` then gives each of those steps its own GPU through an exclusive file lock per
device, so two concurrent steps never share one unless `per_device` allows it. Locks are
released by the OS when a process dies, so a killed step never leaves a GPU "taken".
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Iterator

import torch


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


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX): there, bf16 autocast
    makes oneDNN's convolutions and matmuls faster; elsewhere it is emulated and slower than fp32."""
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def use_bf16(device: torch.device, precision: str) -> bool:
    """'auto' = bf16 autocast on CUDA, fp32 elsewhere; 'bf16' also runs on a CPU with native bf16.

    'auto' stays fp32 on a CPU even where bf16 is native: CPU runs are the tests and the toy demo,
    whose checks were tuned in fp32, and bf16 there is a speed choice the user makes (`dfkd bench`
    measures it). 'bf16' on a CPU without native bf16 is a configuration error.
    """
    if precision == "bf16" and device.type != "cuda" and not (device.type == "cpu" and cpu_has_native_bf16()):
        raise ValueError(
            f"precision: bf16 needs a CUDA device or a CPU with native bf16 (AVX512-BF16 or AMX), got {device}"
            " without it (use precision: auto or fp32)"
        )
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast for the forward passes; callers keep distances, losses and optimizer state in fp32."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


@contextlib.contextmanager
def lease_slot(slots: list[int], lock_dir: Path, per_slot: int = 1, timeout_s: float = 24 * 3600, poll_s: float = 0.5) -> Iterator[int]:
    """Hold one of `slots` (each shared by at most `per_slot` holders) until the block ends; waits while all are taken."""
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    while True:
        for slot in slots:
            for share in range(per_slot):
                fd = os.open(lock_dir / f"device{slot}.{share}.lock", os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                try:
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())
                    yield slot
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    os.close(fd)
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"no free device among {slots} in {lock_dir} after {timeout_s:.0f} s")
        time.sleep(poll_s)


@contextlib.contextmanager
def lease_device(spec: str, lock_dir: Path, per_device: int) -> Iterator[torch.device]:
    """The device for one step: CPU as is; 'auto'/'cuda' take a free GPU; 'cuda:N' waits for GPU N."""
    dev = resolve_device(spec)
    if dev.type != "cuda":
        yield dev
        return
    slots = [dev.index] if dev.index is not None else list(range(torch.cuda.device_count()))  # pinned: that GPU only
    with lease_slot(slots, lock_dir, per_device) as index:
        torch.cuda.set_device(index)
        yield torch.device("cuda", index)
