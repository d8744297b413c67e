"""Asset `champion_student`: applies the pure promotion rule and moves the MLflow alias `champion`.

Promotions run one at a time (Dagster pool `registry`, limit 1, shared by the rollback job): the
rule reads the current champion, then moves the alias, and two promotions interleaved there would
both believe they replace the same champion. Serialized, the second one sees the alias moved
after its evaluation and stops, asking for a new evaluation against the new champion. Only a
version the registry marks as evaluated (`evaluated_<metric>`, set by evaluation_report after
everything else of the evaluation is recorded) can become champion.
"""


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
    pool="registry",
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
    evaluated = f"evaluated_{key}"
    recorded = client.get_model_version(name, challenger).tags.get(evaluated)
    if recorded is None or (metrics[key] is not None and recorded != str(metrics[key])):
        raise dg.Failure(
            f"v{challenger} has not passed evaluation: the registry has {evaluated}={recorded!r}, "
            f"{cfg.path('reports') / 'metrics.json'} says {metrics[key]!r}; re-materialize evaluation_report",
            allow_retries=False,
        )
    current = mlflow_tracking.alias_version(cfg, "champion")
    # a champion trained for other classes is seen but not compared: it must not read as "moved"
    seen = metrics.get("champion_seen", metrics["champion_version"])
    if current is not None and current != seen and current != challenger:
        compared = f"v{metrics['champion_version']}" if metrics["champion_version"] else "no champion"
        raise dg.Failure(
            f"alias champion moved to v{current} after evaluation_report compared v{challenger} against {compared} "
            "(another promotion or a rollback since): re-materialize evaluation_report",
            allow_retries=False,
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
