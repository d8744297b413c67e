import signal
import subprocess
import sys
import time

import pytest
import torch

from dfkd_assets.core import devices
from dfkd_assets.core.devices import cpu_has_native_bf16, lease_device, lease_slot, use_bf16

HOLDER = """
import sys, time
from dfkd_assets.core.devices import lease_slot
with lease_slot([0, 1], sys.argv[1]) as slot:
    print(slot, flush=True)
    time.sleep(600)
"""


def _holder(lock_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock_dir)], stdout=subprocess.PIPE, text=True)
    return proc, int(proc.stdout.readline())


def test_concurrent_steps_each_get_their_own_device_and_a_killed_step_frees_it(tmp_path):
    a, slot_a = _holder(tmp_path)
    try:
        assert slot_a == 0
        with lease_slot([0, 1], tmp_path) as mine:
            assert mine == 1  # the other process holds device 0
            with pytest.raises(TimeoutError, match="no free device among \\[0, 1\\]"):
                with lease_slot([0, 1], tmp_path, timeout_s=0.3, poll_s=0.05):
                    pass
            with lease_slot([0, 1], tmp_path, per_slot=2) as shared:  # sharing allowed: a second holder fits
                assert shared == 0
        a.send_signal(signal.SIGKILL)
        a.wait()
        t0 = time.monotonic()
        with lease_slot([0], tmp_path, timeout_s=5, poll_s=0.05) as freed:  # the OS dropped the dead step's lock
            assert freed == 0 and time.monotonic() - t0 < 2
    finally:
        a.kill()


def test_cpu_device_needs_no_lease_and_bf16_needs_cuda_or_a_native_bf16_cpu(tmp_path, monkeypatch):
    with lease_device("cpu", tmp_path, 1) as dev:
        assert dev == torch.device("cpu")
    assert not use_bf16(torch.device("cpu"), "auto")  # auto stays fp32 on a CPU, native bf16 or not
    assert not use_bf16(torch.device("cpu"), "fp32")
    if cpu_has_native_bf16():
        assert use_bf16(torch.device("cpu"), "bf16")
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)  # a CPU without it
    with pytest.raises(ValueError, match="precision: bf16 needs a CUDA device or a CPU with native bf16"):
        use_bf16(torch.device("cpu"), "bf16")
    assert use_bf16(torch.device("cuda", 0), "auto")
    assert not use_bf16(torch.device("cuda", 0), "fp32")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo")
def test_native_bf16_detection_agrees_with_the_cpu_flags():
    flags = set()
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    assert cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})
