"""`dfkd fleet up|down|status`: a local scale-out fleet on this machine's services.

`up` starts, each in its own process group, all bound to 127.0.0.1:
- an MLflow tracking server on a fresh Postgres database, artifacts under `<fleet>/mlflow-artifacts`
  (port taken from the settings' `mlflow.tracking_uri` when that is `http://127.0.0.1:<port>`; otherwise
  the fleet runs a copy of the settings pointing at `--mlflow-port`, default 5000);
- a Dagster instance on a fresh Postgres database (`infra/dagster-postgres.yaml` with faster run
  monitoring): one gRPC code server (`dfkd_assets.definitions`, `DFKD_EXECUTOR=celery`), the
  webserver and the daemon (run queue, run monitoring through `LocalRunLauncher`, sensors);
- N `dagster-celery` workers (one step at a time each), serving `<prefix>gpu` and `<prefix>dagster`
  on the broker, results in Redis under the key prefix `<prefix>`; `<prefix>` = `dfkd-<id>.`, so
  fleets and other users of the broker never share a queue.
Pool `gpu` gets N slots (one per worker: each worker stands for a GPU machine), `dvc` and `registry` one.

Everything goes in `<fleet>/fleet.json` (pids, process groups, ports, database names). `down`
terminates every process group (then kills what is left, including run workers, found by the
`DFKD_FLEET_ID` in their environment), deletes the fleet's queues and exchanges on the broker and
its result keys in Redis, and with `--drop-databases` drops its two databases.

Nothing here imports torch; Dagster, Celery and psycopg2 are imported where used.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

from dfkd_assets.processes import pid_alive

FLEET_ENV = "DFKD_FLEET_ID"
DEFAULT_BROKER = "amqp://guest:guest@127.0.0.1:5672//"
DEFAULT_BACKEND = "redis://127.0.0.1:6379/0"
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
REPO = Path(__file__).resolve().parents[2]  # the repository


class FleetError(RuntimeError):
    """A fleet cannot come up or go down; the message names the setting to fix."""


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _redact(url: str) -> str:
    from dfkd_assets.redaction import redact

    return redact(url)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- checks of the services


def check_broker(url: str, timeout: float = 5.0) -> None:
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=timeout) as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
    except Exception as e:
        raise FleetError(f"Celery broker unreachable at {_redact(url)} ({type(e).__name__}: {e}); "
                         "start RabbitMQ or set --broker / $DFKD_CELERY_BROKER") from None


def _redis(url: str):
    import redis

    return redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=5)


def check_backend(url: str) -> None:
    if not url.startswith("redis://"):
        raise FleetError(f"result backend {_redact(url)}: the fleet uses Redis (redis://host:port/db); set --backend / $DFKD_CELERY_BACKEND")
    try:
        _redis(url).ping()
    except Exception as e:
        raise FleetError(f"Redis result backend unreachable at {_redact(url)} ({type(e).__name__}: {e}); "
                         "start Redis or set --backend / $DFKD_CELERY_BACKEND") from None


def _pg(admin_url: str):
    import psycopg2

    try:
        conn = psycopg2.connect(admin_url, connect_timeout=3)
    except Exception as e:
        raise FleetError(f"Postgres unreachable at {_redact(admin_url)} ({type(e).__name__}: {str(e).strip()}); "
                         "set --postgres / $DFKD_FLEET_POSTGRES (an admin URL that may create databases)") from None
    conn.autocommit = True
    return conn


def _db_url(admin_url: str, name: str) -> str:
    """`admin_url` with database `name`, as a `postgresql+psycopg2://` URL (SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3)."""
    u = urlparse(admin_url)
    return u._replace(scheme="postgresql+psycopg2", path=f"/{name}").geturl()


# ---------------------------------------------------------------- processes


def _start(state: dict, name: str, cmd: list[str], env: dict, fleet_dir: Path) -> None:
    log = fleet_dir / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        p = subprocess.Popen(cmd, cwd=state["cwd"], env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)  # its own process group: `down` ends it and all its children
    state["processes"][name] = {"pid": p.pid, "pgid": p.pid, "cmd": cmd, "log": str(log)}


def _reap_children() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def _group_alive(pgid: int) -> bool:
    """The group exists and one of its members is still running (not a zombie)."""
    return _group_exists(pgid) and (any(pid_alive(p) for p in _group_members(pgid)) or pid_alive(pgid))


def _group_members(pgid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid and fields[0] != "Z":
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def fleet_processes(fleet_id: str) -> list[int]:
    """Live processes (of any group) started for fleet `fleet_id`: they carry DFKD_FLEET_ID=<id> in their environment."""
    needle = f"{FLEET_ENV}={fleet_id}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if needle in (d / "environ").read_bytes().split(b"\0") and pid_alive(int(d.name)):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def owned_groups(fleet_id: str, pgids: list[int]) -> list[int]:
    """The process groups of `pgids` that still hold a process of fleet `fleet_id` (DFKD_FLEET_ID in its
    environment). A group id read from a state file may by now belong to someone else's processes
    (ids are reused): such a group is never signalled."""
    ours = set()
    for pid in fleet_processes(fleet_id):
        try:
            ours.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    return [g for g in pgids if g in ours]


def _stop_groups(pgids: list[int], grace: float) -> None:
    """SIGTERM every group at once, wait up to `grace` seconds for all, then SIGKILL what is left."""
    for pgid in pgids:
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace
    while time.time() < deadline and any(_group_alive(g) for g in pgids):
        time.sleep(0.2)
    for pgid in pgids:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 10  # until the kernel has dropped every group (dying and unreaped members included)
    while time.time() < deadline and any(_group_exists(g) for g in pgids):
        time.sleep(0.1)


def _group_exists(pgid: int) -> bool:
    """The kernel still knows the group (dying or unreaped members included); reaps our own children first."""
    _reap_children()
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_worker(state: dict, name: str) -> int:
    """kill -9 every process of worker `name` (the Celery main process and its pool child); its process group id."""
    pgid = state["processes"][name]["pgid"]
    os.killpg(pgid, signal.SIGKILL)
    deadline = time.time() + 10
    while _group_alive(pgid) and time.time() < deadline:
        time.sleep(0.1)
    return pgid


def worker_for_pid(state: dict, pid: int) -> str | None:
    """The fleet worker whose process group holds `pid` (e.g. a step's pid from its STEP_START event)."""
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return None
    return next((n for n, p in state["processes"].items() if n.startswith("worker") and p["pgid"] == pgid), None)


# ---------------------------------------------------------------- up / down


def _wait(what: str, ok, procs: list[tuple[str, dict]], timeout: float) -> None:
    deadline = time.time() + timeout
    while not ok():
        for name, p in procs:
            if not pid_alive(p["pid"]):
                tail = Path(p["log"]).read_text(errors="replace")[-3000:]
                raise FleetError(f"{name} exited while waiting for {what} (log {p['log']}):\n{tail}")
        if time.time() > deadline:
            raise FleetError(f"timed out after {timeout:.0f}s waiting for {what}; logs in {Path(procs[0][1]['log']).parent}")
        time.sleep(0.5)


def fleet_settings(config: Path, fleet_dir: Path, mlflow_port: int) -> Path:
    """`config` as is when its mlflow.tracking_uri is already an http://127.0.0.1:<port> server; otherwise a
    copy in the fleet directory pointing MLflow at the fleet's server on `mlflow_port` (other paths stay
    relative to the directory `dfkd fleet up` runs in, where every fleet process runs)."""
    import yaml

    raw = yaml.safe_load(config.read_text()) or {}
    uri = str((raw.get("mlflow") or {}).get("tracking_uri") or "")
    if uri.startswith("http://"):
        return config
    raw.setdefault("mlflow", {}).update(tracking_uri=f"http://127.0.0.1:{mlflow_port}", artifact_location=None)
    out = fleet_dir / "settings.yaml"
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def _mlflow_port(cfg) -> int:
    uri = cfg.resolve(cfg.mlflow.tracking_uri)
    u = urlparse(uri)
    if u.scheme != "http" or u.hostname not in ("127.0.0.1", "localhost") or not u.port:
        raise FleetError(f"mlflow.tracking_uri is {_redact(uri)!r}: on a fleet it must be the fleet's MLflow server, "
                         "http://127.0.0.1:<port> (e.g. http://127.0.0.1:5000), with mlflow.artifact_location: null")
    if cfg.mlflow.artifact_location:
        raise FleetError("mlflow.artifact_location must be null on a fleet: the MLflow server's proxied artifact store holds the artifacts")
    return u.port


def instance_yaml(monitor_interval_s: int) -> str:
    """The fleet's dagster.yaml: infra/dagster-postgres.yaml with run monitoring polled every
    `monitor_interval_s` and pool slots of ended runs freed after as long."""
    import yaml

    base = yaml.safe_load((REPO / "infra" / "dagster-postgres.yaml").read_text())
    base["run_monitoring"].update(poll_interval_seconds=monitor_interval_s, free_slots_after_run_end_seconds=monitor_interval_s)
    base.setdefault("run_coordinator", {"module": "dagster._core.run_coordinator", "class": "QueuedRunCoordinator",
                                        "config": {"dequeue_interval_seconds": 1}})
    return yaml.safe_dump(base, sort_keys=False)


def worker_yaml(prefix: str) -> str:
    """The workers' `-y` file (dagster-celery's executor config block): broker and backend from the
    environment, the Celery policy of defs/celery.py."""
    import yaml

    from dfkd_assets.defs.celery import celery_settings

    return yaml.safe_dump({"execution": {"config": {
        "broker": {"env": "DFKD_CELERY_BROKER"}, "backend": {"env": "DFKD_CELERY_BACKEND"},
        "config_source": celery_settings(prefix)}}}, sort_keys=False)


def up(config: str | Path, workers: int = 2, fleet_dir: str | Path = "storage/fleet", broker: str | None = None,
       backend: str | None = None, postgres: str | None = None, webserver_port: int | None = None,
       monitor_interval_s: int = 5, timeout_s: float = 300, mlflow_port: int = 5000, log=print) -> dict:
    """Bring the fleet up; returns its state (also written to `<fleet_dir>/fleet.json`).

    Everything that can be refused is checked before anything is created; once the databases exist,
    the state file records what there is, and a failed start takes the whole fleet down again."""
    from dfkd_assets.defs.celery import BACKEND_ENV, BROKER_ENV, QUEUE_PREFIX_ENV, queue_names

    fleet_dir = Path(fleet_dir).resolve()
    config, mlflow_port = _checked_settings(Path(config).resolve(), workers, fleet_dir, mlflow_port)
    broker = broker or os.environ.get(BROKER_ENV) or DEFAULT_BROKER
    backend = backend or os.environ.get(BACKEND_ENV) or DEFAULT_BACKEND
    postgres = postgres or os.environ.get("DFKD_FLEET_POSTGRES") or DEFAULT_POSTGRES
    check_broker(broker)
    check_backend(backend)

    fid = uuid.uuid4().hex[:8]
    prefix = f"dfkd-{fid}."
    dbs = _create_databases(postgres, fid)
    home, code_port, web_port = _write_instance_files(fleet_dir, monitor_interval_s, prefix, webserver_port)
    state = {
        "id": fid, "dir": str(fleet_dir), "cwd": os.getcwd(), "config": str(config), "queue_prefix": prefix,
        "queues": queue_names(prefix), "broker": broker, "backend": backend, "postgres": postgres, "databases": dbs,
        "dagster_home": str(home), "webserver": f"http://127.0.0.1:{web_port}", "webserver_port": web_port,
        "code_server_port": code_port, "mlflow": f"http://127.0.0.1:{mlflow_port}", "workers": workers, "processes": {},
    }
    env = _fleet_env(state)
    state["env"] = {k: env[k] for k in (FLEET_ENV, "DAGSTER_HOME", "DFKD_CONFIG", "DFKD_EXECUTOR", QUEUE_PREFIX_ENV, "PATH")}
    write_state(fleet_dir, state)
    try:
        _start_processes(state, env, mlflow_port, timeout_s)
    except BaseException:
        down(fleet_dir, drop_databases=True, log=lambda _m: None)
        raise
    log(f"fleet {fid} up in {fleet_dir}: {workers} worker(s) on {', '.join(state['queues'])} via {_redact(broker)}; "
        f"Dagster {state['webserver']} (Postgres {dbs['dagster']}); MLflow {state['mlflow']} (Postgres {dbs['mlflow']})")
    return state


def _checked_settings(config: Path, workers: int, fleet_dir: Path, mlflow_port: int) -> tuple[Path, int]:
    """The refusals that need no service, before anything exists: too few workers, a fleet already up in
    `fleet_dir`, settings whose MLflow is not a local server, its port taken. Returns the settings file
    the fleet runs on (see fleet_settings) and its MLflow port; creates `fleet_dir`."""
    from dfkd_assets.config import load_config

    if workers < 1:
        raise FleetError(f"--workers {workers}: at least 1")
    old = read_state(fleet_dir)
    if old and any(_group_alive(p["pgid"]) for p in old["processes"].values()):
        raise FleetError(f"a fleet is already up in {fleet_dir}; `dfkd fleet down --dir {fleet_dir}` first")
    fleet_dir.mkdir(parents=True, exist_ok=True)
    config = fleet_settings(config, fleet_dir, mlflow_port)
    mlflow_port = _mlflow_port(load_config(config))
    if _port_open(mlflow_port):
        raise FleetError(f"port {mlflow_port} of mlflow.tracking_uri is taken; choose another port in the settings")
    return config, mlflow_port


def _create_databases(postgres: str, fid: str) -> dict[str, str]:
    """The fleet's own two Postgres databases (Dagster's instance, MLflow's store), named by fleet id so
    that fleets never share state and `down --drop-databases` knows what to drop."""
    dbs = {"dagster": f"dfkd_fleet_{fid}_dagster", "mlflow": f"dfkd_fleet_{fid}_mlflow"}
    conn = _pg(postgres)
    with conn.cursor() as cur:
        for name in dbs.values():
            cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    return dbs


def _write_instance_files(fleet_dir: Path, monitor_interval_s: int, prefix: str, webserver_port: int | None) -> tuple[Path, int, int]:
    """dagster_home/dagster.yaml, the workers' celery.yaml and a workspace.yaml naming the code server's
    port. Returns the Dagster home and the code server's and webserver's ports (free ones unless given)."""
    home = fleet_dir / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(instance_yaml(monitor_interval_s))
    (fleet_dir / "celery.yaml").write_text(worker_yaml(prefix))
    code_port, web_port = _free_port(), webserver_port or _free_port()
    (fleet_dir / "workspace.yaml").write_text(
        f"load_from:\n  - grpc_server: {{host: 127.0.0.1, port: {code_port}, location_name: dfkd}}\n")
    return home, code_port, web_port


def _fleet_env(state: dict) -> dict:
    """The environment of every fleet process: this one's, plus the fleet id (how `down` finds strays),
    the instance and settings, the Celery executor with its broker, backend and queue prefix."""
    from dfkd_assets.defs.celery import BACKEND_ENV, BROKER_ENV, QUEUE_PREFIX_ENV

    return {
        **os.environ, FLEET_ENV: state["id"], "DAGSTER_HOME": state["dagster_home"],
        "DAGSTER_PG_URL": _db_url(state["postgres"], state["databases"]["dagster"]),
        "DFKD_CONFIG": state["config"], "DFKD_EXECUTOR": "celery", BROKER_ENV: state["broker"], BACKEND_ENV: state["backend"],
        QUEUE_PREFIX_ENV: state["queue_prefix"],
        "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1",
        # dagster-celery runs `celery` from PATH: this environment's, not another one's
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }


def _start_processes(state: dict, env: dict, mlflow_port: int, timeout_s: float) -> None:
    """Pools, then MLflow, the code server and the workers; the webserver and daemon once the code server
    answers (they load the workspace from it); then wait until every service answers. The state file is
    rewritten after each batch of starts, so `down` finds whatever was started if this fails."""
    fleet_dir = Path(state["dir"])
    workers = state["workers"]
    _pools(env, workers)
    # the store's URL (its password, if any) goes through the environment, never into argv or the state file
    mlflow_env = {**{k: v for k, v in env.items() if k != "DAGSTER_PG_URL"},
                  "MLFLOW_BACKEND_STORE_URI": _db_url(state["postgres"], state["databases"]["mlflow"])}
    _start(state, "mlflow", [_bin("mlflow"), "server", "--artifacts-destination", str(fleet_dir / "mlflow-artifacts"), "--serve-artifacts",
                             "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"], mlflow_env, fleet_dir)
    _start(state, "code_server", [_bin("dagster"), "code-server", "start", "-h", "127.0.0.1", "-p", str(state["code_server_port"]),
                                  "-m", "dfkd_assets.definitions", "--location-name", "dfkd"], env, fleet_dir)
    for i in range(1, workers + 1):
        start_worker(state, f"worker{i}", env)
    write_state(fleet_dir, state)
    procs = list(state["processes"].items())
    _wait("the code server", lambda: _port_open(state["code_server_port"]), procs, timeout_s)
    ws = fleet_dir / "workspace.yaml"
    _start(state, "webserver", [_bin("dagster-webserver"), "-h", "127.0.0.1", "-p", str(state["webserver_port"]), "-w", str(ws)],
           env, fleet_dir)
    _start(state, "daemon", [_bin("dagster-daemon"), "run", "-w", str(ws)], env, fleet_dir)
    write_state(fleet_dir, state)
    procs = list(state["processes"].items())
    _wait("the MLflow server", lambda: _port_open(mlflow_port), procs, timeout_s)
    _wait("the Dagster webserver", lambda: _http_ok(f"{state['webserver']}/server_info"), procs, timeout_s)
    for i in range(1, workers + 1):
        wait_worker(state, f"worker{i}", timeout_s)


def _pools(env: dict, workers: int) -> None:
    """Pools on the fresh instance: gpu = one slot per worker, dvc = 1, registry = 1 (`dfkd setup-pools`)."""
    out = subprocess.run([sys.executable, "-m", "dfkd_assets.tools.cli", "setup-pools", "--gpus", str(workers)], env=env,
                         capture_output=True, text=True, timeout=300)
    if out.returncode:
        raise FleetError(f"dfkd setup-pools failed on the fleet's instance:\n{out.stderr[-3000:]}")


def _http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except Exception:
        return False


def start_worker(state: dict, name: str, env: dict | None = None) -> None:
    """Start (or restart) worker `name`: one Celery worker, one step at a time, on the fleet's two queues."""
    env = env or {**os.environ, **state["env"], "DAGSTER_PG_URL": _db_url(state["postgres"], state["databases"]["dagster"]),
                  "DFKD_CELERY_BROKER": state["broker"], "DFKD_CELERY_BACKEND": state["backend"],
                  "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1"}
    fleet_dir = Path(state["dir"])
    cmd = [_bin("dagster-celery"), "worker", "start", "-A", "dagster_celery.app", "-y", str(fleet_dir / "celery.yaml"),
           "-n", f"{state['queue_prefix']}{name}"]
    # one -q with both names: dagster-celery turns each -q into a -Q, and Celery keeps only the last -Q
    cmd += ["-q", ",".join(state["queues"]), "--", "--concurrency=1", "--pool=prefork", "--without-gossip", "--without-mingle", "--without-heartbeat"]
    log = Path(fleet_dir / "logs" / f"{name}.log")
    if log.exists():
        log.rename(log.with_suffix(f".{int(time.time())}.log"))
    _start(state, name, cmd, env, fleet_dir)
    write_state(fleet_dir, state)


def wait_worker(state: dict, name: str, timeout_s: float = 300) -> None:
    p = state["processes"][name]
    _wait(f"Celery {name}", lambda: " ready." in Path(p["log"]).read_text(errors="replace"), [(name, p)], timeout_s)


def read_state(fleet_dir: str | Path) -> dict | None:
    f = Path(fleet_dir) / "fleet.json"
    return json.loads(f.read_text()) if f.is_file() else None


def write_state(fleet_dir: Path, state: dict) -> None:
    """The fleet's state, readable by its owner only (0600): it names the stores' URLs, passwords included."""
    f = Path(fleet_dir) / "fleet.json"
    tmp = f.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps(state, indent=2))
    tmp.replace(f)


def broker_leftovers(state: dict) -> list[str]:
    """The fleet's queues that still exist on the broker (checked by passive declare: guest may not list queues)."""
    from kombu import Connection

    left = []
    with Connection(state["broker"], connect_timeout=5) as conn:
        for q in state["queues"]:
            ch = conn.channel()
            try:
                ch.queue_declare(q, passive=True)
                left.append(q)
            except Exception as e:  # 404 NOT_FOUND closes the channel
                if "NOT_FOUND" not in str(e) and "404" not in str(e):
                    raise
            finally:
                try:
                    ch.close()
                except Exception:
                    pass
    return left


def redis_leftovers(state: dict) -> list[str]:
    r = _redis(state["backend"])
    return [k.decode() for k in r.scan_iter(match=f"{state['queue_prefix']}*", count=1000)]


def down(fleet_dir: str | Path = "storage/fleet", drop_databases: bool = False, grace_s: float = 20, log=print) -> dict:
    """Stop everything `up` started; returns what was cleaned. Safe to call twice."""
    fleet_dir = Path(fleet_dir).resolve()
    state = read_state(fleet_dir)
    if state is None:
        log(f"no fleet in {fleet_dir}")
        return {}
    order = [n for n in state["processes"] if n.startswith("worker")] + [n for n in ("webserver", "daemon", "code_server", "mlflow") if n in state["processes"]]
    _stop_groups(owned_groups(state["id"], [state["processes"][n]["pgid"] for n in order]), grace_s)
    stray = fleet_processes(state["id"])  # run workers or anything that left its group
    for pid in stray:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 10
    while fleet_processes(state["id"]) and time.time() < deadline:
        _reap_children()
        time.sleep(0.2)
    problems = []
    left = fleet_processes(state["id"])
    if left:
        problems.append(f"processes still alive: {left}")
    try:
        from kombu import Connection

        with Connection(state["broker"], connect_timeout=5) as conn:
            for q in state["queues"]:
                ch = conn.channel()
                ch.queue_delete(q)
                ch.exchange_delete(q)
                ch.close()
        left_q = broker_leftovers(state)
        if left_q:
            problems.append(f"broker queues still there: {left_q}")
    except Exception as e:
        problems.append(f"could not delete the queues {state['queues']} on {_redact(state['broker'])}: {e}")
    try:
        r = _redis(state["backend"])
        keys = list(r.scan_iter(match=f"{state['queue_prefix']}*", count=1000))
        if keys:
            r.delete(*keys)
    except Exception as e:
        problems.append(f"could not delete result keys {state['queue_prefix']}* in {_redact(state['backend'])}: {e}")
    if drop_databases:
        try:
            conn = _pg(state["postgres"])
            with conn.cursor() as cur:
                for name in state["databases"].values():
                    cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.close()
        except Exception as e:
            problems.append(f"could not drop databases {list(state['databases'].values())}: {e}")
    if problems:  # the state stays: a second `down` retries what is left
        raise FleetError(f"fleet {state['id']} is down with problems (run `dfkd fleet down` again to retry): " + "; ".join(problems))
    (fleet_dir / "fleet.json").rename(fleet_dir / f"fleet.{state['id']}.down.json")
    log(f"fleet {state['id']} down: {len(order)} process group(s) ended" + (f", {len(stray)} stray process(es) killed" if stray else "")
        + f"; queues {', '.join(state['queues'])} deleted" + ("; databases dropped" if drop_databases else ""))
    return {"stray": stray}


def status(fleet_dir: str | Path = "storage/fleet", log=print) -> dict | None:
    state = read_state(Path(fleet_dir).resolve())
    if state is None:
        log(f"no fleet in {fleet_dir}")
        return None
    for name, p in state["processes"].items():
        log(f"{name:12s} pid {p['pid']:>7d}  {'up' if _group_alive(p['pgid']) else 'DOWN'}  log {p['log']}")
    log(f"Dagster {state['webserver']}  MLflow {state['mlflow']}  queues {', '.join(state['queues'])}")
    return state


def fleet_env(state: dict) -> dict:
    """Environment for a client of the fleet (e.g. `dagster` CLI against its instance)."""
    return {**os.environ, **state["env"], "DAGSTER_PG_URL": _db_url(state["postgres"], state["databases"]["dagster"])}
