"""The `rollback_champion` job: alias `champion` back to a named or the previous evaluated version
(the rules live in defs/registry.py)."""

import dagster as dg
from pydantic import Field

from dfkd_assets.defs.registry import ModelRegistry, RegistryError
from dfkd_assets.defs.resources import MlflowTracking, PipelineSettings

ROLLBACK = "rollback_champion"


class RollbackConfig(dg.Config):
    to_version: str = Field("", description="version to make champion; empty = the current champion's previous_champion")


@dg.op(pool="registry", description="Move alias `champion` back to an earlier evaluated version and record why in the registry.")
def move_champion_back(context: dg.OpExecutionContext, config: RollbackConfig, settings: PipelineSettings, mlflow_tracking: MlflowTracking) -> str:
    registry = ModelRegistry(settings.load(), mlflow_tracking)
    try:
        current, target = registry.rollback(config.to_version)
    except RegistryError as e:
        raise dg.Failure(str(e), allow_retries=False) from e
    context.log.info(f"v{target} is already the champion" if target == current else f"champion of {registry.name}: v{current} -> v{target} (rollback)")
    return target


@dg.job(name=ROLLBACK, description="Move alias `champion` back to a named or the previous evaluated version.")
def rollback_champion():
    move_champion_back()
