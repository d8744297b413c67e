"""The Definitions object Dagster loads (`make ui` = `dagster dev --host 127.0.0.1 -m dfkd_assets.definitions`).

Only the class list is read at load time (it defines the partitions); everything else is read
by each run from the settings resource. No torch/mlflow import happens here.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from dfkd_assets.config import config_path_from_env, load_config
from dfkd_assets.core.names import class_key
from dfkd_assets.defs.automation import build_automation
from dfkd_assets.defs.checks import CHECKS
from dfkd_assets.defs.dataset import synthetic_dataset
from dfkd_assets.defs.evaluation import evaluation_report
from dfkd_assets.defs.export import champion_int8, champion_onnx
from dfkd_assets.defs.fewshot import few_shot_report
from dfkd_assets.defs.jobs import build_jobs
from dfkd_assets.defs.promotion import champion_student
from dfkd_assets.defs.prompts import prompt_bank, teacher_head
from dfkd_assets.defs.resources import DvcRepo, MlflowTracking, bound_settings
from dfkd_assets.defs.rollback import rollback_champion
from dfkd_assets.defs.student import student_head, student_model
from dfkd_assets.defs.synthesis import build_synthetic_images, build_synthetic_rounds, round_partitions

EXECUTOR_ENV = "DFKD_EXECUTOR"


def executor_from_env():
    """`DFKD_EXECUTOR`: empty = Dagster's default (multiprocess), `k8s` = one pod per step
    (dagster-k8s), `celery` = Celery workers with a `gpu` queue (dagster-celery). See infra/."""
    import os

    kind = os.environ.get(EXECUTOR_ENV, "")
    if kind == "k8s":
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor
    if kind == "celery":  # dagster-celery with queue prefixes and env defaults (defs/celery.py)
        from dfkd_assets.defs.celery import build_celery_executor

        return build_celery_executor()
    if kind:
        raise ValueError(f"{EXECUTOR_ENV}={kind!r}: expected empty, 'k8s' or 'celery'")
    return None


def build_defs(config_file: str | Path | None = None) -> dg.Definitions:
    config_file = Path(config_file) if config_file else config_path_from_env()
    cfg = load_config(config_file)
    partitions = dg.StaticPartitionsDefinition([class_key(c) for c in cfg.classes])
    assets = [teacher_head, prompt_bank, build_synthetic_images(partitions), build_synthetic_rounds(round_partitions(partitions)), synthetic_dataset,
              student_model, student_head, evaluation_report, champion_student, champion_onnx]
    if cfg.fewshot.enabled:
        assets.append(few_shot_report)
    if cfg.quantization.enabled:
        assets.append(champion_int8)
    jobs = {j.name: j for j in build_jobs(cfg)}
    schedules, sensors = build_automation(cfg, str(config_file), jobs)
    return dg.Definitions(
        assets=assets,
        asset_checks=CHECKS,
        jobs=[*jobs.values(), rollback_champion],
        schedules=schedules,
        sensors=sensors,
        executor=executor_from_env(),
        resources={
            "settings": bound_settings(str(config_file)),
            "mlflow_tracking": MlflowTracking(),
            "dvc": DvcRepo(),
        },
    )


defs = build_defs()
