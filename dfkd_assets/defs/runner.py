"""Run the whole graph as Dagster runs in an instance: prompts, one run per class partition, training.

This is what `dfkd run` (and so `make demo`) does; each step is a normal Dagster run recorded in
the instance, so the UI shows the same materializations a backfill from the UI would produce.
Runs an earlier, killed invocation left behind are marked failed first (`reap_dead_runs`), so a
re-run after kill -9 resumes instead of waiting for a dead run's pool slot.
"""

import socket
from typing import Any, Callable

import dagster as dg
from dagster._core.launcher.default_run_launcher import DefaultRunLauncher

from dfkd_assets.defs.jobs import PREPARE, SYNTHESIZE, TRAIN
from dfkd_assets.processes import pid_alive

HOST_TAG = "dfkd/run_worker_host"
"""Run tag: the host whose process runs the run (set by `dfkd run` and by `LocalRunLauncher`)."""


def run_worker_pid(instance: dg.DagsterInstance, run: dg.DagsterRun) -> int | None:
    """The pid of the process that started `run` (its RUN_START event), None before it started."""
    starts = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.RUN_START, limit=1).records
    return starts[0].event_log_entry.dagster_event.pid if starts and starts[0].event_log_entry.dagster_event else None


def run_worker_is_local(instance: dg.DagsterInstance, run: dg.DagsterRun) -> bool:
    """Whether `run`'s worker pid can be checked here: every run of a SQLite instance (one machine),
    and on any other instance the runs tagged with this host (`dfkd run`, `LocalRunLauncher`)."""
    return type(instance.run_storage).__name__.startswith("Sqlite") or run.tags.get(HOST_TAG) == socket.gethostname()


def dead_run_worker(instance: dg.DagsterInstance, run: dg.DagsterRun) -> int | None:
    """The pid of `run`'s worker when it ran on this host and is gone (kill -9, OOM killer), else None."""
    if not run_worker_is_local(instance, run):
        return None
    pid = run_worker_pid(instance, run)
    return pid if pid is not None and not pid_alive(pid) else None


def reap_dead_runs(instance: dg.DagsterInstance, log: Callable[[str], None] = print) -> list[str]:
    """Mark runs whose run worker died (kill -9, OOM killer, a lost shell) as failed and free their pool slots.

    Why: a run killed this way stays STARTED and keeps its slot of the `gpu` pool (limit 1 on one
    machine), so every later GPU step of the instance waits for it forever; the daemon's run
    monitoring cannot tell for runs of the default launcher or from `dagster asset materialize`.
    Any instance (SQLite or Postgres): only runs whose worker ran on this host are checked
    (`run_worker_is_local`); on a fleet the daemon does the same through `LocalRunLauncher`.
    """
    reaped = []
    for record in instance.get_run_records(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])):
        run = record.dagster_run
        pid = dead_run_worker(instance, run)
        if pid is None:
            continue
        msg = f"run {run.run_id} ({run.job_name}) lost its run worker (pid {pid} is gone): marked failed, pool slots freed"
        instance.report_run_failed(run, msg)
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        log(msg)
        reaped.append(run.run_id)
    return reaped


class LocalRunLauncher(DefaultRunLauncher):
    """Dagster's default launcher (a run worker process per run, started by the code server on the
    daemon's host) plus a worker health check, so the daemon's run monitoring fails a run whose
    worker died and `free_slots_after_run_end_seconds` frees its pool slots, on any storage.
    Set in the instance's dagster.yaml (`run_launcher: {module: dfkd_assets.defs.runner, class: LocalRunLauncher}`).
    """

    def launch_run(self, context) -> None:
        self._instance.add_run_tags(context.dagster_run.run_id, {HOST_TAG: socket.gethostname()})
        super().launch_run(context)

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: dg.DagsterRun):
        from dagster._core.launcher import CheckRunHealthResult, WorkerStatus

        run = self._instance.get_run_by_id(run.run_id) or run  # the tag was added after the run was created
        pid = dead_run_worker(self._instance, run)
        if pid is None:
            return CheckRunHealthResult(WorkerStatus.RUNNING)
        return CheckRunHealthResult(WorkerStatus.FAILED, f"run worker pid {pid} on {socket.gethostname()} is gone (killed or crashed)")


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
        results.append(job.execute_in_process(instance=instance, run_config=run_config or {}, partition_key=key,
                                              tags={HOST_TAG: socket.gethostname()}))
    return results


def run_retrain_rounds(
    defs: dg.Definitions, instance: dg.DagsterInstance, rounds: int, log: Callable[[str], None] = print,
) -> list[dg.ExecuteInProcessResult]:
    """`rounds` ticks of the `retrain` schedule, each run at once: the schedule's own evaluation
    (defs/automation.py: next round, cap) and its own job, as the daemon would launch them, in this
    process (what `dfkd retrain --rounds N` does). Stops at the first skip (the cap) or failed run."""
    reap_dead_runs(instance, log)
    schedule = defs.resolve_schedule_def("retrain")
    job = defs.resolve_job_def(schedule.job_name)
    results = []
    for i in range(1, rounds + 1):
        tick = schedule.evaluate_tick(dg.build_schedule_context(instance=instance, repository_def=defs.get_repository_def()))
        if not tick.run_requests:
            log(f"[retrain {i}/{rounds}] skipped: {tick.skip_message}")
            break
        for req in tick.run_requests:
            log(f"[retrain {i}/{rounds}] run {job.name} "
                + " ".join(f"{k}={v}" for k, v in req.tags.items() if k.startswith(("dfkd/round", "dagster/asset_partition"))))
            result = job.execute_in_process(instance=instance, run_config=req.run_config or {}, partition_key=req.partition_key,
                                            tags={**req.tags, HOST_TAG: socket.gethostname()}, raise_on_error=False)
            results.append(result)
            if not result.success:
                log(f"[retrain {i}/{rounds}] run {result.run_id} failed")
                return results
    return results
