"""Faults and numerics: after a crash, a store outage, a full disk, a race or a NaN the pipeline keeps
what was finished, publishes nothing partial, and resumes or fails naming the cause; with real
processes, real signals and real stores.

kill -9 during synthesis and during distillation, an `mlflow server` killed in the middle of a
training run, a missing or read-only DVC remote, a full disk (RLIMIT_FSIZE) under a shard and a
checkpoint, two runs of one class and two promotions at once, NaN in synthesis. Each case is
listed with its result in docs/RELIABILITY.md (## Faults).

The tiny CI settings (configs/ci.yaml, vanilla prompts) throughout: the prompt bank and the three
class shards are made once per module and copied into each test's workspace, so a test pays only
for its fault.
"""

import contextlib
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
import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT, TINY_CLIP, TINY_VQGAN, make_workspace
from core_settings import distill_settings, synthesis_settings

IN_PROCESS = json.dumps({"execution": {"config": {"in_process": {}}}})


# ---------------------------------------------------------------- helpers

def _merge(into: dict, extra: dict) -> dict:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v
    return into


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A workspace with teacher head, prompt bank and the three class shards, made once."""
    from dfkd_assets.definitions import build_defs
    from dfkd_assets.defs.jobs import PREPARE, SYNTHESIZE

    tmp = tmp_path_factory.mktemp("base")
    cfg_path = make_workspace(tmp, {"prompts": {"method": "vanilla"}})  # no prompt learning: faults do not depend on it
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAGSTER_HOME", str(tmp / "dagster_home"))
        defs = build_defs(cfg_path)
        with dg.DagsterInstance.get() as instance:
            assert defs.resolve_job_def(PREPARE).execute_in_process(instance=instance).success
            for key in ("dog", "elephant", "house"):
                assert defs.resolve_job_def(SYNTHESIZE).execute_in_process(instance=instance, partition_key=key).success
    return tmp


def clone(base: Path, dest: Path, overrides: dict | None = None) -> Path:
    """A copy of the base workspace under `dest` (own DVC remote, MLflow store and Dagster home); returns its settings file."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(base / "ws", dest / "ws", ignore=shutil.ignore_patterns("storage", ".work"))
    raw = yaml.safe_load((base / "settings.yaml").read_text())
    raw["workspace"] = str(dest / "ws")
    raw["dvc"] = {"remote_url": str(dest / "remote")}
    _merge(raw, overrides or {})
    path = dest / "settings.yaml"
    path.write_text(yaml.safe_dump(raw))
    home = dest / "dagster_home"
    home.mkdir(exist_ok=True)
    shutil.copy(ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    return path


def _env(cfg_path: Path, home: Path) -> dict:
    # same intra-op thread count as this process: float reductions, hence images, depend on it
    return {**os.environ, "DAGSTER_HOME": str(home), "DFKD_CONFIG": str(cfg_path), "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": str(torch.get_num_threads())}


@pytest.fixture()
def procs():
    """Processes a test starts, each in its own process group; whatever is left is killed at the end."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)


def _materialize(procs: list, env: dict, log: Path, *args: str) -> subprocess.Popen:
    """`dagster asset materialize` in a process group of its own (so kill -9 reaches all of it)."""
    with open(log, "w") as out:
        p = subprocess.Popen(
            [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "dfkd_assets.definitions", "--config-json", IN_PROCESS, *args],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    procs.append(p)
    return p


def _wait_until(cond, procs: list, logs: list[Path], timeout: float, what: str, poll: float = 0.01):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        for p, log in zip(procs, logs):
            if p.poll() is not None:
                pytest.fail(f"process exited ({p.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(poll)


def _kill_9(p: subprocess.Popen) -> None:
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _latest_metadata(instance, key: str, n: int = 1) -> list[dict]:
    recs = instance.fetch_materializations(dg.AssetKey(key), limit=n).records
    return [{k: v.value for k, v in r.asset_materialization.metadata.items()} for r in recs]


def _shard_files(cfg) -> dict[str, bytes]:
    """Every file of every class shard folder (shard + manifest), by path."""
    return {str(p.relative_to(cfg.synthetic_dir)): p.read_bytes() for p in sorted(cfg.synthetic_dir.glob("*/*")) if p.is_file()}


# ---------------------------------------------------------------- kill -9

def _reap_the_killed_run(instance) -> None:
    """The killed run is still STARTED and holds the `gpu` pool's only slot: without the reaper
    (`dfkd run` calls it first) the re-run's GPU step would wait for it forever."""
    from dfkd_assets.defs.runner import reap_dead_runs

    (killed,) = [r.run_id for r in instance.get_runs() if r.status == dg.DagsterRunStatus.STARTED]
    assert [s.run_id for s in instance.event_log_storage.get_concurrency_info("gpu").claimed_slots] == [killed]
    assert reap_dead_runs(instance, log=lambda m: None) == [killed]
    assert instance.get_run_by_id(killed).status == dg.DagsterRunStatus.FAILURE
    assert not instance.event_log_storage.get_concurrency_info("gpu").claimed_slots


@pytest.mark.slow
def test_kill_9_during_synthesis_keeps_finished_batches_and_the_shard_is_byte_identical(base, tmp_path, monkeypatch, procs):
    """A class run killed after its first batch: the re-run keeps the finished batches (counted in the
    materialization) and writes the same shard and manifest, byte for byte, as an uninterrupted run."""
    from dfkd_assets.config import load_config
    from dfkd_assets.core.io import read_shard
    from dfkd_assets.definitions import build_defs
    from dfkd_assets.defs.jobs import SYNTHESIZE

    # 8 batches of one image: after the first, seven batches' time for the kill to land
    cfg_path = clone(base, tmp_path, {"synthesis": {"iterations": 16, "batch_size": 1}})
    cfg = load_config(cfg_path)
    home = tmp_path / "dagster_home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    job = build_defs(cfg_path).resolve_job_def(SYNTHESIZE)
    shard_dir, work = cfg.class_dir("dog"), cfg.work_dir / "synthetic" / "dog"
    with dg.DagsterInstance.get() as instance:
        assert job.execute_in_process(instance=instance, partition_key="dog").success  # uninterrupted
        assert _latest_metadata(instance, "synthetic_images")[0]["resumed_images"] == 0
    reference = {n: (shard_dir / n).read_bytes() for n in ("images.tar", "manifest.json")}
    shutil.rmtree(shard_dir)

    log = tmp_path / "killed.log"
    p = _materialize(procs, _env(cfg_path, home), log, "--select", "synthetic_images", "--partition", "dog")
    _wait_until(lambda: list(work.glob("batch_*.npz")), [p], [log], 300, "the first finished batch")
    _kill_9(p)
    kept = sorted(work.glob("batch_*.npz"))
    assert 1 <= len(kept) < 8, f"the kill should land between batches, found {len(kept)} of 8"
    assert not shard_dir.exists()  # nothing of the class was published
    # what a kill during the shard's own (atomic) write leaves: a temp file, never a partial images.tar
    shard_dir.mkdir()
    (shard_dir / ".images.tar.k9xq2v.tmp").write_bytes(reference["images.tar"][:1000])

    with dg.DagsterInstance.get() as instance:  # the re-run, as `dfkd run` makes it (the class lock died with the run)
        _reap_the_killed_run(instance)
        assert job.execute_in_process(instance=instance, partition_key="dog").success
        meta = _latest_metadata(instance, "synthetic_images")[0]
    assert meta["resumed_images"] == len(kept)  # finished batches were kept, not recomputed
    assert {n: (shard_dir / n).read_bytes() for n in reference} == reference
    assert sorted(p.name for p in shard_dir.iterdir()) == ["images.tar", "manifest.json"]  # the stale temp file is gone
    images, manifest = read_shard(shard_dir)
    assert len(images) == 8 and not work.exists()


@pytest.mark.slow
def test_kill_9_during_distillation_resumes_from_the_last_checkpoint(base, tmp_path, monkeypatch, procs):
    """student_model killed after its first epoch checkpoint: the re-run starts at that epoch (its
    MLflow run logs only the epochs after it) and ends with the weights and history of an
    uninterrupted run, bit for bit."""
    from mlflow import MlflowClient
    from safetensors.torch import load_file

    from dfkd_assets.config import load_config
    from dfkd_assets.core.student import WEIGHTS
    from dfkd_assets.definitions import build_defs
    from dfkd_assets.defs.jobs import TRAIN
    from dfkd_assets.defs.resources import MlflowTracking

    epochs = 12
    cfg_path = clone(base, tmp_path, {"distill": {"epochs": epochs, "batch_size": 8}})
    cfg = load_config(cfg_path)
    home = tmp_path / "dagster_home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    job = build_defs(cfg_path).resolve_job_def(TRAIN)
    student_dir, ckpt = cfg.path("student"), cfg.work_dir / "student" / "last.pt"
    with dg.DagsterInstance.get() as instance:
        assert job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("synthetic_dataset")]).success
        assert job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("student_model")]).success  # uninterrupted
    reference = load_file(student_dir / WEIGHTS)
    reference_history = (student_dir / "history.csv").read_text()
    shutil.rmtree(ckpt.parent)  # the killed run starts from scratch too

    log = tmp_path / "killed.log"
    p = _materialize(procs, _env(cfg_path, home), log, "--select", "student_model")
    _wait_until(ckpt.is_file, [p], [log], 300, "the first epoch checkpoint")
    _kill_9(p)
    k = torch.load(ckpt, weights_only=True)["epoch"]
    assert 1 <= k < epochs, f"the kill should land during training, checkpoint is at epoch {k} of {epochs}"

    with dg.DagsterInstance.get() as instance:
        _reap_the_killed_run(instance)
        assert job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("student_model")]).success
        meta = _latest_metadata(instance, "student_model")[0]
    client: MlflowClient = MlflowTracking().client(cfg)
    logged = sorted(m.step for m in client.get_metric_history(meta["mlflow_run_id"], "kd_loss"))
    assert logged == list(range(k + 1, epochs + 1))  # resumed at epoch k, not restarted
    assert meta["epochs"] == epochs and (student_dir / "history.csv").read_text() == reference_history
    resumed = load_file(student_dir / WEIGHTS)
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[n], reference[n]) for n in reference)


# ---------------------------------------------------------------- MLflow server

class MlflowServer:
    """A real `mlflow server` (SQLite backend, local artifacts) on 127.0.0.1, stopped with kill -9."""

    def __init__(self, root: Path, port: int):
        self.root, self.port, self.proc = root, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.log = open(self.root / "server.log", "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert self.proc.poll() is None and time.monotonic() < deadline, (self.root / "server.log").read_text()[-2000:]
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # server, uvicorn worker and job runner
            self.proc.wait(timeout=30)
            self.log.close()


def _train_job():
    """TRAIN for $DFKD_CONFIG, reconstructable (a re-execution from failure needs one)."""
    from dfkd_assets.definitions import build_defs
    from dfkd_assets.defs.jobs import TRAIN

    return build_defs(os.environ["DFKD_CONFIG"]).resolve_job_def(TRAIN)


@pytest.mark.slow
def test_mlflow_server_stopped_mid_run_fails_clearly_and_a_retry_after_restart_succeeds(base, tmp_path, monkeypatch):
    """The tracking server dies right after the student is registered (v2): evaluation fails naming the
    server, retries included; an outage is never read as "no champion"; v2 cannot be promoted
    unevaluated; after a restart, re-executing the failed run evaluates and promotes v2.
    (tests/test_operations.py checks the retry count against a port nobody listens on.)"""
    from mlflow.exceptions import MlflowException

    from dfkd_assets.config import load_config
    from dfkd_assets.definitions import build_defs
    from dfkd_assets.defs.jobs import TRAIN
    from dfkd_assets.defs.resources import MlflowTracking

    server = MlflowServer(tmp_path / "mlflow", _free_port())
    cfg_path = clone(base, tmp_path, {
        "mlflow": {"tracking_uri": server.uri, "artifact_location": None, "registered_model_name": "dfkd-outage"},
        "operations": {"max_retries": 1, "retry_delay_s": 0},
        "promotion": {"tolerance": 1.0},  # every evaluated challenger is promoted: only the outage can stop v2
    })
    cfg = load_config(cfg_path)
    name = "dfkd-outage"
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.setenv("DFKD_CONFIG", str(cfg_path))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail in seconds, not after MLflow's own backoff
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    tracking = MlflowTracking()
    job = build_defs(cfg_path).resolve_job_def(TRAIN)
    upto_champion = [dg.AssetKey(k) for k in ("synthetic_dataset", "student_model", "evaluation_report", "champion_student")]  # no ONNX export
    server.start()
    try:
        with dg.DagsterInstance.get() as instance:
            assert job.execute_in_process(instance=instance, asset_selection=upto_champion).success
            assert tracking.alias_version(cfg, "champion") == "1"

            registry_json = cfg.path("student") / "registry.json"
            stopped = threading.Event()

            def stop_after_v2_is_registered():
                while not stopped.is_set():
                    with contextlib.suppress(OSError, ValueError, KeyError):
                        if json.loads(registry_json.read_text())["version"] == "2":
                            server.stop()
                            stopped.set()
                    time.sleep(0.01)

            watcher = threading.Thread(target=stop_after_v2_is_registered, daemon=True)
            watcher.start()
            failed = job.execute_in_process(instance=instance, asset_selection=upto_champion, raise_on_error=False)
            stopped.set()
            watcher.join(timeout=10)
            assert server.proc.poll() is not None, "the server was never stopped"
            assert not failed.success and failed.asset_materializations_for_node("student_model")
            assert not failed.asset_materializations_for_node("champion_student")
            err = failed.failure_data_for_node("evaluation_report").error
            assert f"MLflow tracking server {server.uri} is unreachable" in err.to_string()
            kinds = [e.dagster_event.event_type_value for e in instance.all_logs(failed.run_id) if e.dagster_event and e.step_key == "evaluation_report"]
            assert kinds.count("STEP_UP_FOR_RETRY") == 1 and "STEP_FAILURE" in kinds  # retried once (transient), then failed
            with pytest.raises(MlflowException, match=f"127.0.0.1:{server.port}"):
                tracking.alias_version(cfg, "champion")  # an outage is an error, not "no champion"

            server.start()  # same store, same port
            client = tracking.client(cfg)
            assert tracking.alias_version(cfg, "champion") == "1" and tracking.alias_version(cfg, "challenger") == "2"
            assert "evaluated_student_mean_top1" not in client.get_model_version(name, "2").tags

            # metrics.json naming v2 while the registry never saw its evaluation (an outage after the
            # file was written): promotion refuses, whatever the file says
            metrics_path = cfg.path("reports") / "metrics.json"
            metrics = json.loads(metrics_path.read_text())
            metrics_path.write_text(json.dumps({**metrics, "challenger_version": "2", "champion_version": "1"}))
            r = job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("champion_student")], raise_on_error=False)
            assert not r.success and "v2 has not passed evaluation" in r.failure_data_for_node("champion_student").error.message
            assert tracking.alias_version(cfg, "champion") == "1"

            retry = dg.execute_job(
                dg.reconstructable(_train_job), instance, run_config=json.loads(IN_PROCESS),
                reexecution_options=dg.ReexecutionOptions.from_failure(failed.run_id, instance),
            )
            assert retry.success
            assert not retry.asset_materializations_for_node("student_model")  # not retrained: the retry starts where it failed
        assert tracking.alias_version(cfg, "champion") == "2"
        for v in client.search_model_versions(f"name='{name}'"):
            if "champion" in v.aliases:
                assert "evaluated_student_mean_top1" in v.tags, f"v{v.version} is champion without evaluation"
    finally:
        server.stop()


@pytest.mark.slow
def _cloned_train_job(base: Path, tmp_path: Path, monkeypatch, model_name: str):
    """(settings file, settings, the train job) of a clone of the base workspace registering as `model_name`,
    retried up to twice, with this test's Dagster home and settings in the environment."""
    from dfkd_assets.config import load_config
    from dfkd_assets.definitions import build_defs
    from dfkd_assets.defs.jobs import TRAIN

    cfg_path = clone(base, tmp_path, {"mlflow": {"registered_model_name": model_name}, "operations": {"max_retries": 2}})
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.setenv("DFKD_CONFIG", str(cfg_path))
    return cfg_path, load_config(cfg_path), build_defs(cfg_path).resolve_job_def(TRAIN)


def test_evaluation_refuses_weights_that_are_not_the_recorded_versions(base, tmp_path, monkeypatch):
    """A training that wrote data/student/ and then failed before registering (an MLflow outage), or
    a second training in the workspace, leaves weights that no registered version has: evaluation
    alone must not score them under the recorded version's name. It fails at once (not retried),
    naming both sha256, writes no report and marks nothing evaluated; with the version's own
    weights back, it evaluates."""
    from safetensors.torch import load_file, save_file

    from dfkd_assets.defs.resources import MlflowTracking

    cfg_path, cfg, job = _cloned_train_job(base, tmp_path, monkeypatch, "dfkd-wrong-weights")
    with dg.DagsterInstance.get() as instance:
        assert job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey(k) for k in ("synthetic_dataset", "student_model")]).success
        weights = cfg.path("student") / "model.safetensors"
        good = weights.read_bytes()
        state = load_file(weights)
        first = next(iter(state))
        state[first] = state[first] + 1.0  # weights of some other training
        save_file(state, str(weights))
        r = job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("evaluation_report")], raise_on_error=False)
        assert not r.success
        err = r.failure_data_for_node("evaluation_report").error.to_string()
        assert "is not the model.safetensors of dfkd-wrong-weights v1" in err and "Re-materialize student_model" in err
        kinds = [e.dagster_event.event_type_value for e in instance.all_logs(r.run_id) if e.dagster_event and e.step_key == "evaluation_report"]
        assert "STEP_UP_FOR_RETRY" not in kinds
        client = MlflowTracking().client(cfg)
        assert "evaluated_student_mean_top1" not in client.get_model_version("dfkd-wrong-weights", "1").tags
        assert not (cfg.path("reports") / "metrics.json").exists()

        weights.write_bytes(good)
        assert job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("evaluation_report")]).success
        assert "evaluated_student_mean_top1" in client.get_model_version("dfkd-wrong-weights", "1").tags


def test_a_version_records_the_dvc_snapshot_it_was_trained_on_or_training_refuses(base, tmp_path, monkeypatch):
    """A class partition re-materialized after synthetic_dataset (other synthesis settings) changes
    the shards in data/synthetic but not the DVC snapshot: student_model must not train on them under
    the old dvc_hash. It fails at once, naming the class and the fix, registers nothing; after
    synthetic_dataset runs again it trains, and the version's dvc_hash lists exactly the manifests read."""
    import hashlib

    from dfkd_assets import artifacts
    from dfkd_assets.definitions import build_defs
    from dfkd_assets.defs.jobs import SYNTHESIZE
    from dfkd_assets.defs.resources import DvcRepo, MlflowTracking

    cfg_path, cfg, job = _cloned_train_job(base, tmp_path, monkeypatch, "dfkd-stale-snapshot")
    with dg.DagsterInstance.get() as instance:
        assert job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("synthetic_dataset")]).success
        old_hash = artifacts.read_snapshot_hash(cfg)
        raw = yaml.safe_load(cfg_path.read_text())
        raw["synthesis"] = {**raw.get("synthesis", {}), "seed": 7}  # the elephant partition again, other images
        cfg_path.write_text(yaml.safe_dump(raw))
        assert build_defs(cfg_path).resolve_job_def(SYNTHESIZE).execute_in_process(instance=instance, partition_key="elephant").success
        r = job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("student_model")], raise_on_error=False)
        assert not r.success
        err = r.failure_data_for_node("student_model").error.to_string()
        assert "StaleSnapshot" in err and "elephant" in err and "dog" not in err and old_hash in err and "materialize synthetic_dataset" in err
        kinds = [e.dagster_event.event_type_value for e in instance.all_logs(r.run_id) if e.dagster_event and e.step_key == "student_model"]
        assert "STEP_UP_FOR_RETRY" not in kinds
        client = MlflowTracking().client(cfg)
        assert not client.search_model_versions("name='dfkd-stale-snapshot'")

        assert job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey(k) for k in ("synthetic_dataset", "student_model")]).success
        new_hash = client.get_model_version("dfkd-stale-snapshot", "1").tags["dvc_hash"]
        assert new_hash != old_hash and new_hash == artifacts.read_snapshot_hash(cfg)
        listing = DvcRepo().snapshot_files(cfg, new_hash)
        for c in cfg.classes:
            manifest = artifacts.round_dir(cfg, c) / "manifest.json"
            assert listing[manifest.relative_to(cfg.synthetic_dir).as_posix()] == hashlib.md5(manifest.read_bytes()).hexdigest()


# ---------------------------------------------------------------- DVC remote

def _snapshot(cfg_path: Path, run_config: dict | None = None):
    from dfkd_assets.definitions import build_defs
    from dfkd_assets.defs.jobs import TRAIN

    with dg.DagsterInstance.get() as instance:
        return build_defs(cfg_path).resolve_job_def(TRAIN).execute_in_process(
            instance=instance, asset_selection=[dg.AssetKey("synthetic_dataset")], raise_on_error=False, run_config=run_config or {})


def _pushed_files(remote: Path) -> list[Path]:
    return [p for p in remote.rglob("*") if p.is_file()] if remote.is_dir() else []


@pytest.mark.slow
def test_dvc_remote_that_cannot_exist_fails_clearly_and_keeps_shards(base, tmp_path, monkeypatch):
    """dvc.remote_url under a regular file (a remote that cannot be created: works as root too):
    synthetic_dataset fails naming the remote and the setting; shards stay; fixed URL, retry works."""
    from dfkd_assets.config import load_config

    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the remote's parent folder should be\n")
    cfg_path = clone(base, tmp_path, {"dvc": {"remote_url": str(blocker / "remote")}, "operations": {"max_retries": 0}})
    cfg = load_config(cfg_path)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    shards = _shard_files(cfg)
    r = _snapshot(cfg_path)
    assert not r.success
    msg = r.failure_data_for_node("synthetic_dataset").error.to_string()
    assert f"DVC remote {blocker / 'remote'} (dvc.remote_url) cannot be created" in msg
    assert _shard_files(cfg) == shards
    fixed = tmp_path / "remote"
    r = _snapshot(cfg_path, {"resources": {"settings": {"config": {"overrides": {"dvc": {"remote_url": str(fixed)}}}}}})
    assert r.success and _pushed_files(fixed)


@contextlib.contextmanager
def _read_only(path: Path):
    """Make a directory unwritable for this process. chmod does not stop root, so as root the
    directory is made immutable (chattr +i, needs CAP_LINUX_IMMUTABLE and ext4/xfs-like support)."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(0o755)
        return
    res = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True) if shutil.which("chattr") else None
    if res is None or res.returncode != 0:
        pytest.skip(f"running as root and cannot make {path} immutable ({res.stderr.strip() if res else 'no chattr'}): "
                    "chmod does not stop root, so no read-only remote can be made here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.slow
def test_read_only_dvc_remote_fails_clearly_and_a_retry_uploads(base, tmp_path, monkeypatch):
    """A read-only remote: `dvc push` fails, the error names the remote and says the shards are kept;
    the shards and the local DVC cache stay; once writable, a retry pushes."""
    from dfkd_assets.config import load_config

    remote = tmp_path / "remote"
    remote.mkdir()
    cfg_path = clone(base, tmp_path, {"operations": {"max_retries": 0}})
    cfg = load_config(cfg_path)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    shards = _shard_files(cfg)
    with _read_only(remote):
        r = _snapshot(cfg_path)
        assert not _pushed_files(remote)
    assert not r.success
    msg = r.failure_data_for_node("synthetic_dataset").error.to_string()
    assert f"push to the DVC remote 'storage' at {remote} (dvc.remote_url) failed" in msg
    assert _shard_files(cfg) == shards
    r = _snapshot(cfg_path)
    assert r.success and _pushed_files(remote)


# ---------------------------------------------------------------- disk full

_FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead of killing us
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
"""

_SHARD_DRIVER = _FULL_DISK + """
import numpy as np
from dfkd_assets.core.io import encode_png, write_shard
rng = np.random.default_rng(1)
items = [(f"x_{i:06d}.png", encode_png(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))) for i in range(8)]
write_shard(sys.argv[2], items, [{"index": i} for i in range(8)], {"class": "x"})
"""

_CHECKPOINT_DRIVER = _FULL_DISK + """
import pathlib, torch
sys.path.insert(0, str(pathlib.Path(sys.argv[3]).parents[2] / "tests"))  # argv[3] = ROOT/configs/models/<tiny clip>.json
from core_settings import distill_settings
from dfkd_assets.core.distill import distill
from dfkd_assets.core.student import build_student
from dfkd_assets.core.teacher import load_teacher, zero_shot_head
teacher = load_teacher("dfkd-tiny-clip", None, sys.argv[3], 0, torch.device("cpu"))
head = zero_shot_head(teacher, ["dog", "cat", "house"], "single")
g = torch.Generator().manual_seed(0)
images, labels = torch.randint(0, 256, (24, 32, 32, 3), dtype=torch.uint8, generator=g), torch.arange(24) % 3
distill(build_student("resnet10t", ["dog", "cat", "house"], 32, 0), teacher, head, images, labels,
        distill_settings(epochs=2, batch_size=8), sys.argv[2], "fp")
"""


def _listing(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.slow
def test_disk_full_while_writing_a_shard_or_checkpoint_publishes_nothing_partial(tmp_path, teacher):
    """A real file-size limit (RLIMIT_FSIZE) makes the write of a new shard, and of the epoch-2
    checkpoint, fail with EFBIG: no partial or temporary file is left, the previous shard and
    checkpoint are intact, and with room again the distillation resumes from the kept checkpoint."""
    from dfkd_assets.core.distill import distill
    from dfkd_assets.core.io import encode_png, read_shard, write_shard
    from dfkd_assets.core.student import build_student
    from dfkd_assets.core.teacher import zero_shot_head

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # shard: a valid previous shard, then a larger one that does not fit
    shard_dir, fresh_dir = tmp_path / "shard", tmp_path / "fresh"
    rng = np.random.default_rng(0)
    small = [(f"x_{i:06d}.png", encode_png(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))) for i in range(8)]
    write_shard(shard_dir, small, [{"index": i} for i in range(8)], {"class": "x"})
    before = _listing(shard_dir)
    limit = 40_000  # the new shard is ~100 kB, the old one ~7 kB
    for d in (shard_dir, fresh_dir):
        out = subprocess.run([sys.executable, "-c", _SHARD_DRIVER, str(limit), str(d)], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode != 0 and "File too large" in out.stderr, out.stderr[-2000:]
    assert _listing(shard_dir) == before  # no temp file, old shard and manifest untouched
    assert read_shard(shard_dir)[0].shape == (8, 16, 16, 3)
    assert not fresh_dir.exists() or not any(fresh_dir.iterdir())  # a first shard that failed leaves nothing

    # checkpoint: epoch 1 written normally; epoch 2 does not fit
    ck = tmp_path / "ck"
    head = zero_shot_head(teacher, ["dog", "cat", "house"], "single")
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randint(0, 256, (24, 32, 32, 3), dtype=torch.uint8, generator=g), torch.arange(24) % 3
    hist = distill(build_student("resnet10t", ["dog", "cat", "house"], 32, 0), teacher, head, images, labels,
                   distill_settings(epochs=1, batch_size=8), ck, "fp")
    before = _listing(ck)
    out = subprocess.run([sys.executable, "-c", _CHECKPOINT_DRIVER, str(len(before["last.pt"]) // 2), str(ck), str(TINY_CLIP)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "File too large" in out.stderr, out.stderr[-2000:]
    assert _listing(ck) == before
    resumed = distill(build_student("resnet10t", ["dog", "cat", "house"], 32, 0), teacher, head, images, labels,
                      distill_settings(epochs=2, batch_size=8), ck, "fp")
    assert [h["epoch"] for h in resumed] == [1, 2] and resumed[0] == hist[0]


# ---------------------------------------------------------------- concurrency

def _flock_waiters(path: Path) -> int:
    """Processes blocked in flock() on `path`, from /proc/locks (blocked requests are the '->' lines)."""
    ino = os.stat(path).st_ino
    return sum(1 for line in Path("/proc/locks").read_text().splitlines() if "->" in line and f":{ino} " in line)


@pytest.mark.slow
def test_two_runs_of_the_same_class_at_once_write_one_valid_shard(base, tmp_path, monkeypatch, procs):
    """Two `dagster asset materialize` of the same class partition at once, with a GPU pool of two so
    Dagster lets both in. Both are held at the class lock until both wait (the test holds it, as a
    third run would), then released together: one synthesizes, the other reuses its shard; the
    shard is the one an undisturbed run writes and passes its integrity check."""
    from dfkd_assets.config import load_config
    from dfkd_assets.core.io import exclusive_lock, read_shard

    if not Path("/proc/locks").is_file():
        pytest.skip("needs Linux /proc/locks to see that both runs wait")
    cfg_path = clone(base, tmp_path)
    cfg = load_config(cfg_path)
    home = tmp_path / "dagster_home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    shard_dir = cfg.class_dir("dog")
    reference = {n: (shard_dir / n).read_bytes() for n in ("images.tar", "manifest.json")}  # base's undisturbed run, same settings
    shutil.rmtree(shard_dir)
    with dg.DagsterInstance.get() as instance:
        instance.event_log_storage.set_concurrency_slots("gpu", 2)  # `dfkd setup-pools --gpus 2`: a two-GPU host
    lock = cfg.work_dir / "synthetic" / "dog.lock"
    logs = [tmp_path / f"run{i}.log" for i in range(2)]
    with exclusive_lock(lock):
        ps = [_materialize(procs, _env(cfg_path, home), log, "--select", "synthetic_images", "--partition", "dog") for log in logs]
        _wait_until(lambda: _flock_waiters(lock) == 2, ps, logs, 300, "both runs to wait for the class lock", poll=0.1)
    for p, log in zip(ps, logs):
        assert p.wait(timeout=300) == 0, log.read_text()[-3000:]
    with dg.DagsterInstance.get() as instance:
        metas = _latest_metadata(instance, "synthetic_images", n=2)
    assert sorted(m["reused"] for m in metas) == [False, True]
    assert {n: (shard_dir / n).read_bytes() for n in reference} == reference
    assert read_shard(shard_dir, verify=True)[0].shape[0] == cfg.synthesis.images_per_class


@pytest.mark.slow
def test_two_promotions_at_once_leave_one_evaluated_champion(base, tmp_path, monkeypatch, procs):
    """Two workspaces sharing one MLflow registry each evaluated a challenger (v1, v2) against no
    champion and promote at once, as two processes on one Dagster instance. Both are made to wait
    for the `registry` pool together; released, they run one after the other: the first promotes,
    the second sees the alias moved after its evaluation and stops without touching it."""
    from dfkd_assets.config import load_config
    from dfkd_assets.definitions import build_defs
    from dfkd_assets.defs.jobs import TRAIN
    from dfkd_assets.defs.resources import MlflowTracking

    shared = tmp_path / "registry"
    common = {"mlflow": {"tracking_uri": f"sqlite:///{shared / 'mlflow.db'}", "artifact_location": str(shared / "artifacts"),
                         "registered_model_name": "dfkd-race"}, "operations": {"max_retries": 0}}
    paths = [clone(base, tmp_path / ws, common) for ws in ("a", "b")]
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    upto_eval = [dg.AssetKey(k) for k in ("synthetic_dataset", "student_model", "evaluation_report")]
    with dg.DagsterInstance.get() as instance:
        for p in paths:
            assert build_defs(p).resolve_job_def(TRAIN).execute_in_process(instance=instance, asset_selection=upto_eval).success
        storage = instance.event_log_storage
        storage.set_concurrency_slots("registry", 1)  # as `dfkd setup-pools` sets it
        holder = "test-holds-the-registry-pool"
        assert storage.claim_concurrency_slot("registry", holder, "hold").is_claimed
        logs = [tmp_path / f"promote_{ws}.log" for ws in ("a", "b")]
        ps = [_materialize(procs, _env(p, home), log, "--select", "champion_student") for p, log in zip(paths, logs)]
        _wait_until(lambda: storage.get_concurrency_info("registry").pending_step_count == 2, ps, logs, 300,
                    "both promotions to wait for the registry pool", poll=0.2)
        storage.free_concurrency_slots_for_run(holder)
    codes = [p.wait(timeout=300) for p in ps]
    assert sum(c == 0 for c in codes) == 1, [log.read_text()[-2000:] for log in logs]
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    assert "alias champion moved" in logs[loser].read_text()
    cfgs = [load_config(p) for p in paths]
    versions = [json.loads((c.path("student") / "registry.json").read_text())["version"] for c in cfgs]
    tracking = MlflowTracking()
    client = tracking.client(cfgs[0])
    assert tracking.alias_version(cfgs[0], "champion") == versions[winner]
    assert "evaluated_student_mean_top1" in client.get_model_version("dfkd-race", versions[winner]).tags
    assert "promoted_at" not in client.get_model_version("dfkd-race", versions[loser]).tags
    assert len(client.get_registered_model("dfkd-race").tags["champion_history"].split()) == 1


# ---------------------------------------------------------------- numerics

@contextlib.contextmanager
def _nan_for_latents(grids: list[torch.Tensor] | None):
    """A real generator fault: every module receiving exactly one of `grids` (the initial VQ latent
    grid of a seed; None = any VQ latent) returns NaN for that image. Registered for all modules of
    the process, so it reaches the VQGAN the asset itself loads."""
    from torch.nn.modules.module import register_module_forward_hook

    def hook(module, inputs, output):
        if not inputs or not torch.is_tensor(inputs[0]) or inputs[0].dim() != 4 or not torch.is_tensor(output):
            return None
        z = inputs[0]
        if grids is None:
            hit = torch.ones(len(z), dtype=torch.bool) if z.shape[1:] == (16, 8, 8) and type(module).__name__ == "Conv2d" and module.in_channels == 16 else None
        else:
            hit = torch.zeros(len(z), dtype=torch.bool)
            for g in grids:
                if z.shape[1:] == g.shape:
                    hit |= (z.detach() - g).abs().flatten(1).amax(1) < 1e-4
        if hit is None or not hit.any():
            return None
        out = output.clone()
        out[hit] = float("nan")
        return out

    handle = register_module_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _initial_grid(seed: int) -> torch.Tensor:
    from dfkd_assets.core.augment import ImageRngs
    from dfkd_assets.core.synthesis import init_latents
    from dfkd_assets.core.vqgan import load_vqgan

    return init_latents(load_vqgan(TINY_VQGAN, None, 0, torch.device("cpu")), ImageRngs([seed], torch.device("cpu")), 32, 0.0)[0]


def test_nan_image_is_reseeded_and_recorded_in_the_manifest(base, tmp_path, monkeypatch):
    """The generator returns NaN for one image's latent: the class still materializes, that image comes
    from its derived retry seed (recorded in the manifest next to the requested one), the others keep
    their seeds, and no non-finite image reaches the shard."""
    from dfkd_assets.config import load_config
    from dfkd_assets.core.io import read_shard
    from dfkd_assets.core.seeding import derive_seed
    from dfkd_assets.core.synthesis import nonfinite_retry_seed
    from dfkd_assets.definitions import build_defs
    from dfkd_assets.defs.jobs import SYNTHESIZE

    cfg_path = clone(base, tmp_path, {"synthesis": {"images_per_class": 4}})  # the batch that goes NaN is remade image by image
    cfg = load_config(cfg_path)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    requested = [derive_seed(cfg.synthesis.seed, "dog", i) for i in range(cfg.synthesis.images_per_class)]
    with _nan_for_latents([_initial_grid(requested[2])]), dg.DagsterInstance.get() as instance:
        assert build_defs(cfg_path).resolve_job_def(SYNTHESIZE).execute_in_process(instance=instance, partition_key="dog").success
        meta = _latest_metadata(instance, "synthetic_images")[0]
    images, manifest = read_shard(cfg.class_dir("dog"))
    recs = manifest["images"]
    assert recs[2]["seed"] == nonfinite_retry_seed(requested[2], 1) and recs[2]["requested_seed"] == requested[2]
    assert [r["seed"] for i, r in enumerate(recs) if i != 2] == [s for i, s in enumerate(requested) if i != 2]
    assert all("requested_seed" not in r for i, r in enumerate(recs) if i != 2)
    assert meta["reseeded_nonfinite"] == 1 and np.isfinite([r["final_cosine"] for r in recs]).all()


def test_nan_synthesis_retries_only_that_image_then_fails_clearly(teacher, tmp_path):
    """Core level: only the poisoned image is remade, from its derived seed, giving exactly what a
    clean run from that seed gives; the choice is stored with the batch, so a resumed run keeps it.
    A generator that is non-finite for every seed fails after the bounded retries, naming the seeds."""
    from dfkd_assets.core.synthesis import NonFiniteError, nonfinite_retry_seed, synthesize_batch, synthesize_resumable
    from dfkd_assets.core.teacher import zero_shot_head
    from dfkd_assets.core.vqgan import load_vqgan

    vqgan = load_vqgan(TINY_VQGAN, None, 0, torch.device("cpu"))
    head = zero_shot_head(teacher, ["a", "b"], "single")
    settings = synthesis_settings(iterations=6, cutn=4, image_size=32)
    seeds = [101, 102, 103, 104]
    t = teacher.encode_text([f"a photo of a thing number {i}" for i in range(4)])
    with _nan_for_latents([_initial_grid(103)]):
        out = synthesize_resumable(vqgan, teacher, head, t, seeds, settings, 4, tmp_path / "w", "fp")
        again = synthesize_resumable(vqgan, teacher, head, t, seeds, settings, 4, tmp_path / "w", "fp")
    retry = nonfinite_retry_seed(103, 1)
    assert out.seeds.tolist() == [101, 102, retry, 104] and again.seeds.tolist() == out.seeds.tolist()
    assert again.resumed == 4 and np.array_equal(again.images, out.images)
    clean = synthesize_batch(vqgan, teacher, t[2:3], [retry], settings)
    assert np.array_equal(out.images[2], clean.images[0])
    for j, s in ((0, 101), (1, 102), (3, 104)):  # the others: their own seeds, as made alone
        assert np.array_equal(out.images[j], synthesize_batch(vqgan, teacher, t[j : j + 1], [s], settings).images[0])

    with _nan_for_latents(None), pytest.raises(NonFiniteError, match=r"seed 101 .*3 derived retry seeds"):
        synthesize_resumable(vqgan, teacher, head, t, seeds, settings, 4, tmp_path / "w2", "fp", max_nonfinite_retries=3)
    assert not list((tmp_path / "w2").glob("batch_*.npz"))  # nothing written
