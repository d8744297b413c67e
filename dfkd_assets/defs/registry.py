"""Registry operations that are not assets: the `rollback_champion` job.

Rollback moves alias `champion` back to a named version or to the current champion's
`previous_champion` tag. Only a version that was evaluated (it carries the
`evaluated_<metric>` tag written by evaluation_report) can become champion this way.
"""

from datetime import datetime, timezone

import dagster as dg
from pydantic import Field

from dfkd_assets.defs.resources import MlflowTracking, PipelineSettings

ROLLBACK = "rollback_champion"


class RollbackConfig(dg.Config):
    to_version: str = Field("", description="version to make champion; empty = the current champion's previous_champion")


@dg.op(pool="registry", description="Move alias `champion` back to an earlier evaluated version and record why in the registry.")
def move_champion_back(context: dg.OpExecutionContext, config: RollbackConfig, settings: PipelineSettings, mlflow_tracking: MlflowTracking) -> str:
    from mlflow.exceptions import MlflowException

    cfg = settings.load()
    name = cfg.mlflow.registered_model_name
    client = mlflow_tracking.client(cfg)
    current = mlflow_tracking.alias_version(cfg, "champion")
    if current is None:
        raise dg.Failure(f"model {name} has no champion to roll back", allow_retries=False)
    target = config.to_version.lstrip("v") or client.get_model_version(name, current).tags.get("previous_champion", "")
    if target in ("", "None"):
        raise dg.Failure(f"champion v{current} has no previous_champion; give ops.move_champion_back.config.to_version", allow_retries=False)
    try:
        version = client.get_model_version(name, target)
    except MlflowException as e:
        raise dg.Failure(f"model {name} has no version {target!r}: {e.message}", allow_retries=False) from e
    evaluated = f"evaluated_{cfg.promotion.metric}"
    if evaluated not in version.tags:
        raise dg.Failure(f"v{target} was never evaluated (no {evaluated} tag): refusing to make it champion", allow_retries=False)
    if target == current:
        context.log.info(f"v{target} is already the champion")
        return target
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    client.set_registered_model_alias(name, "champion", target)
    client.set_model_version_tag(name, target, "rolled_back_from", current)
    client.set_model_version_tag(name, target, "rolled_back_at", now)
    history = client.get_registered_model(name).tags.get("champion_history", "")
    client.set_registered_model_tag(name, "champion_history", f"{history} rollback:v{target}@{now}".strip()[-5000:])
    context.log.info(f"champion of {name}: v{current} -> v{target} (rollback)")
    return target


@dg.job(name=ROLLBACK, description="Move alias `champion` back to a named or the previous evaluated version.")
def rollback_champion():
    move_champion_back()
