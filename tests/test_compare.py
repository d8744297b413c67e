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


def test_compare_rounds_share_round_0_and_student_aware_rounds_make_other_images(tmp_path):
    """`dfkd compare --rounds 1`: round 0 (images and student) is shared by the plain and the
    student-aware arm; each arm's round 1 has its own resumable folder, the student-aware one other
    images from the same seeds; the final student is trained on the union, the round-0 one's score kept."""
    from dfkd_assets.config import load_config
    from dfkd_assets.tools.compare import compare

    cfg_path = make_workspace(tmp_path, {"operations": {"images_per_round": 4}})
    work = tmp_path / "work"
    plain = compare(load_config(cfg_path), ["contrastive"], [0], tmp_path / "plain", log=lambda s: None, work=work, rounds=1)
    run_dir = work / "contrastive_s0"
    stamps = {b: b.stat().st_mtime_ns for b in run_dir.glob("*/batch_*.npz")}  # round 0's batches
    aware = compare(load_config(cfg_path, {"synthesis": {"student_weight": 5.0}}), ["contrastive"], [0], tmp_path / "aware",
                    log=lambda s: None, work=work, rounds=1)
    assert stamps and {b: b.stat().st_mtime_ns for b in run_dir.glob("*/batch_*.npz")} == stamps  # round 0 reused
    rounds = sorted((run_dir / "round1").glob("dog-*"))
    assert len(rounds) == 2

    def images(d):
        return np.concatenate([np.load(b)["images"] for b in sorted(d.glob("batch_*.npz"))])

    a, b = (images(d) for d in rounds)
    assert a.shape == b.shape == (4, 32, 32, 3) and not np.array_equal(a, b)
    # students: round 0 (shared), and one per arm on its union
    assert len(list((run_dir / "student").iterdir())) == 3
    for res in (plain, aware):
        assert "round0_mean" in res["runs"][0]
    assert plain["runs"][0]["round0_mean"] == aware["runs"][0]["round0_mean"]
