"""Fleet numbers (infra/README.md): wall time of the CI-config backfill (every class of configs/ci.yaml)
on a fleet of 1 and of N Celery workers, and the per-step overhead of the Celery executor against
Dagster's multiprocess executor. Prints numbers; not a test.

    .venv/bin/python scripts/fleet_bench.py --workers 1 2 [--repeat 3]

Each fleet is brought up fresh (`dfkd fleet up`, its own Postgres databases, RabbitMQ + Redis on
127.0.0.1) on a fresh CI workspace under --out, and torn down with its databases afterwards.
Backfill wall time: from submitting one run per class (after the prompts job) until all succeeded.
Per-step overhead: a `synthetic_images` run whose shard already exists (the step only loads the
teacher and checks the fingerprint), run time (RUN_START..RUN_SUCCESS) minus step time
(STEP_START..STEP_SUCCESS); through the fleet (Celery) and through `dagster asset materialize`
on the same Postgres instance without DFKD_EXECUTOR (multiprocess: a fresh process per step).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workspace(out: Path) -> Path:
    ws = out / "ws"
    ws.mkdir(parents=True)
    shutil.copy(ROOT / "dvc.yaml", ws / "dvc.yaml")
    cfg = yaml.safe_load((ROOT / "configs" / "ci.yaml").read_text())
    cfg.update(workspace=str(ws), dvc={"remote_url": str(out / "remote")},
               mlflow={**cfg["mlflow"], "tracking_uri": f"http://127.0.0.1:{_free_port()}", "artifact_location": None})
    cfg["teacher"]["model_config_file"] = str(ROOT / cfg["teacher"]["model_config_file"])
    cfg["generator"]["config_file"] = str(ROOT / cfg["generator"]["config_file"])
    path = out / "settings.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _wait(instance, run_ids, timeout=1800):
    import dagster as dg

    deadline = time.time() + timeout
    while True:
        runs = [instance.get_run_by_id(r) for r in run_ids]
        if all(r.status in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE) for r in runs):
            bad = [r.run_id for r in runs if r.status != dg.DagsterRunStatus.SUCCESS]
            if bad:
                raise SystemExit(f"runs failed: {bad}")
            return
        if time.time() > deadline:
            raise SystemExit("timed out")
        time.sleep(0.5)


def overhead(instance, run_id) -> tuple[float, float]:
    """(run seconds, step seconds) from the run's event timestamps."""
    import dagster as dg

    t = {}
    for e in instance.all_logs(run_id):
        if e.dagster_event and e.dagster_event.event_type in (dg.DagsterEventType.RUN_START, dg.DagsterEventType.RUN_SUCCESS,
                                                               dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS):
            t.setdefault(e.dagster_event.event_type, e.timestamp)
    E = dg.DagsterEventType
    return t[E.RUN_SUCCESS] - t[E.RUN_START], t[E.STEP_SUCCESS] - t[E.STEP_START]


def bench_fleet(n: int, out: Path, repeat: int) -> dict:
    import dagster as dg
    from dagster_graphql import DagsterGraphQLClient

    from dfkd_assets.config import load_config
    from dfkd_assets.defs.jobs import PREPARE, SYNTHESIZE
    from dfkd_assets.tools import fleet

    cfg_path = workspace(out)
    cfg = load_config(cfg_path)
    t = time.time()
    state = fleet.up(cfg_path, workers=n, fleet_dir=out / "fleet")
    res = {"workers": n, "fleet_up_s": time.time() - t}
    env = fleet.fleet_env(state)
    os.environ.update({k: env[k] for k in ("DAGSTER_HOME", "DAGSTER_PG_URL")})
    try:
        client = DagsterGraphQLClient("127.0.0.1", port_number=state["webserver_port"])
        with dg.DagsterInstance.get() as instance:
            _wait(instance, [client.submit_job_execution(PREPARE)])
            t = time.time()
            _wait(instance, [client.submit_job_execution(SYNTHESIZE, tags={"dagster/partition": c}) for c in cfg.classes])
            res["backfill_s"] = time.time() - t
            cel, mp = [], []
            for _ in range(repeat):
                rid = client.submit_job_execution(SYNTHESIZE, tags={"dagster/partition": cfg.classes[0]})
                _wait(instance, [rid])
                cel.append(overhead(instance, rid))
                before = {r.run_id for r in instance.get_runs()}
                mp_env = {k: v for k, v in env.items() if k != "DFKD_EXECUTOR"}
                subprocess.run([sys.executable, "-m", "dagster", "asset", "materialize", "-m", "dfkd_assets.definitions",
                                "--select", "synthetic_images", "--partition", cfg.classes[0]], env=mp_env, check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
                new = [r.run_id for r in instance.get_runs() if r.run_id not in before]
                mp.append(overhead(instance, new[0]))
            res["celery_run_step_s"], res["multiprocess_run_step_s"] = cel, mp
    finally:
        fleet.down(out / "fleet", drop_databases=True)
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=3, help="reused-shard runs per executor for the overhead")
    p.add_argument("--out", default="storage/fleet_bench")
    a = p.parse_args()
    out = Path(a.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    rows = [bench_fleet(n, out / f"w{n}", a.repeat) for n in a.workers]
    print(f"\nCI-config backfill ({os.cpu_count()} CPU cores)")
    print("workers  fleet up (s)  backfill of every class (s)")
    for r in rows:
        print(f"{r['workers']:>7d}  {r['fleet_up_s']:>12.1f}  {r['backfill_s']:>27.1f}")
    cel = [a - b for r in rows for a, b in r["celery_run_step_s"]]
    mp = [a - b for r in rows for a, b in r["multiprocess_run_step_s"]]
    st_c = [b for r in rows for _, b in r["celery_run_step_s"]]
    st_m = [b for r in rows for _, b in r["multiprocess_run_step_s"]]
    print("\nper-step overhead = run time - step time, one reused-shard synthetic_images step (median of "
          f"{len(cel)}; step time in brackets)")
    print(f"celery        {statistics.median(cel):6.2f} s  (step {statistics.median(st_c):.2f} s)")
    print(f"multiprocess  {statistics.median(mp):6.2f} s  (step {statistics.median(st_m):.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
