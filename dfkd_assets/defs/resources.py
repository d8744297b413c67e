"""Resources: the settings of a run, our MLflow tracking wrapper, and the DVC repository.

All three are small `ConfigurableResource`s so a launchpad run can override them. Heavy imports
(mlflow) happen inside methods: Dagster loads this module when it loads the definitions.
"""


import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import dagster as dg
import yaml
from pydantic import Field

from dfkd_assets.config import DfkdConfig, config_path_from_env, load_config
from dfkd_assets.redaction import redact, release_tracking_credentials, split_credentials, use_tracking_credentials


class PipelineSettings(dg.ConfigurableResource):
    """Which settings file a run uses, plus per-run overrides (a nested mapping merged into it)."""

    config_file: str = Field("", description="YAML settings file; empty = $DFKD_CONFIG or configs/demo.yaml")
    overrides: dict[str, Any] = Field(default_factory=dict, description="e.g. {synthesis: {iterations: 50}}")

    def load(self) -> DfkdConfig:
        return load_config(self.config_file or config_path_from_env(), self.overrides or None)


def bound_settings(config_file: str) -> PipelineSettings:
    """Settings resource whose *default* file is `config_file`.

    Dagster rebuilds a resource from run config when a launchpad run configures it, and fields
    missing there fall back to the class defaults, not to the values bound in code; so a run
    that only gives `overrides` would silently switch to $DFKD_CONFIG. A subclass with the bound
    file as its default keeps the code location's settings file.
    """
    default = str(config_file)

    class BoundPipelineSettings(PipelineSettings):
        config_file: str = Field(default, description="YAML settings file of this code location")

    return BoundPipelineSettings()


class MlflowTracking(dg.ConfigurableResource):
    """A thin wrapper around `MlflowClient` (we do not use the op-era dagster-mlflow resource).

    `tracking_uri` overrides the settings file (e.g. an `mlflow server` when scaling out). A server's
    `user:password@` is handed to MLflow through MLFLOW_TRACKING_USERNAME/PASSWORD, not the URI:
    MLflow quotes the URI in its errors, which end up in the Dagster event log. Those variables are
    read by MLflow for whatever server it talks to, so they hold the credentials of this client's
    server only while it is the one in use (`redaction.use_tracking_credentials`): a client for
    another server removes them, and they are removed after each step (`teardown_after_execution`).
    """

    tracking_uri: str = Field("", description="empty = mlflow.tracking_uri of the settings; '{env:NAME}' is substituted")

    def uri(self, cfg: DfkdConfig) -> str:
        """The URI MLflow is given (an http(s) server's credentials removed). Record it only through `redact`:
        a database URI keeps its password."""
        uri, _, _ = split_credentials(cfg.resolve(self.tracking_uri or cfg.mlflow.tracking_uri))
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return uri

    def client(self, cfg: DfkdConfig):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        import mlflow
        from mlflow import MlflowClient

        use_tracking_credentials(cfg.resolve(self.tracking_uri or cfg.mlflow.tracking_uri))  # this server's, or none
        uri = self.uri(cfg)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        return MlflowClient(tracking_uri=uri, registry_uri=uri)

    def teardown_after_execution(self, context) -> None:
        """Credentials never outlive the step that was given them."""
        release_tracking_credentials()

    def experiment_id(self, cfg: DfkdConfig) -> str:
        client = self.client(cfg)
        exp = client.get_experiment_by_name(cfg.mlflow.experiment_name)
        if exp is not None:
            return exp.experiment_id
        loc = cfg.resolve(cfg.mlflow.artifact_location) if cfg.mlflow.artifact_location else None
        return client.create_experiment(cfg.mlflow.experiment_name, artifact_location=Path(loc).resolve().as_uri() if loc and "://" not in loc else loc)

    @contextlib.contextmanager
    def run(self, cfg: DfkdConfig, run_name: str, tags: dict[str, str]) -> Iterator[Any]:
        """An active (fluent) MLflow run that ends FINISHED on success and FAILED on any exception."""
        import mlflow

        exp_id = self.experiment_id(cfg)
        run = mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=tags)
        try:
            yield run
        except BaseException:
            mlflow.end_run(status="FAILED")
            raise
        else:
            mlflow.end_run(status="FINISHED")

    def log_settings(self, cfg: DfkdConfig) -> None:
        """The settings of the active run: every leaf as a param, the tree as config.yaml (URL passwords masked)."""
        import mlflow

        public = cfg.public_dump()
        mlflow.log_params(_flatten(public))
        mlflow.log_text(yaml.safe_dump(public, sort_keys=False), "config.yaml")

    def log(self, metrics: dict[str, float] | None = None, params: dict[str, str] | None = None, step: int | None = None,
            files: Path | None = None, artifact_path: str | None = None) -> None:
        """Metrics (at `step`), params and a folder of files to the active run (`run`)."""
        import mlflow

        if params:
            mlflow.log_params(params)
        if metrics:
            mlflow.log_metrics(metrics, step=step)
        if files is not None:
            mlflow.log_artifacts(str(files), artifact_path)

    def log_to_run(self, cfg: DfkdConfig, run_id: str, metrics: dict[str, float], files: list[Path], artifact_path: str) -> None:
        """Metrics and files added to a finished run (e.g. the few-shot report to its student's run)."""
        client = self.client(cfg)
        for key, value in metrics.items():
            client.log_metric(run_id, key, value)
        for path in files:
            client.log_artifact(run_id, str(path), artifact_path)

    def log_series(self, cfg: DfkdConfig, run_id: str, key: str, points: list[tuple[int, float]]) -> None:
        """A whole metric history (step, value) in MLflow's batch size, one timestamp for all."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        series = [Metric(key, v, now, step) for step, v in points]
        client = self.client(cfg)
        for i in range(0, len(series), 1000):
            client.log_batch(run_id, metrics=series[i : i + 1000])

    def curve_run_id(self, cfg: DfkdConfig, name: str) -> str:
        """The run holding a curve across model versions (one per `name`, e.g. the round curve of a
        registered model), made on first use: its metric histories are the curve, one step per point."""
        client = self.client(cfg)
        exp_id = self.experiment_id(cfg)
        found = client.search_runs([exp_id], filter_string=f"tags.dfkd_curve = '{name}'", max_results=1)
        if found:
            return found[0].info.run_id
        run = client.create_run(exp_id, run_name=name, tags={"dfkd_curve": name})
        return run.info.run_id

    def metric_history(self, cfg: DfkdConfig, run_id: str, key: str) -> list[tuple[int, float]]:
        """(step, value) of a metric, the last value logged at each step, by step."""
        last = {}
        for m in sorted(self.client(cfg).get_metric_history(run_id, key), key=lambda m: m.timestamp):
            last[m.step] = m.value
        return sorted(last.items())

    def alias_version(self, cfg: DfkdConfig, alias: str) -> str | None:
        """The version `alias` points at; None only when the registry says the model or the alias does not exist.

        Any other error (an unreachable or failing server) is raised: read as "no champion", an
        outage would let evaluation skip the champion and promotion treat a challenger as the first model.
        """
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client(cfg).get_model_version_by_alias(cfg.mlflow.registered_model_name, alias).version)
        except MlflowException as e:
            if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):  # no such model / no such alias
                return None
            raise


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = str(v)[:500]  # MLflow's param value limit
    return out


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server did not answer: transient, so the step is retried (operations.max_retries)."""


class DvcError(RuntimeError):
    pass


class DvcRepo(dg.ConfigurableResource):
    """The DVC repository at `workspace` (initialised on first use) and its default remote.

    DVC holds one repository lock, so every asset using this resource runs in the `dvc` pool (limit 1).
    """

    remote_url: str = Field("", description="empty = dvc.remote_url of the settings")

    def _run(self, cfg: DfkdConfig, *args: str) -> str:
        env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
        proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cfg.workspace, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            out = proc.stderr.strip() or proc.stdout.strip()
            raise DvcError(redact(f"`dvc {' '.join(args)}` failed in {cfg.workspace} (exit {proc.returncode}):\n{out}"))
        return proc.stdout

    def ensure(self, cfg: DfkdConfig) -> str:
        """Initialise the repo if needed and point the default remote at the configured URL; returns that URL."""
        ws = cfg.workspace.resolve()
        ws.mkdir(parents=True, exist_ok=True)
        if not (ws / ".dvc").is_dir():
            in_git = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=ws, capture_output=True, text=True)
            ignored = in_git.returncode == 0 and subprocess.run(["git", "check-ignore", "-q", str(ws)], cwd=ws).returncode == 0
            if in_git.returncode != 0 or ignored:  # DVC refuses .dvc files that git ignores: keep git out of it
                self._run(cfg, "init", "--no-scm")
            elif Path(in_git.stdout.strip()).resolve() == ws:
                self._run(cfg, "init")
            else:
                self._run(cfg, "init", "--subdir")
        url = self.remote_url or cfg.resolve(cfg.dvc.remote_url)
        if "://" not in url:
            try:
                Path(url).mkdir(parents=True, exist_ok=True)
            except OSError as e:  # e.g. a path under a file, an unmounted or read-only volume
                raise DvcError(redact(f"DVC remote {url} (dvc.remote_url) cannot be created: {e}")) from e
        # --local: the remote location is a machine setting, not committed project config
        self._run(cfg, "remote", "add", "--local", "--force", "--default", cfg.dvc.remote_name, url)
        return url

    def add_and_push(self, cfg: DfkdConfig, path: Path) -> str:
        """`dvc add` + `dvc push` of `path` (relative to the workspace); returns the DVC hash of the output."""
        rel = Path(path).resolve().relative_to(cfg.workspace.resolve())
        self._run(cfg, "add", str(rel))
        try:
            self._run(cfg, "push", "-r", cfg.dvc.remote_name, f"{rel}.dvc")
        except DvcError as e:
            url = self.remote_url or cfg.resolve(cfg.dvc.remote_url)
            raise DvcError(
                redact(f"push to the DVC remote {cfg.dvc.remote_name!r} at {url} (dvc.remote_url) failed; the shards and the local "
                       f"DVC cache are kept, so a retry once the remote is writable uploads them. {e}")
            ) from e
        from dfkd_assets.artifacts import dvc_file_hash

        return dvc_file_hash(cfg.workspace / f"{rel}.dvc")

    def snapshot_files(self, cfg: DfkdConfig, dvc_hash: str) -> dict[str, str]:
        """relpath -> md5 of every file in the directory version `dvc_hash`, from its listing in the
        local DVC cache (written by `dvc add`): what the snapshot holds, whatever the folder holds now."""
        md5 = dvc_hash.removesuffix(".dir")
        cache = Path(self._run(cfg, "cache", "dir").strip())
        listing = cache / "files" / "md5" / md5[:2] / f"{md5[2:]}.dir"
        try:
            entries = json.loads(listing.read_text())
        except (OSError, ValueError) as e:
            raise DvcError(f"the DVC snapshot {dvc_hash} has no readable listing in the local cache ({listing}: {e}); "
                           "materialize synthetic_dataset again") from None
        return {e["relpath"]: e["md5"] for e in entries}

    def restore(self, cfg: DfkdConfig, dvc_hash: str, out: Path) -> Path:
        """The directory version `dvc_hash` (a `dvc_hash` tag of a model version) checked out into
        `out` (inside the workspace), from the local cache or else the remote: any round's training
        set, whatever data/synthetic holds now. A throwaway .dvc file beside `out` names the version."""
        out = Path(out).resolve()
        ws = cfg.workspace.resolve()
        rel = out.relative_to(ws)  # DVC outputs live inside the repository
        if out.exists():
            raise DvcError(f"{out} exists: restore into a new folder")
        md5 = dvc_hash if dvc_hash.endswith(".dir") else f"{dvc_hash}.dir"
        dvc_file = out.with_name(out.name + ".dvc")
        out.parent.mkdir(parents=True, exist_ok=True)
        dvc_file.write_text(yaml.safe_dump({"outs": [{"md5": md5, "hash": "md5", "path": out.name}]}))
        try:
            self._run(cfg, "pull", "-r", cfg.dvc.remote_name, str(rel) + ".dvc")
        finally:
            dvc_file.unlink(missing_ok=True)
        return out
