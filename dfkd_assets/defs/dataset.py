"""Asset `synthetic_dataset`: the versioned snapshot of all class shards (the only DVC caller).

Every configured class must have a complete, checksum-valid shard before anything is
versioned; then `dvc add data/synthetic` + `dvc push` to the configured remote. The DVC hash
recorded here is what the student's MLflow tags point back to.
"""


import dagster as dg

from dfkd_assets import artifacts
from dfkd_assets.defs.errors import no_retry_for_bad_input

from dfkd_assets.defs.lineage import lineage
from dfkd_assets.defs.resources import DvcRepo, PipelineSettings
from dfkd_assets.redaction import redact


@dg.asset(
    group_name="training",
    deps=["synthetic_images"],
    pool="dvc",
    kinds={"dvc"},
    description="DVC snapshot (dvc add + push) of every class shard; records the DVC hash.",
)
@no_retry_for_bad_input
def synthetic_dataset(context: dg.AssetExecutionContext, settings: PipelineSettings, dvc: DvcRepo) -> dg.MaterializeResult:
    from dfkd_assets.core.io import ShardError

    cfg = settings.load()
    counts, problems = {}, []
    for c in cfg.classes:
        try:
            counts[c] = artifacts.verify_class_shard(cfg, c)["count"]
        except (ShardError, FileNotFoundError) as e:
            problems.append(f"{c}: {e}")
    if problems:
        raise ShardError("cannot snapshot the synthetic dataset; materialize these synthetic_images partitions:\n" + "\n".join(problems))
    artifacts.write_snapshot_index(cfg, counts)
    remote = dvc.ensure(cfg)
    dvc_hash = dvc.add_and_push(cfg, cfg.synthetic_dir)
    context.log.info(redact(f"dvc add + push of {cfg.synthetic_dir} -> {remote}: {dvc_hash}"))
    return dg.MaterializeResult(
        metadata={
            "dvc_hash": dvc_hash,
            "dvc_remote": redact(remote),
            "path": dg.MetadataValue.path(str(cfg.synthetic_dir.resolve())),
            "num_images": sum(counts.values()),
            "per_class": dg.MetadataValue.json(counts),
            **lineage(cfg, context),
        }
    )
