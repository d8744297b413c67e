"""Progress of long loops: rate and ETA to a log callback, and a bar on an interactive terminal."""

from __future__ import annotations

import sys
import time
from typing import Callable

from tqdm import tqdm

LogFn = Callable[[str], None]


class Progress:
    """Call `update(n)`; logs '<what>: i/total (rate/s, ETA s)' at most every `every_s` seconds."""

    def __init__(self, total: int, what: str, log: LogFn | None = None, every_s: float = 10.0, unit: str = "it"):
        self.total, self.what, self.log, self.every_s, self.unit = total, what, log, every_s, unit
        self.done, self.t0, self.last = 0, time.perf_counter(), 0.0
        self.bar = tqdm(total=total, desc=what, unit=unit, leave=False) if sys.stderr.isatty() else None

    def update(self, n: int = 1, **info: float) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if info:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in info.items()})
        now = time.perf_counter()
        if self.log and (now - self.last >= self.every_s or self.done >= self.total):
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            extra = "".join(f", {k}={v:.4g}" for k, v in info.items())
            self.log(f"{self.what}: {self.done}/{self.total} ({rate:.2f} {self.unit}/s, ETA {eta:.0f} s{extra})")

    def close(self) -> float:
        if self.bar is not None:
            self.bar.close()
        return time.perf_counter() - self.t0
