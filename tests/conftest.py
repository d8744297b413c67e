"""Test-wide setup: offline, no telemetry, no network beyond localhost, tiny models built once, and the
shared workspace / registry helpers (`make_workspace`, the `workspace` fixture, `champion_version`)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ.setdefault("TORCH_NUM_THREADS", "2")

import contextlib  # noqa: E402
import ipaddress  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_CLIP = ROOT / "configs" / "models" / "dfkd-tiny-clip.json"
TINY_VQGAN = ROOT / "configs" / "models" / "tiny-vqgan.yaml"


class NetworkAccessError(RuntimeError):
    pass


def _is_local(address) -> bool:
    if isinstance(address, (str, bytes)):  # AF_UNIX path
        return True
    host = address[0]
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_real_connect, _real_connect_ex = socket.socket.connect, socket.socket.connect_ex


def _guarded(real):
    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address):
            raise NetworkAccessError(f"test tried to open a network connection to {address!r}; tests must stay offline")
        return real(self, address)

    return connect


socket.socket.connect = _guarded(_real_connect)
socket.socket.connect_ex = _guarded(_real_connect_ex)


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def cpu():
    import torch

    torch.set_num_threads(2)
    return torch.device("cpu")


@pytest.fixture(scope="session")
def teacher(cpu):
    from dfkd_assets.core.teacher import load_teacher

    return load_teacher("dfkd-tiny-clip", None, TINY_CLIP, 0, cpu)


@pytest.fixture(scope="session")
def vqgan(cpu):
    from dfkd_assets.core.vqgan import load_vqgan

    return load_vqgan(TINY_VQGAN, None, 0, cpu)


def make_workspace(tmp: Path, extra: dict | None = None) -> Path:
    """A fresh workspace (DVC repo root) with the CI settings pointed into it; returns the config path.

    Lays out under `tmp`: ws/ (the workspace), eval/ (a 3-per-class evaluation set), remote/ (the DVC
    remote), dagster_home/ and settings.yaml; `extra` replaces top-level settings (not a deep merge).
    """
    ws = tmp / "ws"
    ws.mkdir()
    shutil.copy(ROOT / "dvc.yaml", ws / "dvc.yaml")
    cfg = yaml.safe_load((ROOT / "configs" / "ci.yaml").read_text())
    cfg["workspace"] = str(ws)
    cfg["teacher"]["model_config_file"] = str(TINY_CLIP)
    cfg["generator"]["config_file"] = str(TINY_VQGAN)
    cfg["evaluation"]["datasets"][0]["root"] = str(tmp / "eval")
    cfg["dvc"] = {"remote_url": str(tmp / "remote")}
    cfg.update(extra or {})
    path = tmp / "settings.yaml"
    path.write_text(yaml.safe_dump(cfg))
    from dfkd_assets.toyworld.evalset import write_eval_set

    write_eval_set(tmp / "eval", cfg["classes"], per_class=3, size=32)
    home = tmp / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    return path


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    """`make_workspace(tmp_path)` with DAGSTER_HOME set to its dagster_home; the config path."""
    cfg_path = make_workspace(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    return cfg_path


# --- the MLflow model registry, read the way a consumer reads it (one place to follow product renames) ---


def registry_client(cfg):
    """An MlflowClient on the settings' tracking/registry URI (also made the process default, for `models:/` URIs)."""
    import mlflow

    uri = cfg.resolve(cfg.mlflow.tracking_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def alias_version(cfg, alias: str) -> str | None:
    """The version `alias` of the registered model points at; None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return str(registry_client(cfg).get_model_version_by_alias(cfg.mlflow.registered_model_name, alias).version)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def champion_version(cfg) -> str | None:
    return alias_version(cfg, "champion")


def load_registered(cfg, alias: str = "champion"):
    """The student network behind `models:/<name>@<alias>` (verified, never unpickled), in eval mode on the CPU."""
    from dfkd_assets.defs.registry import load_student_model

    return load_student_model(registry_client(cfg), f"models:/{cfg.mlflow.registered_model_name}@{alias}")


# --- the CI pipeline run once per module, and the workspace it leaves restored for each test (test_operations, test_int8) ---


def with_overrides(overrides: dict) -> dict:
    """Run config that gives the settings resource `overrides` (deep-merged over the settings file)."""
    return {"resources": {"settings": {"config": {"overrides": overrides}}}}


def check_result(result, name: str):
    """The evaluation of asset check `name` in an in-process run (None when it did not run)."""
    return next((e for e in result.get_asset_check_evaluations() if e.check_name == name), None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The CI pipeline run once per test module (Contrastive-Prompt, as in the demo): champion v1, its
    ONNX export registered as <name>-onnx v1. Returns the
    workspace root, a pristine copy of it (workspace, eval set, DVC remote, dagster_home) and what
    MLflow logged and warned meanwhile."""
    import dagster as dg

    from dfkd_assets.definitions import build_defs
    from dfkd_assets.defs.runner import run_pipeline

    root = tmp_path_factory.mktemp("ops")
    cfg_path = make_workspace(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAGSTER_HOME", str(root / "dagster_home"))
        # before MLflow first opens this workspace's mlflow.db: the engine it caches for it stays pool-less
        mp.setenv("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")
        defs = build_defs(cfg_path)
        with capture_mlflow_output() as mlflow_output, dg.DagsterInstance.get() as instance:
            results = run_pipeline(defs, instance, log=lambda s: None)
    assert all(r.success for r in results)
    pristine = tmp_path_factory.mktemp("ops-pristine") / "root"
    shutil.copytree(root, pristine, symlinks=True)
    return root, pristine, mlflow_output


@pytest.fixture
def ops(trained, monkeypatch):
    """The trained workspace as the pipeline left it (restored in place, see tests/test_operations.py),
    DAGSTER_HOME pointed at it."""
    from dfkd_assets.config import load_config
    from dfkd_assets.definitions import build_defs

    root, pristine, _ = trained
    for p in root.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    shutil.copytree(pristine, root, symlinks=True, dirs_exist_ok=True)
    monkeypatch.setenv("DAGSTER_HOME", str(root / "dagster_home"))
    monkeypatch.setenv("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")  # any engine first made now, too
    cfg_path = root / "settings.yaml"
    cfg = load_config(cfg_path)
    return SimpleNamespace(root=root, cfg_path=cfg_path, cfg=cfg, defs=build_defs(cfg_path), name=cfg.mlflow.registered_model_name)


def model_labelled_eval_set(root: Path, classes: list[str], champion, size: int, per_class: int = 2, challenger=None,
                            domains: tuple[str, ...] = ("photo",), margin: float = 0.05) -> Path:
    """A DomainBed-style evaluation set labelled by the champion's own predictions, `per_class` images
    of each class in each of `domains`: on it the champion scores 1, whatever it learnt. With
    `challenger`, made only of images the challenger classifies as another class (it scores 0). The
    CI models answer one class for almost any natural or noise image, so the images are made:
    projected sign-gradient steps on the pixels from seeded noise, until every answer holds by a
    logit gap above `margin` on the 8-bit image; each PNG is then re-read the way evaluation reads
    it and checked again."""
    import numpy as np
    import torch
    from PIL import Image

    from dfkd_assets.core.evaluation import load_image

    models = [m for m in (champion, challenger) if m is not None]
    for m in models:
        m.eval().requires_grad_(False)
    k = len(classes)
    target = torch.arange(k).repeat_interleave(per_class).repeat(len(domains))
    is_target = torch.nn.functional.one_hot(target, k).bool()

    def gaps(x):
        a = champion(x)
        out = [a[is_target] - a.masked_fill(is_target, -torch.inf).max(1).values]  # > 0: the champion says target
        if challenger is not None:
            b = challenger(x)
            out.append(b.masked_fill(is_target, -torch.inf).max(1).values - b[is_target])  # > 0: the challenger says another class
        return out

    x = torch.rand(len(target), 3, size, size, generator=torch.Generator().manual_seed(0))
    for _ in range(500):
        with torch.no_grad():
            done = [bool((g > margin).all()) for g in gaps((x * 255).round() / 255)]
        if all(done):
            break
        x.requires_grad_(True)
        loss = sum(torch.relu(margin + 0.45 - g).sum() for g in gaps(x))
        (grad,) = torch.autograd.grad(loss, x)
        x = (x.detach() - 0.02 * grad.sign()).clamp(0, 1)
    assert all(done), "no images found that the champion labels " + ("and the challenger does not" if challenger is not None else "confidently")
    pixels = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, (label, img) in enumerate(zip(target.tolist(), pixels)):
        path = root / domains[i // (k * per_class)] / classes[label] / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)
        x1 = torch.from_numpy(np.array(load_image(path, size))).permute(2, 0, 1)[None].float() / 255  # as core.evaluation.evaluate
        with torch.no_grad():
            assert int(champion(x1).argmax(-1)) == label, path
            assert challenger is None or int(challenger(x1).argmax(-1)) != label, path
    return root


POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def create_postgres_db(name: str, password: str | None = None) -> str | None:
    """A fresh database on this machine's Postgres (trust auth, as on the CI machine), as a
    `postgresql+psycopg2://` URL (SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3, which the
    project does not ship); `password` only appears in the URL. None when no Postgres answers."""
    try:
        import psycopg2

        conn = psycopg2.connect(POSTGRES_ADMIN, connect_timeout=3)
    except Exception:
        return None
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    user = "postgres" if password is None else f"postgres:{password}"
    return f"postgresql+psycopg2://{user}@127.0.0.1:5432/{name}"


def drop_postgres_db(name: str) -> None:
    import psycopg2

    conn = psycopg2.connect(POSTGRES_ADMIN, connect_timeout=3)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()


# --- what a logged model directory holds and what MLflow says while logging one ---

PICKLE_SUFFIXES = (".pkl", ".pickle", ".pth", ".pt", ".joblib", ".cloudpickle")


def pickle_findings(directory: Path) -> list[str]:
    """Files under `directory` that are, or hold, a pickle: a pickle's file name, a file starting with
    a pickle protocol 2-5 header (a valid safetensors file whose length prefix happens to look like
    one is not counted), or a zip holding a .pkl member (torch.save's format). Empty when none."""
    import zipfile

    from safetensors import safe_open

    def is_safetensors(p: Path) -> bool:
        try:
            with safe_open(str(p), "np"):
                return True
        except Exception:
            return False

    found = []
    for p in sorted(Path(directory).rglob("*")):
        if not p.is_file():
            continue
        head = p.read_bytes()[:2]
        if p.name.endswith(PICKLE_SUFFIXES):
            found.append(f"{p.name}: pickle file name")
        elif len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5 and not is_safetensors(p):
            found.append(f"{p.name}: starts with a pickle protocol {head[1]} header")
        elif zipfile.is_zipfile(p) and any(n.endswith(".pkl") for n in zipfile.ZipFile(p).namelist()):
            found.append(f"{p.name}: zip holding a pickle")
    return found


class MlflowOutput:
    """MLflow's log records and Python warnings seen inside `with capture_mlflow_output() as out`."""

    def __init__(self):
        self.messages: list[str] = []

    def mentioning(self, word: str) -> list[str]:
        return [m for m in self.messages if word.lower() in m.lower()]


@contextlib.contextmanager
def capture_mlflow_output():
    """MLflow logs through its own logger (it does not propagate to the root logger, so caplog misses
    it): a handler on it, plus every warning raised meanwhile."""
    import logging
    import warnings

    out = MlflowOutput()

    class Collect(logging.Handler):
        def emit(self, record):
            out.messages.append(record.getMessage())

    handler, logger = Collect(level=logging.DEBUG), logging.getLogger("mlflow")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield out
        out.messages.extend(str(w.message) for w in caught)
    finally:
        logger.removeHandler(handler)


def pipeline_models(cfg, device):
    """(teacher, its zero-shot head, prompt bank, generator) of `cfg`, loaded through the stages the
    assets use: what a learning test synthesizes and distils with."""
    from dfkd_assets.loaders import generator_for, teacher_for
    from dfkd_assets.stages.prompts import build_head, build_prompt_bank

    teacher = teacher_for(cfg, device)
    head = build_head(cfg, teacher)
    bank, _ = build_prompt_bank(cfg, teacher, head)
    return teacher, head, bank, generator_for(cfg, device)
