"""`dfkd` command line: run the pipeline, make the CI evaluation set."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _cmd_run(args: argparse.Namespace) -> int:
    os.environ.setdefault("DAGSTER_HOME", str(Path("dagster_home").resolve()))
    if args.config:
        os.environ["DFKD_CONFIG"] = args.config
    import dagster as dg

    from dfkd_assets.config import load_config
    from dfkd_assets.definitions import build_defs
    from dfkd_assets.defs.runner import run_pipeline

    cfg = load_config(args.config)
    defs = build_defs(args.config)
    with dg.DagsterInstance.get() as instance:
        run_pipeline(defs, instance)
    report = cfg.path("reports") / "report.md"
    print("\n" + report.read_text())
    print(f"Report:        {report.resolve()}")
    print(f"Dagster runs:  DAGSTER_HOME={os.environ['DAGSTER_HOME']}  (make ui -> http://127.0.0.1:3000)")
    print(f"MLflow store:  {cfg.resolve(cfg.mlflow.tracking_uri)}  (model {cfg.mlflow.registered_model_name}@champion)")
    print(f"DVC remote:    {cfg.resolve(cfg.dvc.remote_url)}")
    return 0


def _cmd_eval_set(args: argparse.Namespace) -> int:
    from dfkd_assets.config import load_config
    from dfkd_assets.toyworld.evalset import write_eval_set

    cfg = load_config(args.config)
    for ds in cfg.evaluation.datasets:
        n = write_eval_set(ds.root, cfg.classes, per_class=args.per_class, size=args.size)
        print(f"wrote {n} images to {ds.root}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dfkd", description="Data-free distillation of CLIP into a small classifier.")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="materialize the whole asset graph (prompts, every class partition, training)")
    r.add_argument("--config", default=None, help="settings YAML (default: $DFKD_CONFIG or configs/demo.yaml)")
    r.set_defaults(fn=_cmd_run)
    e = sub.add_parser("make-eval-set", help="write the procedural evaluation set(s) named in the settings")
    e.add_argument("--config", default=None)
    e.add_argument("--per-class", type=int, default=4)
    e.add_argument("--size", type=int, default=32)
    e.set_defaults(fn=_cmd_eval_set)
    args = p.parse_args(argv)
    from dfkd_assets.config import ConfigError

    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
