"""`dfkd` command line: run the pipeline, make the CI evaluation set."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dfkd_assets.redaction import redact


def _dagster_home() -> str:
    """$DAGSTER_HOME, defaulting to ./dagster_home (the instance `make` uses): every command that
    talks to the Dagster instance calls this first."""
    return os.environ.setdefault("DAGSTER_HOME", str(Path("dagster_home").resolve()))


def _cmd_run(args: argparse.Namespace) -> int:
    _dagster_home()
    if args.config:
        os.environ["DFKD_CONFIG"] = args.config
    import dagster as dg

    from dfkd_assets.config import load_config
    from dfkd_assets.definitions import build_defs
    from dfkd_assets.defs.runner import run_pipeline
    from dfkd_assets.redaction import redact

    cfg = load_config(args.config)
    defs = build_defs(args.config)
    with dg.DagsterInstance.get() as instance:
        run_pipeline(defs, instance)
    from dfkd_assets.artifacts import reports_dir

    report = reports_dir(cfg) / "report.md"
    print("\n" + report.read_text())
    print(f"Report:        {report.resolve()}")
    print(f"Dagster runs:  DAGSTER_HOME={os.environ['DAGSTER_HOME']}  (make ui -> http://127.0.0.1:3000)")
    print(redact(f"MLflow store:  {cfg.resolve(cfg.mlflow.tracking_uri)}  (model {cfg.mlflow.registered_model_name}@champion)"))
    print(redact(f"DVC remote:    {cfg.resolve(cfg.dvc.remote_url)}"))
    return 0


def _cmd_retrain(args: argparse.Namespace) -> int:
    """N scheduled retraining rounds now: the `retrain` schedule's tick and job, run in this process."""
    _dagster_home()
    if args.config:
        os.environ["DFKD_CONFIG"] = args.config
    import dagster as dg

    from dfkd_assets.definitions import build_defs
    from dfkd_assets.defs.runner import run_retrain_rounds

    with dg.DagsterInstance.get() as instance:
        results = run_retrain_rounds(build_defs(args.config), instance, args.rounds)
    return 0 if all(r.success for r in results) else 1


def _cmd_rounds(args: argparse.Namespace) -> int:
    """The explicit commands on rounds: drop one (the only way a round is deleted), restore a recorded version."""
    from dfkd_assets.config import load_config

    cfg = load_config(args.config)
    if args.rounds_cmd == "drop":
        from dfkd_assets import artifacts

        gone = artifacts.drop_round(cfg, args.round)
        _dagster_home()
        import dagster as dg

        from dfkd_assets.defs.synthesis import ROUNDS

        with dg.DagsterInstance.get() as instance:
            if instance.has_dynamic_partition(ROUNDS.name, str(args.round)):
                instance.delete_dynamic_partition(ROUNDS.name, str(args.round))
        print(f"dropped round {args.round}: {len(gone)} class folder(s) removed, partition key deleted; the next snapshot leaves it out")
        return 0
    from dfkd_assets.defs.resources import DvcRepo

    out = DvcRepo().restore(cfg, args.dvc_hash, Path(args.out))
    from dfkd_assets.artifacts import read_snapshot_index

    index = read_snapshot_index(cfg, out)
    print(f"restored {args.dvc_hash} into {out}: rounds {index['rounds']}, images per class {index['counts']}")
    return 0


def _cmd_eval_set(args: argparse.Namespace) -> int:
    from dfkd_assets.config import load_config
    from dfkd_assets.core.datasets import PRESETS
    from dfkd_assets.toyworld.evalset import write_eval_set

    cfg = load_config(args.config)
    for ds in cfg.evaluation.datasets:
        domains = ds.domains or (PRESETS[ds.preset].domains if ds.preset else ("photo", "sketch"))
        n = write_eval_set(ds.root, cfg.classes, domains=tuple(domains), per_class=args.per_class, size=args.size)
        print(f"wrote {n} images to {ds.root}")
    return 0


def _cmd_toyworld_build(args: argparse.Namespace) -> int:
    import yaml

    from dfkd_assets.config import validate
    from dfkd_assets.toyworld.config import ToyworldConfig

    raw = yaml.safe_load(Path(args.settings).read_text()) if args.settings else {}
    cfg = validate(ToyworldConfig, raw or {}, str(args.settings or "the built-in toyworld defaults"))
    from dfkd_assets.toyworld.build import build

    m = build(cfg, Path(args.out), force=args.force, train=args.train)
    print(f"toyworld in {args.out} ({m.get('source', 'trained')}): teacher zero-shot "
          + ", ".join(f"{d} {a:.2f}" for d, a in m["teacher_zero_shot"].items()))
    return 0


def _cmd_toyworld_pin(args: argparse.Namespace) -> int:
    from dfkd_assets.toyworld.build import pin

    dest = pin(Path(args.dir))
    print(f"pinned the world in {args.dir} to {dest}: commit that folder; builds of its settings now restore it")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from dfkd_assets.tools.compare import run

    return run(args)


def _cmd_predict(args: argparse.Namespace) -> int:
    """The consumer side of the registry: classify image files with models:/<name>@champion."""
    import json

    from dfkd_assets.config import load_config
    from dfkd_assets.defs.registry import champion_uri
    from dfkd_assets.tools.predict import load_registered, predict_files

    cfg = load_config(args.config)
    uri = args.model_uri or champion_uri(cfg)
    model = load_registered(cfg.resolve(cfg.mlflow.tracking_uri), uri)
    rows = predict_files(model, [Path(f) for f in args.images], args.top_k)
    if args.json:
        print(json.dumps({"model_uri": uri, "predictions": rows}, indent=2))
    else:
        for r in rows:
            print(f"{r['file']}\t" + "  ".join(f"{c} {p:.3f}" for c, p in r["top"]))
    return 0


def _cmd_add_classes(args: argparse.Namespace) -> int:
    """Classes added by name to the champion embedding student (or --base): the `add_classes` job with
    the base's classes plus the new names as the run's `classes`, so the new version is evaluated and
    promoted like any challenger. Names are checked first: a refused name registers nothing."""
    _dagster_home()
    if args.config:
        os.environ["DFKD_CONFIG"] = args.config
    import dagster as dg

    from dfkd_assets import registry_model as rm
    from dfkd_assets.config import load_config
    from dfkd_assets.core.vocabulary import ClassNameError, NotAnEmbeddingStudent, require_embedding_student
    from dfkd_assets.definitions import build_defs
    from dfkd_assets.defs.jobs import ADD_CLASSES
    from dfkd_assets.defs.registry import ModelRegistry, RegistryError
    from dfkd_assets.defs.resources import MlflowTracking
    from dfkd_assets.defs.runner import HOST_TAG, reap_dead_runs
    from dfkd_assets.stages.training import classes_with

    cfg = load_config(args.config)
    registry = ModelRegistry(cfg, MlflowTracking())
    try:
        base = registry.version_or_champion(args.base)
        what = f"{registry.name} v{base}"
        student = require_embedding_student(registry.load(base), what)
        classes = classes_with(student.classes, args.names, (rm.LABEL, rm.SCORE))
    except (ClassNameError, NotAnEmbeddingStudent, RegistryError, rm.IntegrityError) as e:
        print(f"error: {redact(str(e))}", file=sys.stderr)
        return 2
    run_config = {"resources": {"settings": {"config": {"overrides": {"classes": classes}}}},
                  "ops": {"student_head": {"config": {"base_version": base}}}}
    import socket

    with dg.DagsterInstance.get() as instance:
        reap_dead_runs(instance)
        result = build_defs(args.config).resolve_job_def(ADD_CLASSES).execute_in_process(
            instance=instance, run_config=run_config, raise_on_error=False, tags={HOST_TAG: socket.gethostname()})
    if not result.success:
        errors = [e.step_failure_data.error.message.strip() for e in result.all_events if e.is_step_failure and e.step_failure_data.error]
        print("error: adding classes failed (the champion is unchanged): " + ("\n".join(errors) or "see the Dagster run " + result.run_id),
              file=sys.stderr)
        return 1
    challenger, champion = registry.tracking.alias_version(cfg, "challenger"), registry.champion()
    print(f"{registry.name} v{challenger}: the weights of v{base}, classes {classes}")
    print(f"champion: v{champion}" + (" (promoted)" if champion == challenger else " (kept: see the evaluation report)"))
    return 0


def _cmd_setup_pools(args: argparse.Namespace) -> int:
    """Sets the Dagster pool `gpu` to the number of GPUs here (times steps_per_gpu), so concurrent
    GPU steps each get a GPU of their own (core/devices.lease_device picks which)."""
    _dagster_home()
    import dagster as dg
    import torch

    from dfkd_assets.config import load_config

    cfg = load_config(args.config)
    slots = args.gpus if args.gpus is not None else max(1, torch.cuda.device_count()) * cfg.steps_per_gpu
    with dg.DagsterInstance.get() as instance:
        # explicit rows for both pools: Dagster otherwise creates them lazily when the first step
        # asks, and two runs starting at the same moment on Postgres can race on that insert
        instance.event_log_storage.set_concurrency_slots("gpu", slots)
        instance.event_log_storage.set_concurrency_slots("dvc", 1)
        instance.event_log_storage.set_concurrency_slots("registry", 1)  # promotions and rollbacks one at a time
    print(f"Dagster pools: gpu = {slots} slot(s), dvc = 1, registry = 1, in {os.environ['DAGSTER_HOME']}")
    return 0


def _cmd_fleet(args: argparse.Namespace) -> int:
    """A local fleet: Dagster and MLflow on Postgres, N dagster-celery workers on the broker (infra/README.md)."""
    from dfkd_assets.tools import fleet

    try:
        if args.fleet_cmd == "up":
            fleet.up(args.config or os.environ.get("DFKD_CONFIG") or "configs/ci.yaml", workers=args.workers, fleet_dir=args.dir,
                     broker=args.broker, backend=args.backend, postgres=args.postgres, webserver_port=args.port,
                     mlflow_port=args.mlflow_port)
        elif args.fleet_cmd == "down":
            fleet.down(args.dir, drop_databases=args.drop_databases)
        else:
            return 0 if fleet.status(args.dir) else 1
    except fleet.FleetError as e:
        print(f"error: {redact(str(e))}", file=sys.stderr)
        return 2
    return 0


def _add_pipeline_commands(sub) -> None:
    """run, retrain, rounds: the commands that materialize assets or change what the pipeline has made."""
    r = sub.add_parser("run", help="materialize the whole asset graph (prompts, every class partition, training)")
    r.add_argument("--config", default=None, help="settings YAML (default: $DFKD_CONFIG or configs/demo.yaml)")
    r.set_defaults(fn=_cmd_run)
    rt = sub.add_parser("retrain", help="run N rounds of scheduled retraining now (the `retrain` schedule's tick and job)")
    rt.add_argument("--config", default=None, help="settings YAML (operations.images_per_round set: each round grows the synthetic set)")
    rt.add_argument("--rounds", type=int, default=1)
    rt.set_defaults(fn=_cmd_retrain)
    ro = sub.add_parser("rounds", help="drop a synthesis round, or restore a recorded training set with DVC").add_subparsers(dest="rounds_cmd", required=True)
    rd = ro.add_parser("drop", help="delete round R >= 1 of every class and its partition key (nothing else deletes a round)")
    rd.add_argument("round", type=int)
    rs = ro.add_parser("restore", help="check out the data version a model was trained on (its dvc_hash tag) into a new folder")
    rs.add_argument("dvc_hash")
    rs.add_argument("--out", required=True, help="new folder inside the workspace, e.g. data/restored/v3")
    for q in (rd, rs):
        q.add_argument("--config", default=None)
        q.set_defaults(fn=_cmd_rounds)


def _add_model_commands(sub) -> None:
    """predict, add-classes: the commands that use or extend the registered model."""
    pr = sub.add_parser("predict", help="classify image files with the registered champion (models:/<name>@champion)")
    pr.add_argument("images", nargs="+", help="image files (any size, RGB/grayscale/CMYK)")
    pr.add_argument("--config", default=None, help="settings YAML: its MLflow store and model name")
    pr.add_argument("--model-uri", default=None, help="e.g. models:/dfkd-student@challenger or models:/dfkd-student/3")
    pr.add_argument("--top-k", type=int, default=3)
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(fn=_cmd_predict)
    ac = sub.add_parser("add-classes", help="add classes by name to the champion embedding student: a new version, same weights, no re-distillation")
    ac.add_argument("names", nargs="+", help="class names to add, e.g. cheetah zebra (quote names with spaces)")
    ac.add_argument("--config", default=None, help="settings YAML: its MLflow store, model name, teacher and evaluation sets")
    ac.add_argument("--base", default="", help="version whose weights are reused (default: the champion)")
    ac.set_defaults(fn=_cmd_add_classes)


def _add_infrastructure_commands(sub) -> None:
    """setup-pools, fleet: the commands that prepare the machines the pipeline runs on."""
    sp = sub.add_parser("setup-pools", help="set the Dagster pool `gpu` to the number of GPUs of this machine")
    sp.add_argument("--config", default=None)
    sp.add_argument("--gpus", type=int, default=None, help="slots to set (default: GPUs found x steps_per_gpu, at least 1)")
    sp.set_defaults(fn=_cmd_setup_pools)
    fl = sub.add_parser("fleet", help="a local scale-out fleet: Dagster + MLflow on Postgres, Celery workers on RabbitMQ")
    fls = fl.add_subparsers(dest="fleet_cmd", required=True)
    fu = fls.add_parser("up", help="start the fleet (state, pids and logs in --dir)")
    fu.add_argument("--config", default=None, help="settings YAML (mlflow.tracking_uri: http://127.0.0.1:<port> of the fleet's MLflow)")
    fu.add_argument("--workers", type=int, default=2)
    fu.add_argument("--port", type=int, default=None, help="Dagster webserver port (default: a free one)")
    fu.add_argument("--mlflow-port", type=int, default=5000, help="MLflow server port when the settings do not name an http:// server")
    fu.add_argument("--broker", default=None, help="Celery broker (default $DFKD_CELERY_BROKER or amqp://guest:guest@127.0.0.1:5672//)")
    fu.add_argument("--backend", default=None, help="Redis result backend (default $DFKD_CELERY_BACKEND or redis://127.0.0.1:6379/0)")
    fu.add_argument("--postgres", default=None, help="admin URL that may create databases (default $DFKD_FLEET_POSTGRES or postgresql://postgres@127.0.0.1:5432/postgres)")
    fd = fls.add_parser("down", help="stop every process of the fleet and delete its broker queues")
    fd.add_argument("--drop-databases", action="store_true", help="also drop the fleet's two Postgres databases")
    fls.add_parser("status", help="list the fleet's processes")
    for f in (fu, fd, fls.choices["status"]):
        f.add_argument("--dir", default="storage/fleet", help="fleet directory (default storage/fleet)")
    fl.set_defaults(fn=_cmd_fleet)


def _add_data_commands(sub) -> None:
    """make-eval-set, toyworld: the commands that make evaluation data and the offline miniature world."""
    e = sub.add_parser("make-eval-set", help="write the procedural evaluation set(s) named in the settings")
    e.add_argument("--config", default=None)
    e.add_argument("--per-class", type=int, default=4)
    e.add_argument("--size", type=int, default=32)
    e.set_defaults(fn=_cmd_eval_set)
    from dfkd_assets.emojiworld.cli import register as register_emojiworld
    register_emojiworld(sub)
    tw = sub.add_parser("toyworld", help="the offline miniature world").add_subparsers(dest="tw_cmd", required=True)
    b = tw.add_parser("build", help="render the world, restore (pinned) or train its tiny CLIP and VQGAN, write the evaluation set (cached)")
    b.add_argument("--out", required=True, help="output folder, e.g. storage/toyworld")
    b.add_argument("--settings", default=None, help="YAML with ToyworldConfig values (default: the built-in defaults)")
    b.add_argument("--force", action="store_true", help="rebuild even when the settings are unchanged")
    b.add_argument("--train", action="store_true",
                   help="train the tiny CLIP and VQGAN here even when these settings have pinned weights (dfkd_assets/toyworld/pinned/)")
    b.set_defaults(fn=_cmd_toyworld_build)
    pn = tw.add_parser("pin", help="ship a trained world's weights: copy them to dfkd_assets/toyworld/pinned/<settings hash>/")
    pn.add_argument("dir", help="a built toyworld, e.g. storage/toyworld")
    pn.set_defaults(fn=_cmd_toyworld_pin)


def _add_measurement_commands(sub) -> None:
    """bench, compare: the tools that measure speed and accuracy."""
    # listed for --help; its own parser (dfkd_assets.tools.bench) takes the arguments, see main()
    sub.add_parser("bench", add_help=False, help="reference loop vs engine, FLOPs/MFU, KD throughput, load share, latency (dfkd bench --help)")
    c = sub.add_parser("compare", help="vanilla/mix/random/contrastive (+ noopt, real baselines) over seeds, same budget")
    from dfkd_assets.tools.compare import main_args

    main_args(c)
    c.set_defaults(fn=_cmd_compare)


def build_parser() -> argparse.ArgumentParser:
    """The `dfkd` parser, one builder per group of commands; the order of the calls is the order of `dfkd --help`."""
    p = argparse.ArgumentParser(prog="dfkd", description="Data-free distillation of CLIP into a small classifier.")
    sub = p.add_subparsers(dest="cmd", required=True)
    _add_pipeline_commands(sub)
    _add_model_commands(sub)
    _add_infrastructure_commands(sub)
    _add_data_commands(sub)
    _add_measurement_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """`dfkd ARGS`: `bench` goes to its own parser whole; every other command runs its `_cmd_*`, a
    settings error printed as one line with exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from dfkd_assets.tools.bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    from dfkd_assets.config import ConfigError

    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"error: {redact(str(e))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
