"""The Celery executor dfkd uses when `DFKD_EXECUTOR=celery` (dagster-celery underneath).

Two things differ from `dagster_celery.celery_executor`, both so that a fleet of workers can share a
broker with other users and survive a worker killed mid-step:

- Broker and result backend default to `$DFKD_CELERY_BROKER` / `$DFKD_CELERY_BACKEND`, so runs that
  carry no run config (backfills launched from the UI, schedules, sensors) reach the fleet too.
- Every queue name gets `$DFKD_CELERY_QUEUE_PREFIX` in front (`gpu` -> `<prefix>gpu`, `dagster` ->
  `<prefix>dagster`), so two fleets (or a fleet and a test) on one broker never take each other's steps.
  Workers listen on the prefixed names (`dfkd fleet up` starts them so).

`WORKER_SETTINGS` is the Celery policy both sides need (`dfkd fleet up` writes it into the workers'
YAML; `infra/celery/celery.yaml` carries it too): a task is acknowledged only after the step ended
(`task_acks_late`), and a worker that dies mid-step gives it back (`task_reject_on_worker_lost`), so
the broker re-delivers the step to another worker; synthesis then resumes from its finished batches.
"""

from __future__ import annotations

import os

import dagster as dg

BROKER_ENV = "DFKD_CELERY_BROKER"
BACKEND_ENV = "DFKD_CELERY_BACKEND"
QUEUE_PREFIX_ENV = "DFKD_CELERY_QUEUE_PREFIX"

WORKER_SETTINGS = {
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    "worker_prefetch_multiplier": 1,
    # no pidbox / event queues on the broker: a fleet leaves only its two work queues, deleted at `fleet down`
    "worker_enable_remote_control": False,
    "worker_send_task_events": False,
    "broker_connection_retry_on_startup": True,
}


def celery_settings(prefix: str) -> dict:
    """WORKER_SETTINGS plus the result keys' Redis prefix: the producer (run worker) and the workers must agree on it."""
    return {**WORKER_SETTINGS, **({"result_backend_transport_options": {"global_keyprefix": prefix}} if prefix else {})}


def queue_names(prefix: str) -> list[str]:
    """The queues a worker of this project serves: GPU steps (defs/placement.py) and all others."""
    return [f"{prefix}gpu", f"{prefix}dagster"]


def _executor_class():
    from dagster_celery.executor import CeleryExecutor, _submit_task

    class PrefixedCeleryExecutor(CeleryExecutor):
        def __init__(self, queue_prefix: str, **kwargs):
            super().__init__(**kwargs)
            self.queue_prefix = queue_prefix

        def execute(self, plan_context, execution_plan):
            from dagster_celery.core_execution_loop import core_celery_execution_loop

            prefix = self.queue_prefix

            def submit(app, ctx, step, queue, priority, known_state):
                return _submit_task(app, ctx, step, prefix + queue, priority, known_state)

            return core_celery_execution_loop(plan_context, execution_plan, step_execution_fn=submit)

    return PrefixedCeleryExecutor


def _config_schema():
    from dagster_celery.executor import CELERY_CONFIG

    return {
        **CELERY_CONFIG,
        "backend": dg.Field(dg.Noneable(dg.StringSource), is_required=False, description=f"default: ${BACKEND_ENV}, else rpc://"),
        "queue_prefix": dg.Field(dg.Noneable(str), is_required=False, description=f"default: ${QUEUE_PREFIX_ENV}, else none"),
    }


def build_celery_executor() -> dg.ExecutorDefinition:
    from dagster._core.execution.retries import RetryMode

    @dg.executor(name="celery", config_schema=_config_schema(), requirements=dg.multiple_process_executor_requirements())
    def dfkd_celery_executor(init_context):
        c = init_context.executor_config
        prefix = c.get("queue_prefix") or os.environ.get(QUEUE_PREFIX_ENV, "")
        return _executor_class()(
            queue_prefix=prefix,
            broker=c.get("broker") or os.environ.get(BROKER_ENV) or None,
            backend=c.get("backend") or os.environ.get(BACKEND_ENV) or "rpc://",
            config_source={**celery_settings(prefix), **(c.get("config_source") or {})},
            include=c.get("include"),
            retries=RetryMode.from_config(c["retries"]),
        )

    return dfkd_celery_executor
