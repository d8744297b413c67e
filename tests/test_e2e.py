"""The whole asset graph with real Dagster, MLflow (SQLite) and DVC (repo + local remote), on CPU."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import torch
import yaml

from conftest import ROOT, make_workspace

pytestmark = pytest.mark.e2e


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def dvc(ws: Path, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=ws, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_whole_graph_end_to_end(workspace):
    import mlflow

    from dfkd_assets.config import load_config
    from dfkd_assets.definitions import build_defs
    from dfkd_assets.defs.runner import run_pipeline

    cfg_path = workspace
    cfg = load_config(cfg_path)
    ws = cfg.workspace
    defs = build_defs(cfg_path)

    with dg.DagsterInstance.get() as instance:
        results = run_pipeline(defs, instance, log=lambda s: None)
        assert all(r.success for r in results) and len(results) == 2 + len(cfg.classes)
        for key in ["teacher_head", "prompt_bank", "synthetic_dataset", "student_model", "evaluation_report", "champion_student"]:
            assert instance.get_latest_materialization_event(dg.AssetKey(key)) is not None, key
        assert instance.get_materialized_partitions(dg.AssetKey("synthetic_images")) == {"dog", "elephant", "house"}
        ev = instance.get_latest_materialization_event(dg.AssetKey("evaluation_report")).asset_materialization
        assert 0.0 <= ev.metadata["student_mean_top1"].value <= 1.0

    # --- shards and manifests ---
    from dfkd_assets.core.io import read_shard

    for c in cfg.classes:
        images, manifest = read_shard(cfg.class_dir(c))
        assert images.shape == (cfg.synthesis.images_per_class, 32, 32, 3)
        assert {r["seed"] for r in manifest["images"]}.__len__() == cfg.synthesis.images_per_class
        assert all(r["teacher_top1"] in cfg.classes and -1 <= r["final_cosine"] <= 1 for r in manifest["images"])

    # --- MLflow registry: the champion loads by alias and predicts like the local student ---
    uri = cfg.resolve(cfg.mlflow.tracking_uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri, uri)
    name = cfg.mlflow.registered_model_name
    champ = client.get_model_version_by_alias(name, "champion")
    assert str(champ.version) == "1"
    dvc_hash = yaml.safe_load((ws / "data" / "synthetic.dvc").read_text())["outs"][0]["md5"]
    assert champ.tags["dvc_hash"] == dvc_hash and champ.tags["config_hash"] == cfg.config_hash()
    assert {"git_sha", "dagster_run_id", "teacher_id"} <= set(champ.tags)
    from dfkd_assets.defs.registry import load_student_model

    model = load_student_model(client, f"models:/{name}@champion")
    x = torch.rand(4, 3, 32, 32)
    from dfkd_assets.core.student import load_student

    with torch.no_grad():
        logits = model(x)
        torch.testing.assert_close(logits, load_student(cfg.path("student"))(x))
    assert logits.shape == (4, 3)
    run = client.get_run(champ.run_id)
    assert run.info.status == "FINISHED" and "eval_student_mean_top1" in run.data.metrics and "kd_loss" in run.data.metrics

    # --- reports, DVC metrics ---
    report = (cfg.path("reports") / "report.md").read_text()
    assert "ci-shapes/photo" in report and "| **mean** |" in report
    assert (cfg.path("reports") / "confusion_ci-shapes_photo.png").stat().st_size > 1000
    metrics = json.loads((cfg.path("reports") / "metrics.json").read_text())
    assert "student_mean_top1" in dvc(ws, "metrics", "show", "--json") and metrics["challenger_version"] == "1"

    # --- DVC: delete shards and the local cache; `dvc pull` restores byte-identical files from the remote ---
    before = {p.relative_to(ws): sha(p) for p in sorted(cfg.synthetic_dir.rglob("*")) if p.is_file()}
    shutil.rmtree(cfg.synthetic_dir)
    shutil.rmtree(ws / ".dvc" / "cache")
    dvc(ws, "pull")
    after = {p.relative_to(ws): sha(p) for p in sorted(cfg.synthetic_dir.rglob("*")) if p.is_file()}
    assert after == before and len(before) == 2 * len(cfg.classes) + 1

    # --- second run: shards are reused, a new version is registered and compared to the champion ---
    with dg.DagsterInstance.get() as instance:
        results = run_pipeline(defs, instance, log=lambda s: None)
        assert all(r.success for r in results)
        synth_meta = results[1].get_asset_materialization_events()[0].materialization.metadata
        assert synth_meta["reused"].value is True
    v2 = client.get_model_version_by_alias(name, "challenger")
    assert str(v2.version) == "2"
    metrics = json.loads((cfg.path("reports") / "metrics.json").read_text())
    assert metrics["champion_version"] == "1" and "champion_mean_top1" in metrics
    # same data and seeds: v2 scores like v1, so it is "not worse" and takes over
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"
    assert client.get_model_version("dfkd-student-ci", "2").tags["previous_champion"] == "1"


def test_mlflow_run_ends_failed_when_the_step_fails(tmp_path):
    import mlflow

    from dfkd_assets.config import load_config
    from dfkd_assets.defs.resources import MlflowTracking

    cfg = load_config(make_workspace(tmp_path))
    tracking = MlflowTracking()
    with pytest.raises(RuntimeError, match="boom"):
        with tracking.run(cfg, "will-fail", {"k": "v"}) as run:
            run_id = run.info.run_id
            raise RuntimeError("boom")
    assert tracking.client(cfg).get_run(run_id).info.status == "FAILED"
    assert mlflow.active_run() is None


def test_cli_string_selection_materializes(tmp_path):
    """`dagster asset materialize --select <string>` through the real CLI (antlr4 guard, DEPENDENCIES.md #1)."""
    cfg_path = make_workspace(tmp_path)
    env = {**os.environ, "DFKD_CONFIG": str(cfg_path), "DAGSTER_HOME": str(tmp_path / "dagster_home")}
    out = subprocess.run(
        [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "dfkd_assets.definitions", "--select", "key:teacher_head or key:prompt_bank"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    ws = tmp_path / "ws"
    assert (ws / "data" / "prompt_bank" / "bank.json").is_file() and (ws / "data" / "teacher_head" / "head.safetensors").is_file()
    assert json.loads((ws / "data" / "prompt_bank" / "bank.json").read_text())["classes"] == ["dog", "elephant", "house"]


@pytest.mark.parametrize("method", ["vanilla", "mix", "random", "contrastive"])
def test_prompt_method_switches_the_pipeline_per_run(workspace, method):
    """A launchpad override of prompts.method changes the bank and the images' prompts."""
    from dfkd_assets.config import load_config
    from dfkd_assets.core.io import read_manifest
    from dfkd_assets.definitions import build_defs
    from dfkd_assets.defs.jobs import PREPARE, SYNTHESIZE

    cfg_path = workspace
    overrides = {"prompts": {"method": method, "num_styles": 3, "steps": 10}, "synthesis": {"images_per_class": 3, "iterations": 2}}
    run_config = {"resources": {"settings": {"config": {"overrides": overrides}}}}
    defs = build_defs(cfg_path)
    with dg.DagsterInstance.get() as instance:
        r = defs.resolve_job_def(PREPARE).execute_in_process(instance=instance, run_config=run_config)
        meta = r.asset_materializations_for_node("prompt_bank")[0].metadata
        assert meta["method"].value == method
        assert meta["num_styles"].value == (1 if method == "vanilla" else 3)
        assert 0 <= meta["class_preserved"].value <= 1
        assert ("contrastive_loss" in meta) == (method == "contrastive")
        defs.resolve_job_def(SYNTHESIZE).execute_in_process(instance=instance, run_config=run_config, partition_key="dog")
    cfg = load_config(cfg_path, overrides)
    recs = read_manifest(cfg.class_dir("dog"))["images"]
    assert [r["style_id"] for r in recs] == ([0, 0, 0] if method == "vanilla" else [0, 1, 2])
    expected = {"vanilla": "a photo of a dog", "mix": "style of a dog", "random": "a <S_1> style of a dog", "contrastive": "a <S_1> style of a dog"}[method]
    assert expected in recs[1]["prompt"]
    diag = json.loads((cfg.path("prompt_bank") / "diagnostics.json").read_text())
    assert diag["method"] == method and len(diag["per_style"]) == (1 if method == "vanilla" else 3)
