"""configs/paper-smoke.yaml end to end: the paper's architectures (ViT-B-32, f16 VQGAN with 16384
codes, 224 px, ResNet-18) with random weights, through every asset including few-shot, on the
CPU (slow) and on CUDA (gpu)."""

import shutil

import dagster as dg
import pytest
import yaml

from conftest import ROOT

pytestmark = pytest.mark.e2e


def _smoke_workspace(tmp, device):
    from dfkd_assets.core.datasets import PRESETS
    from dfkd_assets.toyworld.evalset import write_eval_set

    cfg = yaml.safe_load((ROOT / "configs" / "paper-smoke.yaml").read_text())
    cfg["workspace"] = str(tmp / "ws")
    cfg["device"] = device
    cfg["generator"]["config_file"] = str(ROOT / cfg["generator"]["config_file"])
    cfg["evaluation"]["datasets"][0]["root"] = str(tmp / "pacs")
    cfg["dvc"] = {"remote_url": str(tmp / "remote")}
    write_eval_set(tmp / "pacs", cfg["classes"], domains=PRESETS["pacs"].domains, per_class=3, size=64)
    (tmp / "pacs" / "photo" / "guitar").mkdir()  # a PACS class outside the config: skipped as configured
    (tmp / "settings.yaml").write_text(yaml.safe_dump(cfg))
    (tmp / "dagster_home").mkdir()
    shutil.copy(ROOT / "dagster_home" / "dagster.yaml", tmp / "dagster_home" / "dagster.yaml")
    return tmp / "settings.yaml"


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.slow), pytest.param("cuda", marks=pytest.mark.gpu)])
def test_paper_smoke_materializes_every_asset(tmp_path, monkeypatch, device):
    from dfkd_assets.config import load_config
    from dfkd_assets.core.io import read_shard
    from dfkd_assets.definitions import build_defs
    from dfkd_assets.defs.runner import run_pipeline

    path = _smoke_workspace(tmp_path, device)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    cfg = load_config(path)
    defs = build_defs(path)
    with dg.DagsterInstance.get() as instance:
        results = run_pipeline(defs, instance, log=lambda s: None)
        assert all(r.success for r in results)
        fs = instance.get_latest_materialization_event(dg.AssetKey("few_shot_report")).asset_materialization
        assert "distilled_minus_scratch_k1" in fs.metadata
    images, _ = read_shard(cfg.class_dir("dog"))
    assert images.shape == (2, 224, 224, 3) and images.std() > 0
    report = (cfg.path("reports") / "report.md").read_text()
    for d in ("art_painting", "cartoon", "photo", "sketch"):
        assert f"pacs/{d}" in report
    assert (cfg.path("reports") / "fewshot.png").stat().st_size > 1000
    import json

    meta = json.loads((cfg.path("student") / "student.json").read_text())
    assert (meta["arch"], meta["input_size"]) == ("resnet18", 224)
