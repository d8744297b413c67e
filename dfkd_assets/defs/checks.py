"""Asset checks. The three that guard the registry are blocking: when one fails with severity
ERROR, Dagster does not run the assets downstream of the checked one in that run, so a corrupt
dataset never trains a student, a non-finite student is never evaluated, and a challenger worse
than the champion (beyond `promotion.tolerance`) never reaches `champion_student`.

Checks are per asset, not per partition (Dagster), so the shard checks run on `synthetic_dataset`,
the snapshot of all class shards that training reads.
"""

import dagster as dg

from dfkd_assets import artifacts
from dfkd_assets.defs.resources import PipelineSettings


@dg.asset_check(asset="synthetic_dataset", blocking=True,
                description="Every image of every round in the snapshot decodes, its sha256 matches its manifest, round 0's count as configured.")
def shard_integrity(settings: PipelineSettings) -> dg.AssetCheckResult:
    from dfkd_assets.core.io import ShardError

    cfg = settings.load()
    rounds = _snapshot_rounds(cfg)
    problems, counts = [], {}
    for c in cfg.classes:
        try:
            first = len(artifacts.read_class_images(cfg, c))
            if first != cfg.synthesis.images_per_class:
                problems.append(f"{c}: {first} images, synthesis.images_per_class is {cfg.synthesis.images_per_class}")
            counts[c] = first + sum(len(artifacts.read_class_images(cfg, c, [r])) for r in rounds if r)
        except ShardError as e:
            problems.append(f"{c}: {e}")
    return dg.AssetCheckResult(
        passed=not problems, severity=dg.AssetCheckSeverity.ERROR,
        metadata={"per_class": dg.MetadataValue.json(counts), "problems": "\n".join(problems) or "none"},
    )


def _snapshot_rounds(cfg) -> list[int]:
    """The rounds the snapshot holds (training's union; round 0 first); with no snapshot yet (a check
    run on its own, before synthetic_dataset), the class shards of round 0 that it would take."""
    try:
        return artifacts.read_snapshot_index(cfg)["rounds"]
    except FileNotFoundError:
        return [0]


@dg.asset_check(asset="synthetic_dataset", blocking=True, description="The teacher labels enough synthetic images as the class they were made for.")
def teacher_agreement(settings: PipelineSettings) -> dg.AssetCheckResult:
    from dfkd_assets.core.io import ShardError
    from dfkd_assets.stages.synthesis import shard_summary

    cfg = settings.load()
    floor = cfg.checks.min_teacher_agreement
    rounds = _snapshot_rounds(cfg)
    per_class = {}
    for c in cfg.classes:
        try:
            records = [rec for r in rounds for rec in artifacts.read_class_manifest(cfg, c, r)["images"]]
            per_class[c] = shard_summary(c, records)["teacher_agreement"]
        except ShardError:
            continue  # shard_integrity reports it
    low = {c: a for c, a in per_class.items() if a < floor}
    return dg.AssetCheckResult(
        passed=not low and len(per_class) == len(cfg.classes), severity=dg.AssetCheckSeverity.ERROR,
        metadata={"per_class": dg.MetadataValue.json(per_class), "floor": floor, "below_floor": dg.MetadataValue.json(low)},
    )


@dg.asset_check(asset="student_model", blocking=True, description="Every student weight is finite.")
def student_weights_finite(settings: PipelineSettings) -> dg.AssetCheckResult:
    import torch

    bad = [k for k, v in artifacts.read_student_weights(settings.load()).items() if v.is_floating_point() and not torch.isfinite(v).all()]
    return dg.AssetCheckResult(passed=not bad, severity=dg.AssetCheckSeverity.ERROR, metadata={"non_finite_tensors": ", ".join(bad[:20]) or "none"})


@dg.asset_check(asset="evaluation_report", blocking=True, description="The challenger is not worse than the champion beyond promotion.tolerance.")
def not_worse_than_champion(settings: PipelineSettings) -> dg.AssetCheckResult:
    from dfkd_assets.core.promotion import compared_scores

    cfg = settings.load()
    compared = compared_scores(artifacts.read_metrics(cfg), cfg.promotion.metric)
    decision = compared.decide(cfg.promotion.tolerance)
    return dg.AssetCheckResult(
        passed=decision.promote, severity=dg.AssetCheckSeverity.ERROR,
        metadata={"challenger": compared.challenger, "champion": str(compared.champion), "shared_classes": ", ".join(compared.shared_classes),
                  "tolerance": cfg.promotion.tolerance, "reason": decision.reason},
    )


CHECKS = [shard_integrity, teacher_agreement, student_weights_finite, not_worse_than_champion]
