"""Run the whole graph as Dagster runs in an instance: prompts, one run per class partition, training.

This is what `dfkd run` (and so `make demo`) does; each step is a normal Dagster run recorded in
the instance, so the UI shows the same materializations a backfill from the UI would produce.
Runs an earlier, killed invocation left behind are marked failed first (`reap_dead_runs`), so a
re-run after kill -9 resumes instead of waiting for a dead run's pool slot.
"""

import os
from typing import Any, Callable

import dagster as dg

from dfkd_assets.defs.jobs import PREPARE, SYNTHESIZE, TRAIN


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def reap_dead_runs(instance: dg.DagsterInstance, log: Callable[[str], None] = print) -> list[str]:
    """Mark runs whose run worker died (kill -9, OOM killer, a lost shell) as failed and free their pool slots.

    Why: a run killed this way stays STARTED and keeps its slot of the `gpu` pool (limit 1 on one
    machine), so every later GPU step of the instance waits for it forever; the daemon's run
    monitoring cannot tell for runs of the default launcher or from `dagster asset materialize`.
    Only for a SQLite instance, i.e. one machine, where the worker's pid (the process that
    started the run) can be checked here; on Postgres use run monitoring of a launcher that
    checks worker health (Kubernetes) or terminate the run in the UI.
    """
    if not type(instance.run_storage).__name__.startswith("Sqlite"):
        return []
    reaped = []
    for record in instance.get_run_records(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])):
        run = record.dagster_run
        starts = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.RUN_START, limit=1).records
        pid = starts[0].event_log_entry.dagster_event.pid if starts and starts[0].event_log_entry.dagster_event else None
        if pid is None or _alive(pid):
            continue
        msg = f"run {run.run_id} ({run.job_name}) lost its run worker (pid {pid} is gone): marked failed, pool slots freed"
        instance.report_run_failed(run, msg)
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        log(msg)
        reaped.append(run.run_id)
    return reaped


def run_pipeline(
    defs: dg.Definitions, instance: dg.DagsterInstance, run_config: dict[str, Any] | None = None,
    partition_keys: list[str] | None = None, log: Callable[[str], None] = print,
) -> list[dg.ExecuteInProcessResult]:
    reap_dead_runs(instance, log)  # a killed earlier run would otherwise hold the gpu pool forever
    results = []
    synth = defs.resolve_job_def(SYNTHESIZE)
    keys = partition_keys if partition_keys is not None else synth.partitions_def.get_partition_keys(dynamic_partitions_store=instance)
    plan = [(PREPARE, None)] + [(SYNTHESIZE, k) for k in keys] + [(TRAIN, None)]
    for i, (job_name, key) in enumerate(plan, 1):
        log(f"[{i}/{len(plan)}] run {job_name}" + (f" partition={key}" if key else ""))
        job = defs.resolve_job_def(job_name)
        results.append(job.execute_in_process(instance=instance, run_config=run_config or {}, partition_key=key))
    return results
