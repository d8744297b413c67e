"""Load test of the served student: `mlflow models serve --env-manager local` on 127.0.0.1 under a
bounded concurrent load, then requests/s, p50/p99 latency and the server's peak memory (issue 37).

By default a student of the settings' shape (random weights cost the same as trained ones) is
registered the way `student_model` registers (`ModelRegistry.register_challenger`) into a new MLflow
store in a temporary workspace; `--model-uri` + `--tracking-uri` serve an existing version instead.
Every round also sends requests outside the input contract (a batch of 256 1x1 images, pixels in
0..255), which must be answered 400 without growing the server.

    .venv/bin/python scripts/serve_load.py --config configs/demo.yaml --requests 300 --json docs/bench/serve/load.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]


def register_random_student(config: Path, workspace: Path) -> tuple[str, str]:
    """(models:/ URI, tracking URI) of a random-weight student of `config`'s shape, registered as student_model does."""
    from dfkd_assets.config import load_config
    from dfkd_assets.defs.registry import ModelRegistry
    from dfkd_assets.defs.resources import MlflowTracking
    from dfkd_assets.loaders import fresh_student

    cfg = load_config(config, {"workspace": str(workspace), "mlflow": {"registered_model_name": "dfkd-serve-load"}})
    tracking, tags = MlflowTracking(), {"dvc_hash": "0" * 32, "teacher_id": "load-test", "config_hash": cfg.config_hash()}
    registry = ModelRegistry(cfg, tracking)
    with tracking.run(cfg, run_name="serve-load", tags=tags):
        version = registry.register_challenger(fresh_student(cfg).eval(), tags)
    return f"models:/{registry.name}/{version}", cfg.resolve(cfg.mlflow.tracking_uri)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_uri: str, tracking_uri: str, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"server exited ({server.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5):
                return server
        except OSError:
            if time.time() > deadline:
                raise RuntimeError(f"server not up after 300 s:\n{log.read_text()[-3000:]}") from None
            time.sleep(0.5)


class PeakRss:
    """Sum of the RSS of the server's process tree, sampled every 20 ms in a thread; `peak` in bytes."""

    def __init__(self, pid: int):
        self.root, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.02)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def post(url: str, body: bytes) -> tuple[int, float]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    return status, time.perf_counter() - t


def load_round(url: str, server_pid: int, requests: int, concurrency: int, batch: int, side: int, seed: int = 0) -> dict:
    """`requests` valid requests of `batch` images of `side` px at most `concurrency` at a time, plus one
    over-contract request per 10 valid ones; latency percentiles over the valid ones."""
    rng = np.random.default_rng(seed)
    good = json.dumps({"inputs": rng.random((batch, 3, side, side), dtype=np.float32).round(4).tolist()}).encode()
    bad = [json.dumps({"inputs": np.zeros((256, 3, 1, 1), np.float32).tolist()}).encode(),
           json.dumps({"inputs": (255 * rng.random((1, 3, side, side))).round().tolist()}).encode()]
    bodies = [(good, True)] * requests + [(bad[i % 2], False) for i in range(requests // 10)]
    order = rng.permutation(len(bodies))
    mem = PeakRss(server_pid)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(lambda i: (bodies[i][1], *post(url, bodies[i][0])), order))
    wall = time.perf_counter() - t0
    peak = mem.stop()
    lat = np.array([dt for ok, status, dt in results if ok and status == 200]) * 1000
    return {"concurrency": concurrency, "batch": batch, "side": side, "requests": requests, "wall_s": wall,
            "requests_per_s": len(lat) / wall, "images_per_s": len(lat) * batch / wall,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "ok": int(len(lat)), "valid_not_200": sum(1 for ok, s, _ in results if ok and s != 200),
            "over_contract": sum(1 for ok, _, _ in results if not ok), "over_contract_400": sum(1 for ok, s, _ in results if not ok and s == 400),
            "peak_rss_mb": peak / 2**20}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml", help="the student's shape (default: the demo's)")
    p.add_argument("--model-uri", default=None, help="serve this version (with --tracking-uri) instead of a fresh random-weight one")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--requests", type=int, default=300, help="valid requests per round (+ 1 over-contract per 10)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--side", type=int, default=None, help="image side (default: the student's input size)")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if a.model_uri:
            uri, tracking = a.model_uri, a.tracking_uri
        else:
            uri, tracking = register_random_student(a.config, Path(tmp) / "ws")
        from dfkd_assets.config import load_config

        side = a.side or load_config(a.config).student.input_size
        port = free_port()
        server = start_server(uri, tracking, port, Path(tmp) / "serve.log")
        try:
            idle = PeakRss(server.pid)
            time.sleep(0.5)
            idle_mb = idle.stop() / 2**20
            rows = [load_round(f"http://127.0.0.1:{port}/invocations", server.pid, a.requests, c, b, side) for b in a.batch for c in a.concurrency]
            workers = len(psutil.Process(server.pid).children(recursive=True)) + 1
        finally:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)
    flags = sorted({f for f in open("/proc/cpuinfo").read().split() if f.startswith(("avx", "amx")) or f == "vnni"})
    out = {"model_uri": uri, "server_processes": workers, "idle_rss_mb": idle_mb, "rows": rows, "machine": platform.processor() or platform.machine(),
           "cpu": next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?"),
           "cpu_flags": flags, "cores": os.cpu_count(), "command": " ".join(sys.argv)}
    print(f"served {uri} ({workers} processes, idle {idle_mb:.0f} MB) on {out['cpu']}, {out['cores']} cores, {' '.join(flags)}")
    print("| batch | concurrency | requests | req/s | images/s | p50 ms | p99 ms | valid not 200 | over-contract -> 400 | peak RSS MB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['concurrency']} | {r['requests']} | {r['requests_per_s']:.1f} | {r['images_per_s']:.0f} | {r['p50_ms']:.1f} | "
              f"{r['p99_ms']:.1f} | {r['valid_not_200']} | {r['over_contract_400']}/{r['over_contract']} | {r['peak_rss_mb']:.0f} |")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0 if all(r["valid_not_200"] == 0 and r["over_contract_400"] == r["over_contract"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
