"""A live fleet on this machine's services (`dfkd fleet up`): Dagster and MLflow on Postgres, two
dagster-celery workers on RabbitMQ (through a TCP relay of the test's own, so the broker can be cut
without touching RabbitMQ), results in Redis. One fleet serves the module's tests, in file order:
backfill on two workers with one killed mid-class, distil/evaluate/promote, a run whose worker died,
a broker outage mid-backfill, and `fleet down` leaving nothing behind."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml

from conftest import ROOT, make_workspace

pytestmark = pytest.mark.slow

SYNTH = {"images_per_class": 6, "iterations": 10, "cutn": 8, "image_size": 32, "batch_size": 2}  # 3 batches per class


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Relay:
    """A TCP relay 127.0.0.1:<port> -> 127.0.0.1:<target>; `cut()` drops every connection and refuses new ones."""

    def __init__(self, target: int):
        self.target, self.port = target, _free_port()
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.listener = None
        self.restore()

    def restore(self):
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(64)
        self.listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()

    def _accept(self, ls):
        while True:
            try:
                c, _ = ls.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                c.close()
                continue
            u.settimeout(None)
            with self.lock:
                self.conns += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() thread; close() alone leaves the port bound
        except OSError:
            pass
        self.listener.close()
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    from dfkd_assets.config import load_config
    from dfkd_assets.tools import fleet as fl

    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=2).close()
    except OSError:
        pytest.skip("no RabbitMQ on 127.0.0.1:5672 (as on the CI machine)")
    tmp = tmp_path_factory.mktemp("fleet")
    relay = Relay(5672)
    cfg_path = make_workspace(tmp, {
        "mlflow": {"tracking_uri": f"http://127.0.0.1:{_free_port()}", "artifact_location": None, "registered_model_name": "dfkd-fleet"},
        "synthesis": {**yaml.safe_load((ROOT / "configs" / "ci.yaml").read_text())["synthesis"], **SYNTH},
    })
    t0 = time.time()
    state = fl.up(cfg_path, workers=2, fleet_dir=tmp / "fleet", broker=f"amqp://guest:guest@127.0.0.1:{relay.port}//")
    print(f"fleet up in {time.time() - t0:.1f}s")
    saved = {k: os.environ.get(k) for k in ("DAGSTER_PG_URL", "DAGSTER_HOME")}
    os.environ.update({k: v for k, v in fl.fleet_env(state).items() if k in saved})
    from dagster_graphql import DagsterGraphQLClient

    instance = dg.DagsterInstance.get()
    client = DagsterGraphQLClient("127.0.0.1", port_number=state["webserver_port"])
    try:
        yield {"state": state, "instance": instance, "client": client, "cfg": load_config(cfg_path), "cfg_path": cfg_path,
               "relay": relay, "tmp": tmp}
    finally:
        instance.dispose()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        if fl.read_state(tmp / "fleet"):
            try:  # a fresh relay so `down` reaches the broker to delete the queues
                relay.cut()
                relay.restore()
            except OSError as e:
                print(f"relay restore failed: {e}")
            fl.down(tmp / "fleet", drop_databases=True)
        relay.cut()


def _launch(f, job: str, partition: str | None = None, overrides: dict | None = None) -> str:
    run_config = {"resources": {"settings": {"config": {"overrides": overrides}}}} if overrides else None
    return f["client"].submit_job_execution(job, run_config=run_config, tags={"dagster/partition": partition} if partition else None)


def _wait(f, run_ids, timeout: float, ok=(dg.DagsterRunStatus.SUCCESS,)) -> dict:
    deadline = time.time() + timeout
    while True:
        runs = {r: f["instance"].get_run_by_id(r) for r in run_ids}
        if all(r.status in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED) for r in runs.values()):
            break
        assert time.time() < deadline, {k: r.status for k, r in runs.items()}
        time.sleep(1)
    bad = {k: (r.status, _messages(f, k)[-5:]) for k, r in runs.items() if r.status not in ok}
    assert not bad, bad
    return runs


def _events(f, run_id, kind=None):
    return [e for e in f["instance"].all_logs(run_id, of_type=kind) if e.dagster_event]


def _messages(f, run_id) -> list[str]:
    """Each event's message and, where the event carries one, its error with the cause chain (the
    broker's exception is there, not in the message: "Encountered error during celery task submission")."""
    out = []
    for e in _events(f, run_id):
        out.append(e.dagster_event.message or "")
        error = getattr(e.dagster_event.event_specific_data, "error", None)
        if error is not None:
            out.append(error.to_string())
    return out


def _celery_workers(f, run_id) -> list[str]:
    """The Celery worker name of each time a step of the run was executed (dagster-celery's engine event)."""
    out = []
    for e in _events(f, run_id, dg.DagsterEventType.ENGINE_EVENT):
        if "in celery worker" in (e.dagster_event.message or ""):
            out.append(e.dagster_event.engine_event_data.metadata["Celery worker"].value)
    return out


def _materialization_meta(f, run_id) -> dict:
    evs = _events(f, run_id, dg.DagsterEventType.ASSET_MATERIALIZATION)
    assert evs, f"run {run_id} has no materialization"
    return {k: v.value for k, v in evs[-1].dagster_event.step_materialization_data.materialization.metadata.items()}


def _step_pids(f, run_id) -> list[int]:
    return [e.dagster_event.pid for e in _events(f, run_id, dg.DagsterEventType.STEP_START)]


def test_backfill_runs_on_two_workers_and_survives_a_worker_killed_mid_class(fleet):
    from dfkd_assets import artifacts
    from dfkd_assets.defs.jobs import PREPARE, SYNTHESIZE
    from dfkd_assets.tools import fleet as fl

    f, cfg, state = fleet, fleet["cfg"], fleet["state"]
    t0 = time.time()
    _wait(f, [_launch(f, PREPARE)], 600)
    t_prep = time.time() - t0
    runs = {c: _launch(f, SYNTHESIZE, c) for c in cfg.classes}  # one run per class partition: what a backfill launches
    # the victim: a class with a finished batch (of 3) whose step is still running
    victim = pid = None
    deadline = time.time() + 240
    while victim is None:
        assert time.time() < deadline, "no class ever had a finished batch while its step ran"
        for c, rid in runs.items():
            batches = list(artifacts.class_work_dir(cfg, c).glob("batch_*.npz"))
            pids = _step_pids(f, rid)
            if 1 <= len(batches) < 3 and pids and not _events(f, rid, dg.DagsterEventType.STEP_SUCCESS):
                victim, pid = c, pids[-1]
                break
        time.sleep(0.2)
    name = fl.worker_for_pid(state, pid)
    assert name is not None, f"step pid {pid} is in no worker's process group"
    fl.kill_worker(state, name)  # kill -9 of the worker's whole process group (Celery main process and its pool child)
    kept = sorted(p.name for p in artifacts.class_work_dir(cfg, victim).glob("batch_*.npz"))
    assert kept, "the finished batches of the killed step are gone"
    fl.start_worker(state, name)  # the step is re-delivered (acks_late) to whichever worker is free first

    # the same class on one machine, same settings (multiprocess executor, SQLite instance), for the byte comparison
    ref = f["tmp"] / "reference"
    (ref / "home").mkdir(parents=True)
    shutil.copy(ROOT / "dagster_home" / "dagster.yaml", ref / "home" / "dagster.yaml")
    ref_cfg = yaml.safe_load(Path(f["cfg_path"]).read_text())
    ref_cfg["workspace"] = str(ref / "ws")
    for sub in ("teacher_head", "prompt_bank"):
        shutil.copytree(cfg.path(sub), ref / "ws" / "data" / sub)
    (ref / "settings.yaml").write_text(yaml.safe_dump(ref_cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DFKD_", "DAGSTER_"))}
    env.update(DAGSTER_HOME=str(ref / "home"), DFKD_CONFIG=str(ref / "settings.yaml"))
    one_machine = subprocess.Popen([sys.executable, "-m", "dagster", "asset", "materialize", "-m", "dfkd_assets.definitions",
                                    "--select", "synthetic_images", "--partition", victim],
                                   cwd=ref, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait(f, list(runs.values()), 300)
    t_synth = time.time() - t0 - t_prep
    out = one_machine.communicate(timeout=300)[0]
    assert one_machine.returncode == 0, out[-3000:]

    # steps ran on at least two worker processes, and the victim's step twice (killed, then re-delivered)
    workers = {w for rid in runs.values() for w in _celery_workers(f, rid)}
    pids = {p for rid in runs.values() for p in _step_pids(f, rid)}
    assert len(workers) >= 2 and len(pids) >= 2, (workers, pids)
    assert len(_celery_workers(f, runs[victim])) == 2 and pid in _step_pids(f, runs[victim])[:1]
    meta = _materialization_meta(f, runs[victim])
    assert meta["resumed_images"] >= len(kept) * SYNTH["batch_size"], (meta["resumed_images"], kept)
    # byte-identical shard and manifest records
    m = artifacts.verify_class_shard(cfg, victim)
    ref_dir = ref / "ws" / "data" / "synthetic" / victim
    ref_m = json.loads((ref_dir / "manifest.json").read_text())
    assert (cfg.class_dir(victim) / m["shard"]).read_bytes() == (ref_dir / ref_m["shard"]).read_bytes()
    assert m["images"] == ref_m["images"] and m["shard_sha256"] == meta["shard_sha256"]
    assert not artifacts.class_work_dir(cfg, victim).exists()
    print(f"prepare {t_prep:.1f}s, backfill of {len(runs)} classes with a kill {t_synth:.1f}s; workers {sorted(workers)}; "
          f"victim {victim} on {name}, {len(kept)} batch(es) kept")


def test_distill_evaluate_promote_through_the_fleet(fleet):
    import mlflow

    from dfkd_assets.defs.jobs import TRAIN

    f, cfg = fleet, fleet["cfg"]
    t0 = time.time()
    rid = _launch(f, TRAIN)
    _wait(f, [rid], 420)
    steps = {e.dagster_event.step_key for e in _events(f, rid, dg.DagsterEventType.STEP_SUCCESS)}
    assert {"synthetic_dataset", "student_model", "evaluation_report", "champion_student"} <= steps
    assert len(_celery_workers(f, rid)) >= len(steps)  # every step went through a Celery worker
    client = mlflow.MlflowClient(f["state"]["mlflow"], f["state"]["mlflow"])
    champ = client.get_model_version_by_alias("dfkd-fleet", "champion")
    assert str(champ.version) == "1" and client.get_run(champ.run_id).info.status == "FINISHED"
    # the DVC remote holds the snapshot: the directory listing and every file it names
    outs = yaml.safe_load(cfg.path("synthetic.dvc").read_text())["outs"][0]
    remote = Path(f["tmp"] / "remote")
    md5 = outs["md5"]
    listing = remote / "files" / "md5" / md5[:2] / md5[2:]
    assert listing.is_file(), sorted(str(p) for p in remote.rglob("*"))[:20]
    files = json.loads(listing.read_text())
    assert len(files) >= len(cfg.classes) * 2
    for entry in files:
        assert (remote / "files" / "md5" / entry["md5"][:2] / entry["md5"][2:]).is_file(), entry
    # DVC writes are serialized across workers: pool `dvc` has one slot on the fleet's instance and the asset uses it
    assert f["instance"].event_log_storage.get_concurrency_info("dvc").slot_count == 1
    print(f"distill_evaluate_promote on the fleet: {time.time() - t0:.1f}s")


def _dies_and_is_reaped(f, rid, pid, needle: str) -> tuple[float, float]:
    """kill -9 `pid` (the run's worker); wait until the run is FAILURE with a message containing `needle`
    and its pool slots are free; (seconds to failed, seconds to freed)."""
    assert rid in f["instance"].event_log_storage.get_concurrency_run_ids(), "the run holds no pool slot"
    t0 = time.time()
    os.kill(pid, signal.SIGKILL)
    while f["instance"].get_run_by_id(rid).status != dg.DagsterRunStatus.FAILURE:
        assert time.time() - t0 < 90, "the run whose worker died was never marked failed"
        time.sleep(0.5)
    t_failed = time.time() - t0
    assert any(needle in m for m in _messages(f, rid)), _messages(f, rid)[-3:]
    while rid in f["instance"].event_log_storage.get_concurrency_run_ids():
        assert time.time() - t0 < 90, "the dead run's pool slots were never freed"
        time.sleep(0.5)
    return t_failed, time.time() - t0


def test_a_run_whose_worker_died_is_failed_and_frees_its_slots(fleet):
    from dfkd_assets.defs.jobs import SYNTHESIZE
    from dfkd_assets.defs.runner import HOST_TAG

    f, cfg = fleet, fleet["cfg"]
    c = cfg.classes[0]
    over = {"synthesis": {"seed": 7}}  # a new fingerprint: real work
    # (a) a run the daemon launched: its worker (a child of the code server) is killed while its step is on a Celery worker
    rid = _launch(f, SYNTHESIZE, c, overrides=over)
    deadline = time.time() + 180
    while not any("Submitting celery task" in m for m in _messages(f, rid)):  # it holds its gpu slot now
        assert time.time() < deadline and f["instance"].get_run_by_id(rid).status != dg.DagsterRunStatus.FAILURE
        time.sleep(0.3)
    run_pid = _events(f, rid, dg.DagsterEventType.RUN_START)[0].dagster_event.pid
    # the code server sees its child die first; LocalRunLauncher's health check would otherwise
    a = _dies_and_is_reaped(f, rid, run_pid, "")
    assert any(str(run_pid) in m or "exited" in m for m in _messages(f, rid)), _messages(f, rid)[-3:]
    # the partition is usable again (one run per partition at a time: a STARTED zombie would block this forever)
    _wait(f, [_launch(f, SYNTHESIZE, c, overrides=over)], 240)
    # (b) a run no server watches: executed in a process of its own on this host against the Postgres
    # instance (as `dfkd run` does), killed mid-step; only the daemon's run monitoring
    # (LocalRunLauncher.check_run_worker_health) can fail it
    script = ("import socket, dagster as dg\n"
              "from dfkd_assets.definitions import build_defs\n"
              "job = build_defs().resolve_job_def('synthesize_class')\n"
              "with dg.DagsterInstance.get() as inst:\n"
              f"    job.execute_in_process(instance=inst, partition_key={cfg.classes[1]!r}, tags={{{HOST_TAG!r}: socket.gethostname()}},\n"
              "        run_config={'resources': {'settings': {'config': {'overrides': {'synthesis': {'seed': 8}}}}}})\n")
    from dfkd_assets.tools import fleet as fl

    env = {k: v for k, v in fl.fleet_env(f["state"]).items() if k != "DFKD_EXECUTOR"}
    before = {r.run_id for r in f["instance"].get_runs()}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while True:
        new = [r for r in f["instance"].get_runs() if r.run_id not in before]
        if new and _step_pids(f, new[0].run_id):
            break
        assert proc.poll() is None and time.time() < deadline, "the in-process run never started its step"
        time.sleep(0.3)
    b = _dies_and_is_reaped(f, new[0].run_id, proc.pid, f"pid {proc.pid}")
    proc.wait(timeout=10)
    print(f"launched run: failed after {a[0]:.1f}s, slots freed after {a[1]:.1f}s; "
          f"unwatched run: failed after {b[0]:.1f}s, slots freed after {b[1]:.1f}s")


def test_broker_outage_mid_backfill_fails_clearly_or_recovers_and_keeps_the_shards(fleet):
    from dfkd_assets import artifacts
    from dfkd_assets.defs.jobs import SYNTHESIZE

    f, cfg = fleet, fleet["cfg"]
    over = {"synthesis": {"seed": 11}}
    runs = {c: _launch(f, SYNTHESIZE, c, overrides=over) for c in cfg.classes}
    deadline = time.time() + 180
    while not any(_step_pids(f, r) for r in runs.values()):
        assert time.time() < deadline
        time.sleep(0.3)
    f["relay"].cut()
    time.sleep(6)
    f["relay"].restore()
    finished = _wait(f, list(runs.values()), 360, ok=(dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE))
    failed = [c for c, r in runs.items() if finished[r].status == dg.DagsterRunStatus.FAILURE]
    for c in failed:  # a failure names the broker connection, not something vague
        text = "\n".join(_messages(f, runs[c]))
        assert any(w in text.lower() for w in ("connection", "broker", "amqp", "socket")), text[-2000:]
    retried = {c: _launch(f, SYNTHESIZE, c, overrides=over) for c in failed}
    _wait(f, list(retried.values()), 300)
    latest = {**runs, **retried}
    for c in cfg.classes:  # every shard verifies and is the one the latest successful run recorded
        m = artifacts.verify_class_shard(cfg, c)
        assert m["shard_sha256"] == _materialization_meta(f, latest[c])["shard_sha256"]
    print(f"broker cut 6s mid-backfill: failed {failed or 'none'}, the rest recovered")


def test_no_store_url_reaches_a_process_argv_or_the_state_file(fleet):
    """The MLflow server gets its database URL from the environment (MLFLOW_BACKEND_STORE_URI): argv is
    world-readable (/proc/<pid>/cmdline, ps), and the state file records each process's command."""
    from dfkd_assets.tools import fleet as fl

    state = fl.read_state(fleet["state"]["dir"])
    for name, p in state["processes"].items():
        argv = Path(f"/proc/{p['pid']}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        assert "postgresql" not in argv and "postgresql" not in " ".join(p["cmd"]), name
    assert (Path(state["dir"]) / "fleet.json").stat().st_mode & 0o777 == 0o600


def test_fleet_down_leaves_no_process_queue_or_result_key(fleet):
    from dfkd_assets.tools import fleet as fl

    state = fleet["state"]
    t0 = time.time()
    fl.down(state["dir"], drop_databases=True)
    print(f"fleet down in {time.time() - t0:.1f}s")
    assert fl.fleet_processes(state["id"]) == []
    assert fl.broker_leftovers(state) == [] and fl.redis_leftovers(state) == []
    for p in state["processes"].values():
        with pytest.raises(ProcessLookupError):
            os.killpg(p["pgid"], 0)
    import psycopg2

    conn = psycopg2.connect(state["postgres"])
    with conn.cursor() as cur:
        cur.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (f"dfkd_fleet_{state['id']}%",))
        assert cur.fetchall() == []
    conn.close()
    if shutil.which("rabbitmqctl") and os.geteuid() == 0:  # the whole broker, where this user may list it
        out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name"], capture_output=True, text=True, timeout=60).stdout
        assert state["queue_prefix"] not in out


def test_fleet_up_names_the_setting_when_the_broker_is_unreachable(tmp_path):
    from dfkd_assets.tools import fleet as fl

    cfg_path = make_workspace(tmp_path, {"mlflow": {"tracking_uri": f"http://127.0.0.1:{_free_port()}", "artifact_location": None}})
    dead = _free_port()  # nothing listens there
    with pytest.raises(fl.FleetError, match=rf"broker unreachable at amqp://guest:\*\*\*@127.0.0.1:{dead}//.*--broker / \$DFKD_CELERY_BROKER"):
        fl.up(cfg_path, workers=1, fleet_dir=tmp_path / "fleet", broker=f"amqp://guest:guest@127.0.0.1:{dead}//")
    assert not (tmp_path / "fleet" / "fleet.json").exists()  # nothing was started or created
    bad = yaml.safe_load(cfg_path.read_text())
    bad["mlflow"]["tracking_uri"] = "http://mlflow.example:5000"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(fl.FleetError, match="mlflow.tracking_uri is 'http://mlflow.example:5000'"):
        fl.up(tmp_path / "bad.yaml", workers=1, fleet_dir=tmp_path / "fleet2")


def test_down_signals_only_groups_that_hold_the_fleets_processes_and_keeps_state_on_failure(tmp_path):
    """A process group id read from a stale state file may belong to someone else by now: `down`
    signals only groups holding a process that carries the fleet's id. The state file is 0600 (it
    holds store passwords). When `down` cannot finish, it keeps the state, so a second `down`
    retries instead of answering "no fleet"."""

    from dfkd_assets.tools import fleet as fl

    fid = "t" + os.urandom(4).hex()
    foreign = subprocess.Popen(["sleep", "120"], start_new_session=True)
    ours = subprocess.Popen(["sleep", "120"], start_new_session=True, env={**os.environ, fl.FLEET_ENV: fid})
    try:
        state = {"id": fid, "broker": fl.DEFAULT_BROKER, "backend": fl.DEFAULT_BACKEND, "queues": [], "queue_prefix": f"dfkd-{fid}",
                 "databases": {}, "postgres": fl.DEFAULT_POSTGRES,
                 "processes": {"worker1": {"pid": foreign.pid, "pgid": foreign.pid, "log": str(tmp_path / "w1.log")},
                               "worker2": {"pid": ours.pid, "pgid": ours.pid, "log": str(tmp_path / "w2.log")}}}
        fl.write_state(tmp_path, state)
        assert (tmp_path / "fleet.json").stat().st_mode & 0o777 == 0o600
        assert fl.owned_groups(fid, [foreign.pid, ours.pid]) == [ours.pid]

        fl.write_state(tmp_path, {**state, "backend": "redis://127.0.0.1:1/0"})  # a result backend nobody serves: down fails
        with pytest.raises(fl.FleetError, match="run `dfkd fleet down` again"):
            fl.down(tmp_path, grace_s=2, log=lambda _: None)
        assert (tmp_path / "fleet.json").is_file()  # kept for the retry
        assert ours.wait(timeout=15) is not None and foreign.poll() is None  # the fleet's process ended, the stranger's did not

        fl.write_state(tmp_path, state)
        fl.down(tmp_path, grace_s=2, log=lambda _: None)
        assert not (tmp_path / "fleet.json").exists() and foreign.poll() is None
    finally:
        for p in (foreign, ours):
            if p.poll() is None:
                p.kill()
                p.wait()
