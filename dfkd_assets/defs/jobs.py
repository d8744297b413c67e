"""Jobs over the asset graph. Selections are strings on purpose: they exercise Dagster's
selection parser, which breaks silently when dvc's antlr4 pin wins (DEPENDENCIES.md #1).

Every pipeline job retries failed steps (`operations.max_retries`, exponential backoff; bad input
is never retried, see defs/errors.py) and carries `dagster/max_runtime`, which run monitoring
enforces.
"""

from __future__ import annotations

import dagster as dg

from dfkd_assets.config import DfkdConfig

PREPARE = "prepare_prompts"
SYNTHESIZE = "synthesize_class"
TRAIN = "distill_evaluate_promote"
ADD_CLASSES = "add_classes"
SYNTHESIZE_ROUND = "synthesize_round"
ROUND = "grow_distill_evaluate_promote"


def build_jobs(cfg: DfkdConfig) -> list:
    ops = cfg.operations
    retry = dg.RetryPolicy(max_retries=ops.max_retries, delay=ops.retry_delay_s, backoff=dg.Backoff.EXPONENTIAL)
    tags = {"dagster/max_runtime": str(ops.max_runtime_s)}

    def job(name: str, selection: str, description: str) -> dg.UnresolvedAssetJobDefinition:
        return dg.define_asset_job(name, selection=selection, description=description, tags=tags, op_retry_policy=retry)

    return [
        job(PREPARE, "key:teacher_head or key:prompt_bank", "Teacher head and prompt bank."),
        job(SYNTHESIZE, 'key:"synthetic_images"', "VQGAN-CLIP images of one class (one run per class partition, or a backfill)."),
        job(TRAIN, "key:synthetic_dataset+", "Snapshot (DVC), distil, evaluate, promote (blocking checks guard each step)."),
        job(ADD_CLASSES, "key:student_head+", "Classes added by name: the champion embedding student with a head for the settings' classes "
            "(run overrides `classes`, or `dfkd add-classes`), evaluated and promoted like any challenger. Seconds, no distillation."),
        job(SYNTHESIZE_ROUND, 'key:"synthetic_round_images"', "More images of a class in a round >= 1 (one class x round cell, or a backfill)."),
        job(ROUND, 'key:"synthetic_round_images" or key:synthetic_dataset+',
            "One retraining round: operations.images_per_round new images of every class, then snapshot, distil on the union, "
            "evaluate, promote (the `retrain` schedule's job; one run for all classes of the round)."),
    ]
