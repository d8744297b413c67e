"""Run the whole graph as Dagster runs in an instance: prompts, one run per class partition, training.

This is what `dfkd run` (and so `make demo`) does; each step is a normal Dagster run recorded in
the instance, so the UI shows the same materializations a backfill from the UI would produce.
"""

from typing import Any, Callable

import dagster as dg

from dfkd_assets.defs.jobs import PREPARE, SYNTHESIZE, TRAIN


def run_pipeline(
    defs: dg.Definitions, instance: dg.DagsterInstance, run_config: dict[str, Any] | None = None,
    partition_keys: list[str] | None = None, log: Callable[[str], None] = print,
) -> list[dg.ExecuteInProcessResult]:
    results = []
    synth = defs.resolve_job_def(SYNTHESIZE)
    keys = partition_keys if partition_keys is not None else synth.partitions_def.get_partition_keys(dynamic_partitions_store=instance)
    plan = [(PREPARE, None)] + [(SYNTHESIZE, k) for k in keys] + [(TRAIN, None)]
    for i, (job_name, key) in enumerate(plan, 1):
        log(f"[{i}/{len(plan)}] run {job_name}" + (f" partition={key}" if key else ""))
        job = defs.resolve_job_def(job_name)
        results.append(job.execute_in_process(instance=instance, run_config=run_config or {}, partition_key=key))
    return results
