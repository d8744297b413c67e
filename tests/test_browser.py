"""The UIs a reviewer uses, in a real headless Chromium (Debian's `chromium` package): the Dagster
UI served by `make ui` lists the assets and shows a materialization; the MLflow UI shows the
registered model with its `champion` alias. Skipped, with the reason, where Chromium is absent."""

import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import dagster as dg
import pytest

from conftest import ROOT, make_workspace

pytestmark = pytest.mark.e2e
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ASSETS = ["teacher_head", "prompt_bank", "synthetic_images", "synthetic_dataset", "student_model", "evaluation_report", "champion_student"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"server for {url} exited with {proc.returncode}"
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(url)


def _dom(url: str, tmp_path, name: str) -> str:
    """The page's DOM after its scripts ran (and a screenshot next to it, for a human to look at)."""
    args = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / ('chrome-' + name)}",
            "--virtual-time-budget=20000", "--window-size=1400,1000"]
    subprocess.run(args + [f"--screenshot={tmp_path / (name + '.png')}", url], capture_output=True, timeout=120)
    return subprocess.run(args + ["--dump-dom", url], capture_output=True, text=True, timeout=120).stdout


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (Debian: apt-get install chromium chromium-driver)")
def test_dagster_and_mlflow_uis_show_assets_materializations_and_the_champion(tmp_path, monkeypatch):
    from dfkd_assets.config import load_config
    from dfkd_assets.definitions import build_defs
    from dfkd_assets.defs.runner import run_pipeline

    cfg_path = make_workspace(tmp_path)
    home = tmp_path / "dagster_home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    cfg = load_config(cfg_path)
    with dg.DagsterInstance.get() as instance:
        assert all(r.success for r in run_pipeline(build_defs(cfg_path), instance, log=lambda s: None))

    ui_port, ml_port = _free_port(), _free_port()
    ui = subprocess.Popen(["make", "-s", "ui", f"UI_PORT={ui_port}", f"DAGSTER_HOME={home}", f"DFKD_CONFIG={cfg_path}"], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ml = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", cfg.resolve(cfg.mlflow.tracking_uri),
                           "--host", "127.0.0.1", "--port", str(ml_port), "--workers", "1"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{ui_port}/server_info", ui)
        catalog = _dom(f"http://127.0.0.1:{ui_port}/assets", tmp_path, "dagster-assets")
        missing = [a for a in ASSETS if a not in catalog]
        assert not missing, f"asset catalog lacks {missing}; see {tmp_path / 'dagster-assets.png'}"
        assert "Materialized" in catalog
        page = _dom(f"http://127.0.0.1:{ui_port}/assets/student_model", tmp_path, "dagster-student")
        assert "student_model" in page and "model_version" in page  # the latest materialization's metadata

        _wait_http(f"http://127.0.0.1:{ml_port}/health", ml)
        model = _dom(f"http://127.0.0.1:{ml_port}/#/models/{cfg.mlflow.registered_model_name}", tmp_path, "mlflow-model")
        assert cfg.mlflow.registered_model_name in model and "champion" in model, f"see {tmp_path / 'mlflow-model.png'}"
    finally:
        import os
        import signal

        for p in (ui, ml):  # whole process groups: `dagster dev` runs a webserver, a daemon and code servers
            for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 30)):
                try:
                    os.killpg(p.pid, sig)
                    p.wait(timeout=grace)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue  # slow graceful shutdown (seen under CI load): kill
