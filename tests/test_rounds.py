"""Scheduled retraining with rounds, through the `retrain` schedule's own tick and job on a
real Dagster instance, MLflow store and DVC repo + remote: every round grows the synthetic set,
each round's training set is a DVC version that restores, and the champion is always the best
evaluated version. Plus the cap (stop, never delete) and the bad settings that name themselves."""

import hashlib
from pathlib import Path

import dagster as dg
import pytest
import yaml

from conftest import make_workspace, registry_client

pytestmark = pytest.mark.e2e

IMAGES, PER_ROUND, CAP = 8, 4, 20  # ci.yaml's 8 per class, then 12, 16, 20: three rounds, the fourth would cross the cap


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _shards(cfg) -> dict[str, str]:
    return {str(p.relative_to(cfg.synthetic_dir)): _sha(p) for p in sorted(cfg.synthetic_dir.rglob("images.tar"))}


def _versions(cfg) -> list:
    client = registry_client(cfg)
    return sorted(client.search_model_versions(f"name='{cfg.mlflow.registered_model_name}'"), key=lambda v: int(v.version))


def _best_evaluated(cfg, versions) -> str:
    """The version with the highest recorded evaluation score (the newest of equals, as the rule promotes on >=)."""
    tag = f"evaluated_{cfg.promotion.metric}"
    scored = [(float(v.tags[tag]), int(v.version)) for v in versions if tag in v.tags]
    return str(max(scored)[1])


def test_three_scheduled_rounds_grow_the_set_version_it_and_keep_the_best_champion(tmp_path, monkeypatch):
    from conftest import champion_version
    from dfkd_assets import artifacts
    from dfkd_assets.config import load_config
    from dfkd_assets.definitions import build_defs
    from dfkd_assets.defs.jobs import ROUND
    from dfkd_assets.defs.resources import DvcRepo
    from dfkd_assets.defs.runner import run_pipeline, run_retrain_rounds

    ops = {"images_per_round": PER_ROUND, "max_images_per_class": CAP, "max_retries": 0, "retry_delay_s": 0}
    # tolerance 0: a challenger promotes only when it scores at least the champion, so "best" is exact
    cfg_path = make_workspace(tmp_path, {"operations": ops, "promotion": {"metric": "student_mean_top1", "tolerance": 0.0}})
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    cfg, defs = load_config(cfg_path), build_defs(cfg_path)
    assert defs.resolve_schedule_def("retrain").job_name == ROUND
    with dg.DagsterInstance.get() as instance:
        assert all(r.success for r in run_pipeline(defs, instance, log=lambda s: None))  # round 0: v1, the first champion
        round0 = _shards(cfg)
        results = run_retrain_rounds(defs, instance, 4, log=lambda s: None)  # three rounds, then the cap
        assert len(results) == 3
        for r in results:  # every round's data and model exist; only promotion may refuse (a worse challenger)
            assert r.asset_materializations_for_node("synthetic_round_images") and r.asset_materializations_for_node("evaluation_report")
        # partitions that say what they hold: rounds 1-3, each materialized for every class
        assert instance.get_dynamic_partitions("synthesis_rounds") == ["1", "2", "3"]
        done = instance.get_materialized_partitions(dg.AssetKey("synthetic_round_images"))
        assert done == {f"{c}|{r}" for c in ("dog", "elephant", "house") for r in (1, 2, 3)}
        skip = defs.resolve_schedule_def("retrain").evaluate_tick(
            dg.build_schedule_context(instance=instance, repository_def=defs.get_repository_def()))
        assert not skip.run_requests and "operations.max_images_per_class (20) reached" in skip.skip_message
        curve = instance.get_latest_materialization_event(dg.AssetKey("evaluation_report")).asset_materialization.metadata

    # earlier shards never rewritten; one new shard per class and round
    after = _shards(cfg)
    assert {k: after[k] for k in round0} == round0
    assert len(after) == 3 * 4 and artifacts.common_rounds(cfg) == [0, 1, 2, 3]

    versions = _versions(cfg)
    assert [v.tags["train_images_per_class"] for v in versions] == ["8", "12", "16", "20"]  # each round trains on more
    assert [v.tags["data_round"] for v in versions] == ["0", "1", "2", "3"]
    assert len({v.tags["dvc_hash"] for v in versions}) == 4  # every round is its own DVC version
    assert champion_version(cfg) == _best_evaluated(cfg, versions)

    # each recorded version restores with dvc into a training set of that round's size
    for v in versions:
        out = DvcRepo().restore(cfg, v.tags["dvc_hash"], cfg.workspace / "data" / "restored" / f"v{v.version}")
        index = artifacts.read_snapshot_index(cfg, out)
        assert index["counts"] == {c: int(v.tags["train_images_per_class"]) for c in cfg.classes}
        assert ",".join(map(str, index["rounds"])) == v.tags["data_rounds"]
        assert len(list(out.rglob("images.tar"))) == 3 * len(index["rounds"])  # the restored folder holds exactly those rounds

    # the curve: one point per round (step = images per class), plotted on the evaluation asset
    assert [x for x, _ in curve["round_curve_points"].value["mean"]] == [8, 12, 16, 20]
    assert "data:image/png;base64," in curve["round_curve"].value
    hist = registry_client(cfg).get_metric_history(curve["round_curve_run_id"].value, "round_curve_top1.mean")
    assert sorted(m.step for m in hist) == [8, 12, 16, 20]

    # a cap below what exists: the tick and the snapshot fail naming the setting, nothing is deleted
    raw = yaml.safe_load(cfg_path.read_text())
    raw["operations"]["max_images_per_class"] = 16
    cfg_path.write_text(yaml.safe_dump(raw))
    low = build_defs(cfg_path)
    with dg.DagsterInstance.get() as instance:
        with pytest.raises(Exception) as tick_error:  # Dagster wraps it in a ScheduleExecutionError: the tick fails, showing it
            low.resolve_schedule_def("retrain").evaluate_tick(dg.build_schedule_context(instance=instance, repository_def=low.get_repository_def()))
        assert "operations.max_images_per_class (16) is below the images that exist" in str(tick_error.value.__cause__)
        r = low.resolve_job_def("distill_evaluate_promote").execute_in_process(
            instance=instance, raise_on_error=False, asset_selection=[dg.AssetKey("synthetic_dataset")])
        assert not r.success and "operations.max_images_per_class" in r.failure_data_for_node("synthetic_dataset").error.message
    assert _shards(cfg) == after


def test_a_round_killed_mid_synthesis_resumes_and_keeps_the_rounds_before_it(tmp_path, monkeypatch):
    """Round 2 fails after its first finished batch (a fault injected into the engine's progress
    callback): round 1 is untouched, round 2 is not published, and the next tick asks for round 2
    again, which keeps the finished batches."""
    import dfkd_assets.stages.synthesis as stage
    from dfkd_assets import artifacts
    from dfkd_assets.config import load_config
    from dfkd_assets.definitions import build_defs
    from dfkd_assets.defs.runner import run_pipeline, run_retrain_rounds

    ops = {"images_per_round": PER_ROUND, "max_retries": 0, "retry_delay_s": 0}
    ci_synthesis = yaml.safe_load((Path(__file__).parents[1] / "configs" / "ci.yaml").read_text())["synthesis"]
    cfg_path = make_workspace(tmp_path, {"operations": ops, "synthesis": {**ci_synthesis, "batch_size": 2}})
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    cfg, defs = load_config(cfg_path), build_defs(cfg_path)
    with dg.DagsterInstance.get() as instance:
        # round 0 and round 1 only: the prepare/synthesis runs, then one tick
        assert all(r.success for r in run_pipeline(defs, instance, log=lambda s: None))
        assert run_retrain_rounds(defs, instance, 1, log=lambda s: None)[0].asset_materializations_for_node("synthetic_round_images")
        round1 = _shards(cfg)

        real = stage.synthesize_class
        work = artifacts.class_work_dir(cfg, "dog", 2)

        def crash_after_first_batch(*args, on_step=None, **kw):
            def step(m, loss):
                if list(work.glob("batch_*")):
                    raise RuntimeError("injected: killed mid-round")
                on_step(m, loss)
            return real(*args, on_step=step, **kw)

        monkeypatch.setattr(stage, "synthesize_class", crash_after_first_batch)
        failed = run_retrain_rounds(defs, instance, 1, log=lambda s: None)
        assert len(failed) == 1 and not failed[0].success
        kept = sorted(work.glob("batch_*"))
        assert kept and not (artifacts.round_dir(cfg, "dog", 2) / "manifest.json").exists()
        assert _shards(cfg) == round1 and artifacts.common_rounds(cfg) == [0, 1]

        monkeypatch.setattr(stage, "synthesize_class", real)
        resumed = run_retrain_rounds(defs, instance, 1, log=lambda s: None)
        assert resumed[0].asset_materializations_for_node("synthetic_round_images")
        cells = resumed[0].asset_materializations_for_node("synthetic_round_images")[0].metadata["cells"].value
    assert cells["dog|2"]["resumed_images"] == 2 and not cells["dog|2"]["reused"]
    assert artifacts.common_rounds(cfg) == [0, 1, 2]
    assert {k: _shards(cfg)[k] for k in round1} == round1


def test_bad_round_settings_name_the_setting(tmp_path):
    from dfkd_assets.config import ConfigError, load_config
    from dfkd_assets.core.rounds import CapError, check_cap, next_growth

    path = make_workspace(tmp_path, {"operations": {"images_per_round": 64, "max_images_per_class": 32}})
    with pytest.raises(ConfigError, match=r"operations\.images_per_round \(64\) is above operations\.max_images_per_class \(32\)"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"operations\.max_images_per_class \(4\) is below synthesis\.images_per_class \(8\)"):
        load_config(path, {"operations": {"images_per_round": 2, "max_images_per_class": 4}})
    with pytest.raises(CapError, match=r"operations\.max_images_per_class \(10\) is below the images that exist: dog 12"):
        check_cap({"dog": 12, "house": 8}, 10)
    assert next_growth(3, 16, 4, 20).fits and not next_growth(4, 20, 4, 20).fits
    assert not next_growth(1, 8, 4, None).reason.startswith("operations")  # no cap: always fits


def test_rounds_draw_fresh_seeds_and_write_folders_of_their_own(tmp_path):
    """Round 0's plan is today's; every round's seeds are new; each round writes (and resumes in) its own
    folders, outside round 0's work folder, which round 0 deletes when its shard is written."""
    import torch

    from dfkd_assets import artifacts
    from dfkd_assets.config import load_config
    from dfkd_assets.core.prompts import PromptBank
    from dfkd_assets.core.seeding import derive_seed
    from dfkd_assets.fingerprints import round_fingerprint
    from dfkd_assets.stages.synthesis import class_plan

    cfg = load_config(make_workspace(tmp_path), {"operations": {"images_per_round": 4}})
    styles = [f"s{i}" for i in range(4)]
    bank = PromptBank("mix", cfg.classes, styles, [[f"{s} {c}" for c in cfg.classes] for s in styles], torch.zeros(4, 3, 8), "teacher")
    plans = {r: class_plan(cfg, bank, "dog", r) for r in range(4)}
    assert plans[0].seeds == [derive_seed(cfg.synthesis.seed, "dog", i) for i in range(IMAGES)] and plans[0].styles == bank.assignments(IMAGES)
    assert [len(p.seeds) for p in plans.values()] == [IMAGES, 4, 4, 4]
    seeds = [s for p in plans.values() for s in p.seeds]
    assert len(set(seeds)) == len(seeds)  # no image of one round repeats another round's start
    assert all(sorted(plans[r].styles) == [0, 1, 2, 3] for r in (1, 2, 3))  # a round of 4 covers the bank's 4 styles once each
    dirs = [artifacts.round_dir(cfg, "dog", r) for r in range(4)]
    work = [artifacts.class_work_dir(cfg, "dog", r) for r in range(4)]
    assert len(set(dirs)) == 4 and len(set(work)) == 4
    assert not any(w.is_relative_to(work[0]) for w in work[1:])
    fps = {round_fingerprint(cfg, "teacher", "dog", r) for r in range(4)}
    assert len(fps) == 4
    # the size of round 0 is not part of a later round's fingerprint: changing it leaves rounds >= 1 current
    (tmp_path / "b").mkdir()
    bigger = load_config(make_workspace(tmp_path / "b"), {"operations": {"images_per_round": 4}, "synthesis": {"images_per_class": 16}})
    assert round_fingerprint(bigger, "teacher", "dog", 2) == round_fingerprint(cfg, "teacher", "dog", 2)
    assert round_fingerprint(bigger, "teacher", "dog", 0) != round_fingerprint(cfg, "teacher", "dog", 0)


def test_drop_round_is_the_explicit_deletion_and_leaves_the_other_rounds(tmp_path):
    from dfkd_assets import artifacts
    from dfkd_assets.config import load_config

    cfg = load_config(make_workspace(tmp_path), {"operations": {"images_per_round": 4}})
    for c in cfg.classes:
        for r in (1, 2):
            d = artifacts.round_dir(cfg, c, r)
            d.mkdir(parents=True)
            (d / "manifest.json").write_text("{}")
    artifacts.round_dir(cfg, "dog", 3).mkdir()  # a round only one class has (unfinished: no manifest)
    assert artifacts.common_rounds(cfg) == [0, 1, 2] and artifacts.class_rounds(cfg, "dog") == [1, 2]
    gone = artifacts.drop_round(cfg, 1)
    assert len(gone) == 3 and artifacts.common_rounds(cfg) == [0, 2]
    assert artifacts.round_dir(cfg, "dog", 3).is_dir()
    with pytest.raises(ValueError, match="round 0"):
        artifacts.drop_round(cfg, 0)


def test_a_student_aware_round_is_made_against_the_champion_and_says_so(tmp_path, monkeypatch):
    """synthesis.student_weight > 0: the retrain round is synthesized against the champion student,
    its manifests name that version; round 0 keeps the fingerprint of the paper's synthesis, a round's
    fingerprint changes with the weight; without a champion the round is refused naming the setting."""
    from dfkd_assets import artifacts
    from dfkd_assets.config import load_config
    from dfkd_assets.definitions import build_defs
    from dfkd_assets.defs.resources import MlflowTracking
    from dfkd_assets.defs.runner import run_pipeline, run_retrain_rounds
    from dfkd_assets.defs.synthesis import STUDENT_AWARE, _champion_to_compete
    from dfkd_assets.fingerprints import round_fingerprint

    ops = {"images_per_round": PER_ROUND, "max_retries": 0, "retry_delay_s": 0}
    ci_synthesis = yaml.safe_load((Path(__file__).parents[1] / "configs" / "ci.yaml").read_text())["synthesis"]
    cfg_path = make_workspace(tmp_path, {"operations": ops, "synthesis": {**ci_synthesis, "student_weight": 2.0}})
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    cfg, defs = load_config(cfg_path), build_defs(cfg_path)
    paper = load_config(cfg_path, {"synthesis": {"student_weight": 0.0}})
    assert round_fingerprint(cfg, "t", "dog", 0) == round_fingerprint(paper, "t", "dog", 0)
    assert round_fingerprint(cfg, "t", "dog", 1) != round_fingerprint(paper, "t", "dog", 1)
    with pytest.raises(ValueError, match=r"synthesis\.student_weight \(2\.0\) .* has none: run the train job first"):
        _champion_to_compete(cfg, MlflowTracking(), log=None)
    with dg.DagsterInstance.get() as instance:
        assert all(r.success for r in run_pipeline(defs, instance, log=lambda s: None))  # round 0: champion v1
        result = run_retrain_rounds(defs, instance, 1, log=lambda s: None)[0]
        cells = result.asset_materializations_for_node("synthetic_round_images")[0].metadata["cells"].value
    for c in cfg.classes:
        made = artifacts.read_class_manifest(cfg, c, 1)[STUDENT_AWARE]
        assert made == {"model": cfg.mlflow.registered_model_name, "version": "1", "student_weight": 2.0}
        assert cells[f"{c}|1"][STUDENT_AWARE]["version"] == "1"
