"""What every materialization records so a model version leads back to its exact inputs."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

import dagster as dg

from dfkd_assets.config import DfkdConfig


@functools.lru_cache(maxsize=1)
def git_sha() -> str:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True)
    if proc.returncode != 0:
        return "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent, capture_output=True, text=True)
    return proc.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def lineage(cfg: DfkdConfig, context: dg.AssetExecutionContext, **extra: str) -> dict[str, str]:
    """Tags for MLflow and metadata for Dagster: config hash, git sha, Dagster run id, plus `extra`."""
    return {"config_hash": cfg.config_hash(), "git_sha": git_sha(), "dagster_run_id": context.run.run_id, **{k: str(v) for k, v in extra.items()}}


def md_image(path: Path, alt: str) -> str:
    """Markdown embedding a small PNG inline, so the Dagster UI shows it without a file server."""
    import base64

    return f"![{alt}](data:image/png;base64,{base64.b64encode(Path(path).read_bytes()).decode()})"
