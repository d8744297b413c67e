"""The MLflow model registry as this pipeline uses it: the one module that owns its aliases and
tag names (docs/ARCHITECTURE.md).

- `challenger`: the newest trained version (student_model).
- `evaluated_<promotion.metric>`: set on a version by evaluation_report after everything else of
  its evaluation is recorded; only such a version may become champion (promotion or rollback).
- `champion`: what consumers load (`models:/<name>@champion`); moved by champion_student through
  the pure rule in core/promotion.py, or by the rollback_champion job. Each move records
  `previous_champion`, `promoted_at`, `promotion_reason` (or `rolled_back_from`, `rolled_back_at`)
  on the version and appends to the registered model's `champion_history` tag.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING

from dfkd_assets.config import DfkdConfig

if TYPE_CHECKING:  # this module is imported by `dfkd predict`, which needs no Dagster
    from dfkd_assets.defs.resources import MlflowTracking

CHAMPION, CHALLENGER = "champion", "challenger"
PREVIOUS_CHAMPION, PROMOTED_AT, PROMOTION_REASON = "previous_champion", "promoted_at", "promotion_reason"
ROLLED_BACK_FROM, ROLLED_BACK_AT = "rolled_back_from", "rolled_back_at"
HISTORY = "champion_history"
HISTORY_MAX_CHARS = 5000  # MLflow's tag value limit is larger; the oldest entries are dropped first
PIP_REQUIREMENTS = ["torch", "torchvision", "timm", "dfkd-assets"]


def champion_uri(cfg: DfkdConfig) -> str:
    """What consumers load: `models:/<name>@champion`."""
    return f"models:/{cfg.mlflow.registered_model_name}@{CHAMPION}"


class RegistryError(RuntimeError):
    """A registry operation that must not happen (no such version, never evaluated, nothing to roll back)."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ModelRegistry:
    """`cfg.mlflow.registered_model_name` in the registry of `tracking`."""

    def __init__(self, cfg: DfkdConfig, tracking: "MlflowTracking"):
        self.cfg, self.tracking, self.name = cfg, tracking, cfg.mlflow.registered_model_name
        self.evaluated_tag = f"evaluated_{cfg.promotion.metric}"

    @property
    def client(self):
        return self.tracking.client(self.cfg)

    def champion(self) -> str | None:
        return self.tracking.alias_version(self.cfg, CHAMPION)

    def model_uri(self, version: str | None = None) -> str:
        return f"models:/{self.name}/{version}" if version else champion_uri(self.cfg)

    def register_challenger(self, student, input_example, tags: dict[str, str]) -> str:
        """Log `student` in the active MLflow run as a new version with `tags`; alias `challenger` -> it."""
        import mlflow.pytorch

        info = mlflow.pytorch.log_model(
            student, name="student", registered_model_name=self.name, input_example=input_example,
            pip_requirements=PIP_REQUIREMENTS, serialization_format="pickle",
        )
        version = str(info.registered_model_version)  # from log_model's answer, never "the highest version"
        client = self.client
        for key, value in tags.items():
            client.set_model_version_tag(self.name, version, key, value)
        client.set_registered_model_alias(self.name, CHALLENGER, version)
        return version

    def load(self, version: str, device="cpu"):
        import mlflow.pytorch

        self.client  # sets the tracking/registry URIs
        return mlflow.pytorch.load_model(self.model_uri(version), map_location=device).eval()

    def run_id(self, version: str) -> str:
        return self.client.get_model_version(self.name, version).run_id

    def log_evaluation(self, run_id: str, metrics: dict[str, float], reports_dir) -> None:
        """Scores as metrics of the version's run (non-finite ones left out), the report folder as artifacts."""
        import math

        client = self.client
        for key, value in metrics.items():
            if math.isfinite(value):
                client.log_metric(run_id, key, value)
        client.log_artifacts(run_id, str(reports_dir), "evaluation")

    def log_artifacts(self, version: str, paths: list, folder: str) -> None:
        """Files attached to the run that produced `version` (e.g. its ONNX export)."""
        client, run_id = self.client, self.run_id(version)
        for p in paths:
            client.log_artifact(run_id, str(p), folder)

    def mark_evaluated(self, version: str, score) -> None:
        """Last step of an evaluation: from now on the version may become champion."""
        self.client.set_model_version_tag(self.name, version, self.evaluated_tag, str(score))

    def evaluated_score(self, version: str) -> str | None:
        return self.client.get_model_version(self.name, version).tags.get(self.evaluated_tag)

    def promote(self, version: str, previous: str | None, reason: str) -> None:
        client, now = self.client, _now()
        client.set_model_version_tag(self.name, version, PREVIOUS_CHAMPION, str(previous))
        client.set_model_version_tag(self.name, version, PROMOTED_AT, now)
        client.set_model_version_tag(self.name, version, PROMOTION_REASON, reason)
        client.set_registered_model_alias(self.name, CHAMPION, version)
        self._append_history(f"v{version}@{now}")

    def rollback(self, to_version: str = "") -> tuple[str, str]:
        """Move `champion` to `to_version` ('' = the current champion's previous_champion), which must
        have been evaluated; returns (from, to)."""
        from mlflow.exceptions import MlflowException

        current = self.champion()
        if current is None:
            raise RegistryError(f"model {self.name} has no champion to roll back")
        client = self.client
        target = to_version.lstrip("v") or client.get_model_version(self.name, current).tags.get(PREVIOUS_CHAMPION, "")
        if target in ("", "None"):
            raise RegistryError(f"champion v{current} has no {PREVIOUS_CHAMPION}; give ops.move_champion_back.config.to_version")
        try:
            version = client.get_model_version(self.name, target)
        except MlflowException as e:
            raise RegistryError(f"model {self.name} has no version {target!r}: {e.message}") from e
        if self.evaluated_tag not in version.tags:
            raise RegistryError(f"v{target} was never evaluated (no {self.evaluated_tag} tag): refusing to make it champion")
        if target != current:
            now = _now()
            client.set_registered_model_alias(self.name, CHAMPION, target)
            client.set_model_version_tag(self.name, target, ROLLED_BACK_FROM, current)
            client.set_model_version_tag(self.name, target, ROLLED_BACK_AT, now)
            self._append_history(f"rollback:v{target}@{now}")
        return current, target

    def history(self) -> list[str]:
        """Champion moves, oldest first: 'v3@<time>' for a promotion, 'rollback:v2@<time>' for a rollback."""
        return self.client.get_registered_model(self.name).tags.get(HISTORY, "").split()

    def _append_history(self, entry: str) -> None:
        text = " ".join([*self.history(), entry])[-HISTORY_MAX_CHARS:]
        self.client.set_registered_model_tag(self.name, HISTORY, text)
