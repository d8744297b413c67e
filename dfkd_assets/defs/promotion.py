"""Asset `champion_student`: applies the pure promotion rule (core/promotion.py) and moves the
MLflow alias `champion` (defs/registry.py).

Promotions run one at a time (Dagster pool `registry`, limit 1, shared by the rollback job): the
rule reads the current champion, then moves the alias, and two promotions interleaved there would
both believe they replace the same champion. Serialized, the second one sees the alias moved
after its evaluation and stops, asking for a new evaluation against the new champion. Only a
version the registry marks as evaluated (set by evaluation_report after everything else of the
evaluation is recorded) can become champion.
"""


import dagster as dg

from dfkd_assets import artifacts
from dfkd_assets.defs.errors import no_retry_for_bad_input
from dfkd_assets.defs.lineage import lineage
from dfkd_assets.defs.registry import ModelRegistry
from dfkd_assets.defs.resources import MlflowTracking, PipelineSettings


@dg.asset(
    group_name="training",
    deps=["evaluation_report"],
    kinds={"mlflow"},
    pool="registry",
    description="Champion/challenger promotion: moves alias `champion` when the challenger is not worse beyond tolerance.",
)
@no_retry_for_bad_input
def champion_student(context: dg.AssetExecutionContext, settings: PipelineSettings, mlflow_tracking: MlflowTracking) -> dg.MaterializeResult:
    from dfkd_assets.core.promotion import PromotionRefused, compared_scores, promotion_decision

    cfg = settings.load()
    registry = ModelRegistry(cfg, mlflow_tracking)
    metrics, key = artifacts.read_metrics(cfg), cfg.promotion.metric
    if key not in metrics:
        have = sorted(k for k in metrics if k.endswith("top1"))
        raise KeyError(f"promotion.metric {key!r} is not in {artifacts.metrics_path(cfg)} (have {have})")
    challenger = metrics["challenger_version"]
    recorded = registry.evaluated_score(challenger)
    if recorded is None or (metrics[key] is not None and recorded != str(metrics[key])):
        raise dg.Failure(f"v{challenger} has not passed evaluation: the registry has {registry.evaluated_tag}={recorded!r}, "
                         f"{artifacts.metrics_path(cfg)} says {metrics[key]!r}; re-materialize evaluation_report", allow_retries=False)
    current = registry.champion()
    try:
        decision = promotion_decision(metrics, key, cfg.promotion.tolerance, current)
    except PromotionRefused as e:
        raise dg.Failure(str(e), allow_retries=False) from e
    if decision.promote:
        registry.promote(challenger, current, decision.reason)
    final = registry.champion()
    context.log.info(f"promotion of v{challenger}: {'PROMOTED' if decision.promote else 'kept v' + str(final)} ({decision.reason})")
    compared = compared_scores(metrics, key) if current not in (None, challenger) else None
    return dg.MaterializeResult(
        metadata={
            "champion_version": str(final), "challenger_version": challenger, "previous_champion": str(current),
            "promoted": decision.promote, "reason": decision.reason, "challenger_score": compared.challenger if compared else metrics[key],
            "champion_score": str(compared.champion if compared else None),
            "shared_classes": ", ".join(compared.shared_classes) if compared else "",
            "model_uri": registry.model_uri(), **lineage(cfg, context),
        }
    )
