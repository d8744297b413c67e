"""Scale-out against real services on this machine: Dagster storage on Postgres, an MLflow
tracking server on Postgres, two runs launched at once as separate processes, and the
Kubernetes job spec of a GPU step (built by dagster-k8s, no cluster needed)."""

import json
import os
import socket
import subprocess
import sys
import time
import uuid

import dagster as dg
import pytest
import yaml

from conftest import ROOT, create_postgres_db, make_workspace

pytestmark = pytest.mark.e2e

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def postgres_dbs():
    tag = uuid.uuid4().hex[:8]
    dagster_db = create_postgres_db(f"dfkd_dagster_{tag}")
    if dagster_db is None:
        pytest.skip("no Postgres on 127.0.0.1:5432 (trust auth expected, as on the CI machine)")
    return dagster_db, create_postgres_db(f"dfkd_mlflow_{tag}")


def test_pipeline_on_postgres_dagster_and_mlflow_server_with_concurrent_runs(tmp_path, postgres_dbs, monkeypatch):
    dagster_url, mlflow_url = postgres_dbs
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", mlflow_url, "--artifacts-destination", str(tmp_path / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, (server.stderr.read() or b"")[-2000:]
                time.sleep(1)
        tracking = f"http://127.0.0.1:{port}"
        cfg_path = make_workspace(tmp_path, {"mlflow": {"tracking_uri": tracking, "artifact_location": None, "registered_model_name": "dfkd-pg"}})
        home = tmp_path / "dagster_home"
        (home / "dagster.yaml").write_text((ROOT / "infra" / "dagster-postgres.yaml").read_text())  # the shipped file, unchanged
        env = {**os.environ, "DAGSTER_HOME": str(home), "DAGSTER_PG_URL": dagster_url, "DFKD_CONFIG": str(cfg_path)}
        monkeypatch.setenv("DAGSTER_HOME", str(home))
        monkeypatch.setenv("DAGSTER_PG_URL", dagster_url)

        from dfkd_assets.definitions import build_defs
        from dfkd_assets.defs.jobs import PREPARE, TRAIN

        defs = build_defs(cfg_path)
        with dg.DagsterInstance.get() as instance:
            assert type(instance.run_storage).__name__ == "PostgresRunStorage"
            assert defs.resolve_job_def(PREPARE).execute_in_process(instance=instance).success

        # pools set up front (`dfkd setup-pools`), as infra/README.md says: Dagster's lazy pool-limit
        # insert races when two runs start at once on Postgres (seen here: one of three attempts failed)
        setup = subprocess.run([sys.executable, "-m", "dfkd_assets.tools.cli", "setup-pools", "--config", str(cfg_path), "--gpus", "1"],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert setup.returncode == 0 and "gpu = 1" in setup.stdout, setup.stderr[-2000:]
        # two runs launched at once, as two processes writing to the same Postgres instance
        cmd = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "dfkd_assets.definitions", "--select", 'key:"synthetic_images"', "--partition"]
        procs = [subprocess.Popen(cmd + [k], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for k in ("dog", "elephant")]
        outs = [p.communicate(timeout=600)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
        assert subprocess.run(cmd + ["house"], cwd=ROOT, env=env, capture_output=True, timeout=600).returncode == 0

        with dg.DagsterInstance.get() as instance:
            runs = instance.get_runs()
            synth = [r for r in runs if r.tags.get("dagster/partition") in ("dog", "elephant")]
            assert len(synth) == 2 and all(r.status == dg.DagsterRunStatus.SUCCESS for r in synth)
            for r in synth:  # no lost events: each run's log is complete, start to success, with its materialization
                kinds = [e.dagster_event.event_type_value for e in instance.all_logs(r.run_id) if e.dagster_event]
                assert {"PIPELINE_START", "PIPELINE_SUCCESS"} <= set(kinds) and kinds[-1] == "PIPELINE_SUCCESS"
                assert "ASSET_MATERIALIZATION" in kinds and "STEP_SUCCESS" in kinds
            assert instance.get_materialized_partitions(dg.AssetKey("synthetic_images")) == {"dog", "elephant", "house"}
            assert defs.resolve_job_def(TRAIN).execute_in_process(instance=instance).success

        import mlflow

        client = mlflow.MlflowClient(tracking, tracking)
        champ = client.get_model_version_by_alias("dfkd-pg", "champion")
        assert str(champ.version) == "1" and client.get_run(champ.run_id).info.status == "FINISHED"
        mlflow.set_tracking_uri(tracking)
        from dfkd_assets.defs.registry import load_student_model

        model = load_student_model(client, "models:/dfkd-pg@champion")
        assert list(model.classes) == ["dog", "elephant", "house"]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_kubernetes_job_spec_of_a_gpu_step_requests_a_gpu():
    from dagster_k8s.job import DagsterK8sJobConfig, construct_dagster_k8s_job, get_user_defined_k8s_config

    from dfkd_assets.definitions import build_defs

    defs = build_defs(ROOT / "configs" / "ci.yaml")
    graph = defs.resolve_asset_graph()
    for key, gpu in (("synthetic_images", True), ("student_model", True), ("evaluation_report", True), ("champion_student", False)):
        tags = graph.get(dg.AssetKey(key)).assets_def.op.tags
        user = get_user_defined_k8s_config({k: v if isinstance(v, str) else json.dumps(v) for k, v in tags.items()})
        job = construct_dagster_k8s_job(
            DagsterK8sJobConfig(job_image="dfkd:test", dagster_home="/opt/dagster/dagster_home", image_pull_policy="IfNotPresent"),
            args=["dagster", "api", "execute_step"], job_name=f"dfkd-{key.replace('_', '-')}", user_defined_k8s_config=user,
        )
        limits = job.spec.template.spec.containers[0].resources.limits if job.spec.template.spec.containers[0].resources else None
        assert ((limits or {}).get("nvidia.com/gpu") == "1") == gpu, key
        if gpu:
            assert tags["dagster-celery/queue"] == "gpu"
            pod = job.spec.template.spec
            assert any(t.key == "nvidia.com/gpu" for t in pod.tolerations)
            assert pod.node_selector == {"nvidia.com/gpu.present": "true"}  # GPU nodes only
            # shared volumes: data/ (with the Inductor cache all GPU steps share) and the weights, read-only
            claims = {v.name: v.persistent_volume_claim for v in pod.volumes}
            assert claims["dfkd-data"].claim_name == "dfkd-data" and claims["dfkd-weights"].read_only
            c = pod.containers[0]
            mounts = {m.mount_path: m for m in c.volume_mounts}
            assert mounts["/opt/dfkd/storage/weights"].read_only and mounts["/opt/dfkd/storage/weights"].name == "dfkd-weights"
            cache = next(e.value for e in c.env if e.name == "TORCHINDUCTOR_CACHE_DIR")
            assert cache.startswith(mounts["/opt/dfkd/data"].mount_path + "/")


def test_executor_is_chosen_by_environment(monkeypatch):
    from dfkd_assets.definitions import build_defs

    for kind, name in (("k8s", "k8s"), ("celery", "celery")):
        monkeypatch.setenv("DFKD_EXECUTOR", kind)
        assert build_defs(ROOT / "configs" / "ci.yaml").executor.name == name
    monkeypatch.setenv("DFKD_EXECUTOR", "slurm")
    with pytest.raises(ValueError, match="DFKD_EXECUTOR='slurm'"):
        build_defs(ROOT / "configs" / "ci.yaml")
    celery = yaml.safe_load((ROOT / "infra" / "celery" / "celery.yaml").read_text())
    assert "broker" in celery["execution"]["config"]


def test_kubernetes_image_and_instance_agree_with_the_job_spec():
    """What a cluster user builds and deploys, checked without Docker or a cluster: the image installs
    this project on the Python the project requires, puts it where the job spec mounts the volumes,
    and the instance config runs pods of that image with the same volumes and Inductor cache."""
    import tomllib

    from dfkd_assets.defs.placement import K8S_INDUCTOR_CACHE, K8S_ROOT

    docker = (ROOT / "infra" / "k8s" / "Dockerfile").read_text()
    lines = [ln.strip() for ln in docker.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]  # ">=3.11,<3.12"
    assert lines[0].startswith("FROM python:3.11") and "3.11" in py
    assert f"WORKDIR {K8S_ROOT}" in lines
    for path in ("pyproject.toml", "dfkd_assets", "configs", "infra"):
        assert any(ln.startswith("COPY") and path in ln for ln in lines), path
        assert (ROOT / path).exists()
    assert any("pip install ." in ln for ln in lines) and "HF_HUB_OFFLINE=1" in docker and "DFKD_EXECUTOR=k8s" in docker
    inst = yaml.safe_load((ROOT / "infra" / "k8s" / "dagster.yaml").read_text())["run_launcher"]["config"]
    assert f"TORCHINDUCTOR_CACHE_DIR={K8S_INDUCTOR_CACHE}" in inst["env_vars"]
    mounts = {m["mountPath"]: m for m in inst["volume_mounts"]}
    assert mounts[f"{K8S_ROOT}/storage/weights"].get("readOnly") and f"{K8S_ROOT}/data" in mounts
    assert inst["dagster_home"] in docker


def test_celery_worker_file_carries_the_executor_policy():
    from dfkd_assets.defs.celery import WORKER_SETTINGS

    celery = yaml.safe_load((ROOT / "infra" / "celery" / "celery.yaml").read_text())
    assert celery["execution"]["config"]["config_source"] == WORKER_SETTINGS
