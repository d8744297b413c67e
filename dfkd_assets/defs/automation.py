"""Schedules and sensors: scheduled retraining, a sensor that synthesizes only missing or stale
class partitions, and a run-failure sensor that records failures (and can notify a webhook).

Scheduled retraining with rounds (`operations.images_per_round` set): each tick of `retrain`
picks the next round (one past the newest round every class has; a round an earlier run left
unfinished is asked for again and resumes), adds it to the dynamic partitions `synthesis_rounds`
(a schedule cannot return partition requests the way a sensor does, so it adds the key itself)
and requests one run of the round job over every class of that round. At the cap
(`operations.max_images_per_class`) the tick skips, saying so; a cap below what exists fails the
tick with an error naming the setting. Without rounds `retrain` re-distils the current snapshot.

All three are Dagster's own machinery (the daemon runs them); they start STOPPED, so a
reviewer turns them on in the UI or with `dagster schedule start` / `dagster sensor start`.
"""

import json
import os

import dagster as dg

from dfkd_assets import artifacts
from dfkd_assets.config import DfkdConfig
from dfkd_assets.core.names import class_key
from dfkd_assets.defs.jobs import PREPARE, ROUND, SYNTHESIZE, SYNTHESIZE_ROUND, TRAIN
from dfkd_assets.defs.synthesis import ASSET_KEY, ROUND_ASSET_KEY, ROUNDS


def _latest_fingerprint(instance: dg.DagsterInstance, partition: str, asset: str = ASSET_KEY) -> str | None:
    """The fingerprint the latest materialization of `partition` recorded (a round cell: its entry
    in `fingerprints`, since one run of the round asset records every cell it made)."""
    records = instance.fetch_materializations(dg.AssetRecordsFilter(dg.AssetKey(asset), asset_partitions=[partition]), limit=1).records
    if not records:
        return None
    meta = records[0].asset_materialization.metadata
    if asset == ROUND_ASSET_KEY:
        return meta["fingerprints"].value.get(partition) if "fingerprints" in meta else None
    fp = meta.get("fingerprint")
    return fp.value if fp is not None else None


def next_round_request(cfg: DfkdConfig, instance: dg.DagsterInstance) -> dg.RunRequest | dg.SkipReason:
    """The `retrain` tick with rounds: a run of the round job over every class of the next round,
    or why there is none (no round 0 yet, the cap reached). CapError when the cap is below what exists."""
    from dfkd_assets.core.io import ShardError
    from dfkd_assets.core.rounds import check_cap, next_growth

    if not cfg.operations.images_per_round:  # unset in the file since the code location loaded: nothing to grow
        return dg.SkipReason("operations.images_per_round is not set: no round to make (reload the code location to re-distil instead)")
    rounds = artifacts.common_rounds(cfg)
    try:
        counts = {c: artifacts.images_in_rounds(cfg, c, rounds) for c in cfg.classes}
    except ShardError as e:
        return dg.SkipReason(f"no round 0 to grow from ({e}); materialize synthetic_images first (`dfkd run`)")
    check_cap(counts, cfg.operations.max_images_per_class)
    growth = next_growth(rounds[-1] + 1, max(counts.values()), cfg.operations.images_per_round, cfg.operations.max_images_per_class)
    if not growth.fits:
        return dg.SkipReason(growth.reason)
    r = str(growth.round)
    if not instance.has_dynamic_partition(ROUNDS.name, r):
        instance.add_dynamic_partitions(ROUNDS.name, [r])
    first, last = class_key(cfg.classes[0]), class_key(cfg.classes[-1])
    return dg.RunRequest(tags={RANGE_START: f"{first}|{r}", RANGE_END: f"{last}|{r}", ROUND_TAG: r})


RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"
ROUND_TAG = "dfkd/round"


def build_automation(cfg: DfkdConfig, config_file: str, jobs: dict) -> tuple[list, list]:
    """The code location's schedules and sensors: ([retrain], [stale_partitions, record_failures])."""
    return [_retrain_schedule(cfg, config_file)], [_stale_partitions_sensor(cfg, config_file, jobs), _record_failures_sensor(cfg)]


def _retrain_schedule(cfg: DfkdConfig, config_file: str) -> dg.ScheduleDefinition:
    """`retrain`. With rounds, a schedule function that decides each tick which round to grow (it re-reads
    the settings file, so a tick sees the round sizes as they are now); without rounds, a plain cron
    schedule of the training job, which needs no decision."""
    if cfg.operations.images_per_round:
        @dg.schedule(name="retrain", cron_schedule=cfg.operations.retrain_cron, job_name=ROUND,
                     execution_timezone=cfg.operations.timezone, default_status=dg.DefaultScheduleStatus.STOPPED,
                     description="A round: operations.images_per_round new images per class, then distil on the union, evaluate and "
                                 "promote only if not worse; skips at operations.max_images_per_class.")
        def retrain(context: dg.ScheduleEvaluationContext):
            from dfkd_assets.config import load_config

            decision = next_round_request(load_config(config_file), context.instance)
            context.log.info(decision.skip_message if isinstance(decision, dg.SkipReason) else f"round {decision.tags[ROUND_TAG]}")
            return decision

        return retrain
    return dg.ScheduleDefinition(
        name="retrain", cron_schedule=cfg.operations.retrain_cron, job_name=TRAIN,
        execution_timezone=cfg.operations.timezone, default_status=dg.DefaultScheduleStatus.STOPPED,
        description="Re-distil, re-evaluate and (only if not worse) promote, from the current synthetic snapshot.",
    )


def _stale_partitions_sensor(cfg: DfkdConfig, config_file: str, jobs: dict) -> dg.SensorDefinition:
    """`stale_partitions`. Each tick re-reads the settings file: a changed prompt bank is rebuilt first
    (partitions are only judged against the bank they will be made from), else every class partition and
    class x round cell whose recorded fingerprint differs from the expected one is requested."""
    @dg.sensor(name="stale_partitions", minimum_interval_seconds=cfg.operations.sensor_interval_s,
               default_status=dg.DefaultSensorStatus.STOPPED, jobs=[jobs[PREPARE], jobs[SYNTHESIZE], jobs[SYNTHESIZE_ROUND]],
               description="Rebuilds the prompt bank when its settings changed, then synthesizes only missing or stale class partitions "
                           "(round 0 and every class x round cell of the rounds that exist).")
    def stale_partitions(context: dg.SensorEvaluationContext):
        from dfkd_assets.config import load_config
        from dfkd_assets.fingerprints import expected_class_fingerprints, expected_round_fingerprints, prompt_settings_hash

        current = load_config(config_file)
        bank_ev = context.instance.get_latest_materialization_event(dg.AssetKey("prompt_bank"))
        bank_meta = bank_ev.asset_materialization.metadata if bank_ev else {}
        bank_hash = bank_meta.get("settings_hash").value if "settings_hash" in bank_meta else None
        if bank_hash != prompt_settings_hash(current):
            yield dg.RunRequest(run_key=f"prepare-{prompt_settings_hash(current)}", job_name=PREPARE)
            return  # partitions are judged against the new bank on a later tick
        expected = expected_class_fingerprints(current)
        for c in current.classes:
            key = class_key(c)
            if _latest_fingerprint(context.instance, key) != expected[c]:
                yield dg.RunRequest(run_key=f"{key}-{expected[c]}", job_name=SYNTHESIZE, partition_key=key)
        rounds = [int(r) for r in context.instance.get_dynamic_partitions(ROUNDS.name)]
        for (c, r), fp in expected_round_fingerprints(current, rounds).items():
            cell = f"{class_key(c)}|{r}"
            if _latest_fingerprint(context.instance, cell, ROUND_ASSET_KEY) != fp:
                yield dg.RunRequest(run_key=f"{cell}-{fp}", job_name=SYNTHESIZE_ROUND, partition_key=cell)

    return stale_partitions


def _record_failures_sensor(cfg: DfkdConfig) -> dg.SensorDefinition:
    """`record_failures`: every failed run appended to a JSONL file (a record that outlives the Dagster
    instance) and, when the webhook variable is set, POSTed to it; a webhook that does not answer only
    warns, so a notification outage never fails the sensor."""
    @dg.run_failure_sensor(name="record_failures", default_status=dg.DefaultSensorStatus.STOPPED,
                           description="Appends every failed run to storage/run_failures.jsonl and POSTs it to the webhook in $<operations.webhook_url_env>.")
    def record_failures(context: dg.RunFailureSensorContext):
        from dfkd_assets.defs.notify import failure_record, post_webhook

        record = failure_record(context.dagster_run.run_id, context.dagster_run.job_name, context.failure_event.message)
        path = artifacts.run_failures_log(cfg)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        url = os.environ.get(cfg.operations.webhook_url_env, "")
        if url:  # the URL (it may hold a token) comes from the environment and is never logged or quoted
            problem = post_webhook(url, record, cfg.operations.webhook_url_env)
            if problem:
                context.log.warning(problem)

    return record_failures
