"""Asset checks. The three that guard the registry are blocking: when one fails with severity
ERROR, Dagster does not run the assets downstream of the checked one in that run, so a corrupt
dataset never trains a student, a non-finite student is never evaluated, and a challenger worse
than the champion (beyond `promotion.tolerance`) never reaches `champion_student`.

Checks are per asset, not per partition (Dagster), so the shard checks run on `synthetic_dataset`,
the snapshot of all class shards that training reads.
"""

import json

import dagster as dg

from dfkd_assets.defs.resources import PipelineSettings


@dg.asset_check(asset="synthetic_dataset", blocking=True, description="Every image decodes, its sha256 matches the manifest, count as configured.")
def shard_integrity(settings: PipelineSettings) -> dg.AssetCheckResult:
    from dfkd_assets.core.io import ShardError, read_shard

    cfg = settings.load()
    problems, counts = [], {}
    for c in cfg.classes:
        try:
            images, _ = read_shard(cfg.class_dir(c), verify=True)
            counts[c] = len(images)
            if len(images) != cfg.synthesis.images_per_class:
                problems.append(f"{c}: {len(images)} images, synthesis.images_per_class is {cfg.synthesis.images_per_class}")
        except ShardError as e:
            problems.append(f"{c}: {e}")
    return dg.AssetCheckResult(
        passed=not problems, severity=dg.AssetCheckSeverity.ERROR,
        metadata={"per_class": dg.MetadataValue.json(counts), "problems": "\n".join(problems) or "none"},
    )


@dg.asset_check(asset="synthetic_dataset", blocking=True, description="The teacher labels enough synthetic images as the class they were made for.")
def teacher_agreement(settings: PipelineSettings) -> dg.AssetCheckResult:
    from dfkd_assets.core.io import ShardError, read_manifest

    cfg = settings.load()
    floor = cfg.checks.min_teacher_agreement
    per_class = {}
    for c in cfg.classes:
        try:
            recs = read_manifest(cfg.class_dir(c))["images"]
        except ShardError:
            continue  # shard_integrity reports it
        per_class[c] = sum(r["teacher_top1"] == c for r in recs) / max(len(recs), 1)
    low = {c: a for c, a in per_class.items() if a < floor}
    return dg.AssetCheckResult(
        passed=not low and len(per_class) == len(cfg.classes), severity=dg.AssetCheckSeverity.ERROR,
        metadata={"per_class": dg.MetadataValue.json(per_class), "floor": floor, "below_floor": dg.MetadataValue.json(low)},
    )


@dg.asset_check(asset="student_model", blocking=True, description="Every student weight is finite.")
def student_weights_finite(settings: PipelineSettings) -> dg.AssetCheckResult:
    import torch
    from safetensors.torch import load_file

    from dfkd_assets.core.student import WEIGHTS

    cfg = settings.load()
    bad = [k for k, v in load_file(cfg.path("student") / WEIGHTS).items() if v.is_floating_point() and not torch.isfinite(v).all()]
    return dg.AssetCheckResult(passed=not bad, severity=dg.AssetCheckSeverity.ERROR, metadata={"non_finite_tensors": ", ".join(bad[:20]) or "none"})


@dg.asset_check(asset="evaluation_report", blocking=True, description="The challenger is not worse than the champion beyond promotion.tolerance.")
def not_worse_than_champion(settings: PipelineSettings) -> dg.AssetCheckResult:
    from dfkd_assets.core.promotion import decide_promotion

    cfg = settings.load()
    metrics = json.loads((cfg.path("reports") / "metrics.json").read_text())
    key = cfg.promotion.metric
    champion = metrics.get(key.replace("student_", "champion_", 1)) if metrics.get("champion_version") else None
    decision = decide_promotion(metrics[key], champion, cfg.promotion.tolerance)
    return dg.AssetCheckResult(
        passed=decision.promote, severity=dg.AssetCheckSeverity.ERROR,
        metadata={"challenger": metrics[key], "champion": str(champion), "tolerance": cfg.promotion.tolerance, "reason": decision.reason},
    )


CHECKS = [shard_integrity, teacher_agreement, student_weights_finite, not_worse_than_champion]
