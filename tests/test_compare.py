"""`dfkd compare` runs the product's stages: for the same settings its images are the pipeline's
own shard, pixel for pixel, and a distillation lever compared against its control reuses the
control's synthesis."""

import numpy as np
import pytest

from conftest import make_workspace

pytestmark = pytest.mark.e2e


def test_compare_makes_the_pipelines_images_and_levers_share_synthesis(tmp_path, monkeypatch):
    import dagster as dg

    from dfkd_assets.artifacts import read_class_images
    from dfkd_assets.config import load_config
    from dfkd_assets.definitions import build_defs
    from dfkd_assets.defs.jobs import PREPARE, SYNTHESIZE
    from dfkd_assets.tools.compare import compare

    cfg_path = make_workspace(tmp_path)  # Contrastive-Prompt, every seed 0: what compare's seed-0 variant is
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    cfg = load_config(cfg_path)
    defs = build_defs(cfg_path)
    with dg.DagsterInstance.get() as instance:
        assert defs.resolve_job_def(PREPARE).execute_in_process(instance=instance).success
        assert defs.resolve_job_def(SYNTHESIZE).execute_in_process(instance=instance, partition_key="dog").success
    shard = read_class_images(cfg, "dog")

    work = tmp_path / "work"
    control = compare(cfg, ["contrastive"], [0], tmp_path / "control", log=lambda s: None, work=work)
    batches = sorted((work / "contrastive_s0" / "dog").glob("batch_*.npz"))
    made = np.concatenate([np.load(b)["images"] for b in batches])
    assert made.shape == shard.shape and np.array_equal(made, shard)

    stamps = {b: b.stat().st_mtime_ns for b in (work / "contrastive_s0").rglob("batch_*.npz")}
    lever = compare(load_config(cfg_path, {"distill": {"feature_weight": 1.0, "broad_images": 8}}), ["contrastive"], [0], tmp_path / "lever",
                    log=lambda s: None, work=work)
    assert {b: b.stat().st_mtime_ns for b in (work / "contrastive_s0").rglob("batch_*.npz")} == stamps  # synthesis reused
    assert len(list((work / "contrastive_s0" / "student").iterdir())) == 2  # one KD state per setting
    for res in (control, lever):
        assert set(res["summary"]) == {"contrastive"} and set(res["teacher"]) == set(res["runs"][0]["top1"])
    assert (tmp_path / "lever" / "compare.md").read_text().count("contrastive (n=1)") == 1
