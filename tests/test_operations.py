"""Operations against real Dagster, MLflow and DVC: blocking checks stop training and promotion,
rollback, predict, ONNX export, the stale-partitions sensor (adding a class synthesizes only it)
and the run-failure sensor's webhook (a real HTTP server on 127.0.0.1).

The operations tests share one pipeline run (module fixture `trained` in conftest.py, champion v1:
most of their CPU time), and each gets the workspace back exactly as that run left it (fixture `ops`),
whatever an earlier test did to it. The pristine copy is restored *in place*, not into a fresh folder: MLflow
stores absolute paths (the experiment's artifact location, run artifact URIs, model version sources)
and DVC's remote is an absolute path in .dvc/config.local, so a copy elsewhere would read and write
the original's artifacts and remote. MLflow keeps one SQLAlchemy engine per database URI for the
whole process; with its default pool a pooled connection keeps reading the replaced (deleted)
mlflow.db, so these tests make that engine pool-less (MLFLOW_SQLALCHEMYSTORE_POOLCLASS=NullPool)
and every query opens the restored file.
"""

import http.server
import io
import json
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import dagster as dg
import pytest
import torch
import yaml

from conftest import (
    ROOT,
    champion_version,
    check_result as _check,
    load_registered,
    make_workspace,
    model_labelled_eval_set,
    pickle_findings,
    registry_client,
    with_overrides as _with_overrides,
)

pytestmark = pytest.mark.e2e


def _sensor_requests(defs, instance, name):
    sensor = defs.resolve_sensor_def(name)
    res = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, repository_def=defs.get_repository_def()))
    return res.run_requests


def test_clean_run_passes_every_check_and_leaves_nothing_stale(ops):
    with dg.DagsterInstance.get() as instance:
        graph = ops.defs.resolve_asset_graph()
        assert graph.asset_check_keys
        for key in graph.asset_check_keys:
            ev = instance.event_log_storage.get_latest_asset_check_execution_by_key([key])[key]
            assert ev is not None and ev.status.value == "SUCCEEDED", key
        # everything current: the sensor asks for nothing
        assert _sensor_requests(ops.defs, instance, "stale_partitions") == []
    assert champion_version(ops.cfg) == "1"


def test_champion_onnx_export_matches_pytorch_and_is_registered_with_its_lineage(ops, tmp_path):
    """The export passed parity and is version 1 of <name>-onnx; each version names the other; MLflow
    loads the ONNX version (no pickle in it) and it gives the registered student's logits."""
    import mlflow.artifacts
    import mlflow.pyfunc

    with dg.DagsterInstance.get() as instance:
        onnx_meta = instance.get_latest_materialization_event(dg.AssetKey("champion_onnx")).asset_materialization.metadata
    assert onnx_meta["max_abs_diff_vs_pytorch"].value < 1e-4 and onnx_meta["champion_version"].value == "1"
    client = registry_client(ops.cfg)
    student_version = client.get_model_version(ops.name, "1")
    onnx_uri = student_version.tags["onnx_model_uri"]
    assert onnx_uri == f"models:/{ops.name}-onnx/1" == onnx_meta["onnx_model_uri"].value
    onnx_version = client.get_model_version(f"{ops.name}-onnx", "1")
    assert onnx_version.tags["source_model_uri"] == f"models:/{ops.name}/1" and onnx_version.tags["source_run_id"] == student_version.run_id
    assert pickle_findings(Path(mlflow.artifacts.download_artifacts(artifact_uri=onnx_uri, dst_path=str(tmp_path)))) == []
    x = torch.rand(5, 3, ops.cfg.student.input_size, ops.cfg.student.input_size, generator=torch.Generator().manual_seed(3))
    logits = mlflow.pyfunc.load_model(onnx_uri).predict({"images": x.numpy()})["logits"]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), load_registered(ops.cfg)(x), atol=1e-4, rtol=0)


def test_pipeline_registers_without_pickle_and_writes_a_model_card(trained, ops, tmp_path):
    """No MLflow pickle warning in the pipeline's output; v1's description carries its lineage, the
    command that reproduces it (whose settings file gives the same config hash) and accuracy per
    domain of student and teacher."""
    import mlflow.artifacts

    from dfkd_assets.config import load_config

    assert not trained[2].mentioning("pickle"), trained[2].mentioning("pickle")
    client = registry_client(ops.cfg)
    v1 = client.get_model_version(ops.name, "1")
    card, tags = v1.description, v1.tags
    for fact in (tags["teacher_id"], tags["dvc_hash"], f"prompts: `{ops.cfg.prompts.method}`", tags["config_hash"],
                 f"--run-id {v1.run_id} --artifact-path config.yaml", "dfkd run --config config.yaml", "| ci-shapes/photo |"):
        assert fact in card, fact
    header = next(line for line in card.splitlines() if line.startswith("| domain"))
    assert "student" in header and "teacher" in header
    settings = mlflow.artifacts.download_artifacts(run_id=v1.run_id, artifact_path="config.yaml", dst_path=str(tmp_path))
    assert load_config(settings).config_hash() == tags["config_hash"]


def test_corrupt_shard_blocks_training_until_it_is_resynthesized(ops):
    """One image altered behind its manifest's back: the blocking check stops training and promotion."""
    from dfkd_assets.core.io import sha256_file
    from dfkd_assets.defs.jobs import SYNTHESIZE, TRAIN

    cfg, defs = ops.cfg, ops.defs
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
    manifest["shard_sha256"] = sha256_file(shard)  # the snapshot's whole-file test passes; per-image integrity must not
    (shard_dir / "manifest.json").write_text(json.dumps(manifest))
    with dg.DagsterInstance.get() as instance:
        r = defs.resolve_job_def(TRAIN).execute_in_process(instance=instance, raise_on_error=False)
        assert not r.success
        assert _check(r, "shard_integrity") is not None and not _check(r, "shard_integrity").passed
        assert not r.asset_materializations_for_node("student_model")  # never trained on a corrupt dataset
        assert champion_version(cfg) == "1"

        # repair: the corrupt shard is removed and the partition re-materialized; the snapshot passes again
        shutil.rmtree(shard_dir)
        assert defs.resolve_job_def(SYNTHESIZE).execute_in_process(instance=instance, partition_key="dog").success
        r = defs.resolve_job_def(TRAIN).execute_in_process(instance=instance, asset_selection=[dg.AssetKey("synthetic_dataset")])
        assert r.success and _check(r, "shard_integrity").passed


def test_rollback_to_the_previous_then_a_named_version_refuses_bad_targets(ops):
    from dfkd_assets.defs.jobs import TRAIN

    cfg, defs, name = ops.cfg, ops.defs, ops.name
    with dg.DagsterInstance.get() as instance:
        # second and third versions, promoted with a generous tolerance -> champion v3, previous v2
        loose = _with_overrides({"promotion": {"tolerance": 1.0}})
        for _ in range(2):
            assert defs.resolve_job_def(TRAIN).execute_in_process(instance=instance, run_config=loose).success
        assert champion_version(cfg) == "3"

        rb = defs.resolve_job_def("rollback_champion")
        assert rb.execute_in_process(instance=instance).success  # no target: the previous champion
        assert champion_version(cfg) == "2"
        client = registry_client(cfg)
        assert client.get_model_version(name, "2").tags["rolled_back_from"] == "3"
        assert "rollback:v2@" in client.get_registered_model(name).tags["champion_history"]
        bad = rb.execute_in_process(instance=instance, raise_on_error=False,
                                    run_config={"ops": {"move_champion_back": {"config": {"to_version": "99"}}}})
        assert not bad.success and "no version '99'" in str(bad.failure_data_for_node("move_champion_back").error.message)
        assert champion_version(cfg) == "2"
        assert rb.execute_in_process(instance=instance, run_config={"ops": {"move_champion_back": {"config": {"to_version": "v1"}}}}).success
        assert champion_version(cfg) == "1"


def test_worse_challenger_is_not_promoted(ops, teacher):
    """Negative control of promotion. The challenger (v2) is worse by construction: it is evaluated on
    images labelled by the champion's (v1) predictions on which the challenger predicts another class,
    so the champion scores 1.0 and the challenger 0.0 on the same images. That is asserted first;
    then the blocking check must fail and champion_student never run."""
    from dfkd_assets import artifacts
    from dfkd_assets.defs.jobs import TRAIN

    cfg, defs = ops.cfg, ops.defs
    tolerance = 0.0
    eval_root = ops.root / "disagreement-eval"
    strict = {"promotion": {"metric": "student_mean_top1", "tolerance": tolerance},
              "distill": {"control": "shuffle_teacher", "epochs": 1},
              "evaluation": {"datasets": [{"name": "disagreement", "root": str(eval_root)}]}}
    train = defs.resolve_job_def(TRAIN)
    with dg.DagsterInstance.get() as instance:
        r = train.execute_in_process(instance=instance, run_config=_with_overrides(strict), asset_selection=[dg.AssetKey("student_model")])
        assert r.success and r.asset_materializations_for_node("student_model")
        challenger = artifacts.read_student(cfg)  # what evaluation_report scores as the student
        assert artifacts.read_student_record(cfg).version == "2"
        size = max(challenger.input_size, teacher.image_size)  # the size evaluation_report loads images at
        model_labelled_eval_set(eval_root, cfg.classes, load_registered(cfg, "champion"), size, challenger=challenger)

        r = train.execute_in_process(instance=instance, run_config=_with_overrides(strict), raise_on_error=False,
                                     asset_selection=[dg.AssetKey("evaluation_report"), dg.AssetKey("champion_student")])
        assert r.asset_materializations_for_node("evaluation_report")
        metrics = json.loads((cfg.path("reports") / "metrics.json").read_text())
        assert metrics["challenger_version"] == "2" and metrics["champion_version"] == "1"
        assert metrics["per_domain"]["disagreement/photo"]["images"] == 2 * len(cfg.classes)
        # the precondition: strictly worse, beyond the tolerance, on the same images
        assert metrics["champion_mean_top1"] == 1.0 and metrics["student_mean_top1"] == 0.0
        assert metrics["champion_mean_top1"] > metrics["student_mean_top1"] + tolerance
        check = _check(r, "not_worse_than_champion")
        assert check is not None and not check.passed
        promoted = bool(r.asset_materializations_for_node("champion_student"))
        assert not promoted and not r.success  # worse: the check fails and promotion never runs
    assert champion_version(cfg) == "1"


def test_broad_images_join_the_students_training_set(ops):
    """distill.broad_images through the train job: student_model decodes that many class-free images
    from the generator and distils on them beside the snapshot, under a fingerprint of its own (the
    pipeline's KD state is not resumed for another training set)."""
    from dfkd_assets.defs.jobs import TRAIN

    train = ops.defs.resolve_job_def(TRAIN)
    with dg.DagsterInstance.get() as instance:
        before = instance.get_latest_materialization_event(dg.AssetKey("student_model")).asset_materialization.metadata
        assert before["num_broad_images"].value == 0
        r = train.execute_in_process(instance=instance, run_config=_with_overrides({"distill": {"broad_images": 12}}),
                                     asset_selection=[dg.AssetKey("student_model")])
        assert r.success
        md = r.asset_materializations_for_node("student_model")[0].metadata
    assert md["num_broad_images"].value == 12
    assert md["num_train_images"].value == before["num_train_images"].value + 12
    assert md["fingerprint"].value != before["fingerprint"].value


def test_predict_reads_the_champion_from_the_registry(ops):
    """The consumer side of the registry: `dfkd predict` loads models:/<name>@champion."""
    cfg = ops.cfg
    images = sorted((ops.root / "eval" / "photo" / "dog").glob("*.png"))[:2]
    out = subprocess.run([sys.executable, "-m", "dfkd_assets.tools.cli", "predict", *map(str, images), "--config", str(ops.cfg_path), "--json"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    pred = json.loads(out.stdout)
    assert pred["model_uri"] == f"models:/{ops.name}@champion" and len(pred["predictions"]) == 2
    assert {c for r in pred["predictions"] for c, _ in r["top"]} <= set(cfg.classes)
    assert abs(sum(p for _, p in pred["predictions"][0]["top"]) - 1) < 1e-4  # all 3 classes listed: probabilities sum to 1


def test_added_class_is_synthesized_alone_and_its_model_is_compared_on_the_old_classes(ops):
    """Add a class: the sensor rebuilds the prompt bank first, then asks for that partition only; the
    model trained for the new class list is compared with the champion trained for the old one on the
    3 classes both serve, and promoted or not by the usual rule on those scores."""
    from dfkd_assets.config import load_config
    from dfkd_assets.core.promotion import compared_scores
    from dfkd_assets.definitions import build_defs
    from dfkd_assets.defs.jobs import PREPARE, SYNTHESIZE, TRAIN
    from dfkd_assets.toyworld.evalset import write_eval_set

    cfg_path = ops.cfg_path
    raw = yaml.safe_load(cfg_path.read_text())
    raw["classes"] = [*raw["classes"], "tree"]
    cfg_path.write_text(yaml.safe_dump(raw))
    write_eval_set(ops.root / "eval", raw["classes"], per_class=3, size=32)
    defs = build_defs(cfg_path)
    with dg.DagsterInstance.get() as instance:
        reqs = _sensor_requests(defs, instance, "stale_partitions")
        assert [r.job_name for r in reqs] == [PREPARE]
        assert defs.resolve_job_def(PREPARE).execute_in_process(instance=instance).success
        reqs = _sensor_requests(defs, instance, "stale_partitions")
        assert [(r.job_name, r.partition_key) for r in reqs] == [(SYNTHESIZE, "tree")]

        # the old champion (3 classes) is compared on the classes both serve, not replaced unseen
        new_cfg = load_config(cfg_path)
        before = champion_version(new_cfg)
        assert before == "1"
        assert defs.resolve_job_def(SYNTHESIZE).execute_in_process(instance=instance, partition_key="tree").success
        r = defs.resolve_job_def(TRAIN).execute_in_process(instance=instance, raise_on_error=False)
        metrics = json.loads((new_cfg.path("reports") / "metrics.json").read_text())
        assert str(metrics["champion_version"]) == str(metrics["champion_seen"]) == before
        assert metrics["shared_classes"] == raw["classes"][:-1] and "champion_mean_top1" not in metrics
        decision = compared_scores(metrics, new_cfg.promotion.metric).decide(new_cfg.promotion.tolerance)
        assert decision.reason.startswith("on the 3 classes both serve (dog, elephant, house): ")
        # the blocking check applies the same comparison: a worse challenger fails the run before promotion
        assert r.success is decision.promote
        assert champion_version(new_cfg) == (str(metrics["challenger_version"]) if decision.promote else before)
        report = (new_cfg.path("reports") / "report.md").read_text()
        assert f"Champion v{before} serves another class list: compared on the 3 classes both serve" in report


def test_failure_sensor_records_and_posts_to_the_webhook(workspace, monkeypatch):
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
    cfg_path = workspace
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
