"""Operations against real Dagster, MLflow and DVC: blocking checks stop training and promotion,
rollback, predict, ONNX export, the stale-partitions sensor (adding a class synthesizes only it)
and the run-failure sensor's webhook (a real HTTP server on 127.0.0.1)."""

import http.server
import io
import json
import subprocess
import sys
import tarfile
import threading

import dagster as dg
import pytest
import yaml

from conftest import ROOT
from test_e2e import make_workspace

pytestmark = pytest.mark.e2e


def _sensor_requests(defs, instance, name):
    sensor = defs.resolve_sensor_def(name)
    res = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, repository_def=defs.get_repository_def()))
    return res.run_requests


def test_operations_checks_rollback_predict_onnx_and_sensors(tmp_path, monkeypatch):
    from dfkd_assets.config import load_config
    from dfkd_assets.definitions import build_defs
    from dfkd_assets.defs.jobs import PREPARE, SYNTHESIZE, TRAIN
    from dfkd_assets.defs.resources import MlflowTracking
    from dfkd_assets.defs.runner import run_pipeline

    cfg_path = make_workspace(tmp_path)  # Contrastive-Prompt, as in the demo
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    cfg = load_config(cfg_path)
    defs = build_defs(cfg_path)
    tracking = MlflowTracking()
    name = cfg.mlflow.registered_model_name
    with dg.DagsterInstance.get() as instance:
        assert all(r.success for r in run_pipeline(defs, instance, log=lambda s: None))
        graph = defs.resolve_asset_graph()
        for key in graph.asset_check_keys:
            ev = instance.event_log_storage.get_latest_asset_check_execution_by_key([key])[key]
            assert ev is not None and ev.status.value == "SUCCEEDED", key
        # everything current: the sensor asks for nothing
        assert _sensor_requests(defs, instance, "stale_partitions") == []

        # --- ONNX: exported champion with parity ---
        onnx_meta = instance.get_latest_materialization_event(dg.AssetKey("champion_onnx")).asset_materialization.metadata
        assert onnx_meta["max_abs_diff_vs_pytorch"].value < 1e-4 and onnx_meta["champion_version"].value == "1"

        # --- a blocking check stops training: one image altered behind its manifest's back ---
        shard_dir = cfg.class_dir("dog")
        manifest = json.loads((shard_dir / "manifest.json").read_text())
        shard = shard_dir / manifest["shard"]
        members = {}
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                members[m] = tar.extractfile(m).read()
        first = next(iter(members))
        members[first] = members[first][:-8] + b"\0" * 8  # a PNG that no longer matches its sha256 (or decodes)
        with tarfile.open(shard, "w") as tar:
            for m, data in members.items():
                m.size = len(data)
                tar.addfile(m, io.BytesIO(data))
        from dfkd_assets.core.io import sha256_file

        manifest["shard_sha256"] = sha256_file(shard)  # the snapshot's whole-file test passes; per-image integrity must not
        (shard_dir / "manifest.json").write_text(json.dumps(manifest))
        r = defs.resolve_job_def(TRAIN).execute_in_process(instance=instance, raise_on_error=False)
        assert not r.success
        assert not r.asset_materializations_for_node("student_model")  # never trained on a corrupt dataset
        assert str(tracking.alias_version(cfg, "champion")) == "1"

        # repair: the corrupt shard is removed and the partition re-materialized
        import shutil

        shutil.rmtree(shard_dir)
        defs.resolve_job_def(SYNTHESIZE).execute_in_process(instance=instance, partition_key="dog")
        # second and third versions, promoted with a generous tolerance -> champion v3, previous v2
        loose = {"resources": {"settings": {"config": {"overrides": {"promotion": {"tolerance": 1.0}}}}}}
        for _ in range(2):
            assert defs.resolve_job_def(TRAIN).execute_in_process(instance=instance, run_config=loose).success
        assert tracking.alias_version(cfg, "champion") == "3"

        # --- rollback: to the previous champion, then to a named version; bad targets are refused ---
        rb = defs.resolve_job_def("rollback_champion")
        assert rb.execute_in_process(instance=instance).success
        assert tracking.alias_version(cfg, "champion") == "2"
        client = tracking.client(cfg)
        assert client.get_model_version(name, "2").tags["rolled_back_from"] == "3"
        assert "rollback:v2@" in client.get_registered_model(name).tags["champion_history"]
        bad = rb.execute_in_process(instance=instance, raise_on_error=False,
                                    run_config={"ops": {"move_champion_back": {"config": {"to_version": "99"}}}})
        assert not bad.success and "no version '99'" in str(bad.failure_data_for_node("move_champion_back").error.message)
        assert rb.execute_in_process(instance=instance, run_config={"ops": {"move_champion_back": {"config": {"to_version": "v1"}}}}).success
        assert tracking.alias_version(cfg, "champion") == "1"

        # --- a worse challenger is not promoted: the blocking check stops champion_student ---
        strict = {"resources": {"settings": {"config": {"overrides": {"promotion": {"metric": "student_mean_top1", "tolerance": 0.0},
                                                                      "distill": {"control": "shuffle_teacher", "epochs": 1}}}}}}
        r = defs.resolve_job_def(TRAIN).execute_in_process(instance=instance, run_config=strict, raise_on_error=False)
        metrics = json.loads((cfg.path("reports") / "metrics.json").read_text())
        worse = metrics["student_mean_top1"] < metrics["champion_mean_top1"]
        assert r.asset_materializations_for_node("evaluation_report")
        promoted = bool(r.asset_materializations_for_node("champion_student"))
        assert promoted == (not worse) and r.success == (not worse)  # worse: the check fails and promotion never runs
        assert tracking.alias_version(cfg, "champion") == ("1" if worse else "4")

    # --- predict: the consumer side of the registry ---
    images = sorted((tmp_path / "eval" / "photo" / "dog").glob("*.png"))[:2]
    out = subprocess.run([sys.executable, "-m", "dfkd_assets.cli", "predict", *map(str, images), "--config", str(cfg_path), "--json"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    pred = json.loads(out.stdout)
    assert pred["model_uri"] == f"models:/{name}@champion" and len(pred["predictions"]) == 2
    assert {c for r in pred["predictions"] for c, _ in r["top"]} <= set(cfg.classes)
    assert abs(sum(p for _, p in pred["predictions"][0]["top"]) - 1) < 1e-4  # all 3 classes listed: probabilities sum to 1

    # --- add a class: the sensor rebuilds the prompt bank first, then asks for that partition only ---
    raw = yaml.safe_load(cfg_path.read_text())
    raw["classes"] = [*raw["classes"], "tree"]
    cfg_path.write_text(yaml.safe_dump(raw))
    from dfkd_assets.toyworld.evalset import write_eval_set

    write_eval_set(tmp_path / "eval", raw["classes"], per_class=3, size=32)
    defs = build_defs(cfg_path)
    with dg.DagsterInstance.get() as instance:
        reqs = _sensor_requests(defs, instance, "stale_partitions")
        assert [r.job_name for r in reqs] == [PREPARE]
        assert defs.resolve_job_def(PREPARE).execute_in_process(instance=instance).success
        reqs = _sensor_requests(defs, instance, "stale_partitions")
        assert [(r.job_name, r.partition_key) for r in reqs] == [(SYNTHESIZE, "tree")]

        # --- and trains a model for the new class list: the old champion (other classes) is seen, not
        # compared, and the new version replaces it (it must not read as "the alias moved") ---
        before = tracking.alias_version(cfg, "champion")
        assert defs.resolve_job_def(SYNTHESIZE).execute_in_process(instance=instance, partition_key="tree").success
        assert defs.resolve_job_def(TRAIN).execute_in_process(instance=instance).success
        new_cfg = load_config(cfg_path)
        metrics = json.loads((new_cfg.path("reports") / "metrics.json").read_text())
        assert metrics["champion_version"] is None and str(metrics["champion_seen"]) == str(before)
        assert tracking.alias_version(new_cfg, "champion") == str(metrics["challenger_version"]) != str(before)


def test_failure_sensor_records_and_posts_to_the_webhook(tmp_path, monkeypatch):
    from dfkd_assets.definitions import build_defs

    received = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    secret_url = f"http://127.0.0.1:{server.server_port}/hook?token=s3cret"
    monkeypatch.setenv("DFKD_FAILURE_WEBHOOK", secret_url)
    cfg_path = make_workspace(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    defs = build_defs(cfg_path)
    from dfkd_assets.config import load_config
    from dfkd_assets.defs.jobs import TRAIN

    cfg = load_config(cfg_path)
    with dg.DagsterInstance.get() as instance:
        r = defs.resolve_job_def(TRAIN).execute_in_process(instance=instance, raise_on_error=False)  # nothing synthesized yet
        assert not r.success
        run = instance.get_run_by_id(r.run_id)
        failure = next(e for e in instance.all_logs(r.run_id) if e.dagster_event and e.dagster_event.event_type_value == "PIPELINE_FAILURE")
        ctx = dg.build_run_status_sensor_context(sensor_name="record_failures", dagster_event=failure.dagster_event,
                                                 dagster_instance=instance, dagster_run=run).for_run_failure()
        defs.resolve_sensor_def("record_failures")(ctx)  # direct invocation, as the daemon would on this failure
    server.shutdown()
    lines = (cfg.storage_dir / "run_failures.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["run_id"] == r.run_id and json.loads(lines[-1])["job"] == TRAIN
    assert received and received[0]["run_id"] == r.run_id
    assert "s3cret" not in (cfg.storage_dir / "run_failures.jsonl").read_text()


def test_bad_input_fails_at_once_without_retries(tmp_path, monkeypatch):
    """A wrong path is a Failure that forbids retries: one attempt, then the run fails naming the setting."""
    from dfkd_assets.definitions import build_defs
    from dfkd_assets.defs.jobs import PREPARE

    cfg_path = make_workspace(tmp_path, {"operations": {"max_retries": 2, "retry_delay_s": 0}})
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    bad = {"resources": {"settings": {"config": {"overrides": {"teacher": {"model_config_file": str(tmp_path / "nope.json")}}}}}}
    with dg.DagsterInstance.get() as instance:
        r = build_defs(cfg_path).resolve_job_def(PREPARE).execute_in_process(instance=instance, run_config=bad, raise_on_error=False)
        assert not r.success
        kinds = [e.dagster_event.event_type_value for e in instance.all_logs(r.run_id) if e.dagster_event]
        assert "STEP_UP_FOR_RETRY" not in kinds and kinds.count("STEP_START") == 1
        assert "teacher.model_config_file" in r.failure_data_for_node("teacher_head").error.message


def test_transient_tracking_outage_is_retried(tmp_path, monkeypatch):
    """MLflow unreachable (a closed port) is transient: the step is retried, then fails clearly."""
    import socket

    from dfkd_assets.definitions import build_defs
    from dfkd_assets.defs.jobs import PREPARE

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    cfg_path = make_workspace(tmp_path, {"operations": {"max_retries": 2, "retry_delay_s": 0},
                                         "mlflow": {"tracking_uri": f"http://127.0.0.1:{port}", "artifact_location": None}})
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with dg.DagsterInstance.get() as instance:
        r = build_defs(cfg_path).resolve_job_def(PREPARE).execute_in_process(instance=instance, raise_on_error=False)
        assert not r.success and r.asset_materializations_for_node("teacher_head")
        logs = [e for e in instance.all_logs(r.run_id) if e.dagster_event]
        retries = [e for e in logs if e.dagster_event.event_type_value == "STEP_UP_FOR_RETRY" and e.step_key == "prompt_bank"]
        assert len(retries) == 2  # max_retries, then the failure
        err = r.failure_data_for_node("prompt_bank").error
        assert "Exceeded max_retries of 2" in err.message
        assert f"127.0.0.1:{port}" in err.to_string()  # the cause names the unreachable server
