"""Asset `champion_student`: applies the pure promotion rule and moves the MLflow alias `champion`."""


import json
from datetime import datetime, timezone

import dagster as dg

from dfkd_assets.defs.errors import no_retry_for_bad_input

from dfkd_assets.defs.lineage import lineage
from dfkd_assets.defs.resources import MlflowTracking, PipelineSettings


@dg.asset(
    group_name="training",
    deps=["evaluation_report"],
    kinds={"mlflow"},
    description="Champion/challenger promotion: moves alias `champion` when the challenger is not worse beyond tolerance.",
)
@no_retry_for_bad_input
def champion_student(context: dg.AssetExecutionContext, settings: PipelineSettings, mlflow_tracking: MlflowTracking) -> dg.MaterializeResult:
    from dfkd_assets.core.promotion import decide_promotion

    cfg = settings.load()
    metrics = json.loads((cfg.path("reports") / "metrics.json").read_text())
    challenger = metrics["challenger_version"]
    key = cfg.promotion.metric
    if key not in metrics:
        raise KeyError(f"promotion.metric {key!r} is not in {cfg.path('reports') / 'metrics.json'} (have {sorted(k for k in metrics if k.endswith('top1'))})")
    champ_key = key.replace("student_", "champion_", 1)
    name = cfg.mlflow.registered_model_name
    client = mlflow_tracking.client(cfg)
    current = mlflow_tracking.alias_version(cfg, "champion")
    if current is not None and current != metrics["champion_version"] and current != challenger:
        raise RuntimeError(
            f"alias champion moved to v{current} after evaluation_report compared against v{metrics['champion_version']}: "
            "re-materialize evaluation_report"
        )
    champion_score = metrics.get(champ_key) if current not in (None, challenger) else None
    decision = decide_promotion(metrics[key], champion_score, cfg.promotion.tolerance)
    if current == challenger:
        decision = type(decision)(False, f"v{challenger} is already the champion")
    if decision.promote:
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        client.set_model_version_tag(name, challenger, "previous_champion", str(current))
        client.set_model_version_tag(name, challenger, "promoted_at", now)
        client.set_model_version_tag(name, challenger, "promotion_reason", decision.reason)
        client.set_registered_model_alias(name, "champion", challenger)
        history = client.get_registered_model(name).tags.get("champion_history", "")
        entry = f"v{challenger}@{now}"
        client.set_registered_model_tag(name, "champion_history", f"{history} {entry}".strip()[-5000:])
    final = mlflow_tracking.alias_version(cfg, "champion")
    context.log.info(f"promotion of v{challenger}: {'PROMOTED' if decision.promote else 'kept v' + str(final)} ({decision.reason})")
    return dg.MaterializeResult(
        metadata={
            "champion_version": str(final),
            "challenger_version": challenger,
            "previous_champion": str(current),
            "promoted": decision.promote,
            "reason": decision.reason,
            "challenger_score": metrics[key],
            "champion_score": str(champion_score),
            "model_uri": f"models:/{name}@champion",
            **lineage(cfg, context),
        }
    )
