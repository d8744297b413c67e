"""Asset `synthetic_dataset`: the versioned snapshot of all class shards (the only DVC caller).

Every configured class must have a complete, checksum-valid shard before anything is
versioned; then `dvc add data/synthetic` + `dvc push` to the configured remote. The DVC hash
recorded here is what the student's MLflow tags point back to.

With rounds, the training set is the union of round 0 and every round all classes have
(artifacts.common_rounds), written to index.json inside the snapshot, so each round is its own
DVC version and a restored version says what it held. A cap below what exists fails here,
naming operations.max_images_per_class, and deletes nothing.
"""


import dagster as dg

from dfkd_assets import artifacts
from dfkd_assets.defs.errors import no_retry_for_bad_input
from dfkd_assets.defs.lineage import lineage
from dfkd_assets.defs.resources import DvcRepo, PipelineSettings
from dfkd_assets.redaction import redact


@dg.asset(
    group_name="training",
    deps=["synthetic_images", "synthetic_round_images"],
    pool="dvc",
    kinds={"dvc"},
    description="DVC snapshot (dvc add + push) of every class shard; records the DVC hash.",
)
@no_retry_for_bad_input
def synthetic_dataset(context: dg.AssetExecutionContext, settings: PipelineSettings, dvc: DvcRepo) -> dg.MaterializeResult:
    from dfkd_assets.core.io import ShardError
    from dfkd_assets.core.rounds import check_cap

    cfg = settings.load()
    rounds = artifacts.common_rounds(cfg)
    counts, problems = {}, []
    for c in cfg.classes:
        try:
            counts[c] = sum(artifacts.verify_class_shard(cfg, c, r)["count"] for r in rounds)
        except (ShardError, FileNotFoundError) as e:
            problems.append(f"{c}: {e}")
    if problems:
        raise ShardError("cannot snapshot the synthetic dataset; materialize these synthetic_images partitions:\n" + "\n".join(problems))
    check_cap(counts, cfg.operations.max_images_per_class)
    artifacts.write_snapshot_index(cfg, counts, rounds)
    remote = dvc.ensure(cfg)
    dvc_hash = dvc.add_and_push(cfg, cfg.synthetic_dir)
    context.log.info(redact(f"dvc add + push of {cfg.synthetic_dir} (rounds {rounds}) -> {remote}: {dvc_hash}"))
    return dg.MaterializeResult(
        metadata={
            "dvc_hash": dvc_hash,
            "dvc_remote": redact(remote),
            "path": dg.MetadataValue.path(str(cfg.synthetic_dir.resolve())),
            "num_images": sum(counts.values()),
            "per_class": dg.MetadataValue.json(counts),
            "rounds": dg.MetadataValue.json(rounds),
            "images_per_class": min(counts.values()),
            **lineage(cfg, context),
        }
    )
