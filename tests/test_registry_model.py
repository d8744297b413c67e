"""The registered model as a consumer meets it, against a real MLflow SQLite store:
pickle-free and self-describing, served over HTTP by `mlflow models serve`, refused when its files
were changed after logging or when it is in the old pickle format.

One student is registered for the module (fixture `registered`): a CI-sized student trained for a
few steps to tell flat red, green and blue images apart as the three CI classes, so "the right
classes" is something the served model can get wrong.
"""

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import ROOT, capture_mlflow_output, make_workspace, pickle_findings, registry_client

COLOURS = torch.eye(3)  # red, green, blue -> classes[0], classes[1], classes[2]


def _flat(colour_index: list[int], side: int) -> torch.Tensor:
    return COLOURS[colour_index][:, :, None, None].expand(-1, -1, side, side).clone()


def _colour_student(cfg):
    """The CI student taught that red/green/blue are classes 0/1/2 (jittered flat images; eval mode)."""
    from dfkd_assets.core.student import build_student

    student = build_student(cfg.student.arch, cfg.classes, cfg.student.input_size, 0)
    opt = torch.optim.Adam(student.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        y = torch.randint(0, 3, (24,), generator=g)
        x = (0.1 + 0.8 * _flat(y.tolist(), 32) + 0.1 * torch.rand(24, 3, 32, 32, generator=g)).clamp(0, 1)
        loss = torch.nn.functional.cross_entropy(student(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    student.eval()
    with torch.no_grad():
        assert student(_flat([0, 1, 2], 32)).argmax(-1).tolist() == [0, 1, 2], "precondition: the student tells the colours apart"
    return student


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """The colour student registered the way student_model registers (ModelRegistry.register_challenger,
    in an MLflow run) and made champion; MLflow's output while logging it is kept."""
    from dfkd_assets.config import load_config
    from dfkd_assets.defs.registry import ModelRegistry
    from dfkd_assets.defs.resources import MlflowTracking

    root = tmp_path_factory.mktemp("registry")
    cfg = load_config(make_workspace(root))
    tracking = MlflowTracking()
    registry = ModelRegistry(cfg, tracking)
    student = _colour_student(cfg)
    tags = {"config_hash": cfg.config_hash(), "teacher_id": "test-teacher", "dvc_hash": "0" * 32, "prompt_method": cfg.prompts.method,
            "git_sha": "abc123", "dagster_run_id": "test"}
    with capture_mlflow_output() as logged, tracking.run(cfg, run_name="registry-test", tags=tags):
        version = registry.register_challenger(student, tags)
    registry.promote(version, None, "test")
    return SimpleNamespace(cfg=cfg, registry=registry, name=registry.name, version=version, student=student, logged=logged, root=root)


def _download(reg, version: str, dst: Path) -> Path:
    import mlflow.artifacts

    registry_client(reg.cfg)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{reg.name}/{version}", dst_path=str(dst)))


def _stored_model_dir(reg, version: str) -> Path:
    """Where the artifact store (a local folder here) keeps the version's files: what an attacker with
    write access to the store would edit."""
    from urllib.parse import urlparse

    return Path(urlparse(registry_client(reg.cfg).get_model_version_download_uri(reg.name, version)).path)


def test_pickle_scanner_flags_what_it_must():
    """The scanner the next tests rely on finds a plain pickle, a torch.save zip and MLflow's own name."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "payload.bin").write_bytes(pickle.dumps({"a": 1}, protocol=4))
        torch.save({"w": torch.zeros(1)}, d / "weights.data")
        (d / "python_model.pkl").write_bytes(b"")
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(1)}, d / "fine.safetensors")
        found = pickle_findings(d)
    assert found == ["payload.bin: starts with a pickle protocol 4 header", "python_model.pkl: pickle file name",
                     "weights.data: zip holding a pickle"]


def test_logged_model_is_pickle_free_and_describes_itself(registered, tmp_path):
    import yaml

    from dfkd_assets.core.io import sha256_file

    reg = registered
    local = _download(reg, reg.version, tmp_path)
    assert pickle_findings(local) == []
    assert not reg.logged.mentioning("pickle"), reg.logged.mentioning("pickle")  # no "may execute arbitrary code" warning
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert set(mlmodel["flavors"]) == {"python_function"}
    pyfunc = mlmodel["flavors"]["python_function"]
    assert Path(pyfunc["model_code_path"]).name == "registry_model.py" and (local / "registry_model.py").is_file()
    spec = json.loads((local / pyfunc["artifacts"]["spec"]["path"]).read_text())
    assert spec["arch"] == reg.cfg.student.arch and spec["classes"] == reg.cfg.classes and spec["input_size"] == reg.cfg.student.input_size
    assert len(spec["mean"]) == len(spec["std"]) == 3
    # signature and input example
    inputs = json.loads(mlmodel["signature"]["inputs"])
    assert inputs[0]["tensor-spec"] == {"dtype": "float32", "shape": [-1, 3, -1, -1]}
    assert [c["name"] for c in json.loads(mlmodel["signature"]["outputs"])] == ["label", "score", *reg.cfg.classes]
    example = np.array(json.loads((local / "serving_input_example.json").read_text())["inputs"], dtype=np.float32)
    assert example.ndim == 4 and example.shape[1] == 3
    # integrity: the sha256 of each file as a version tag and in the model's own config
    tags = registry_client(reg.cfg).get_model_version(reg.name, reg.version).tags
    weights, spec_file = (local / pyfunc["artifacts"][k]["path"] for k in ("weights", "spec"))
    assert tags["weights_sha256"] == pyfunc["config"]["weights_sha256"] == sha256_file(weights)
    assert tags["spec_sha256"] == pyfunc["config"]["spec_sha256"] == sha256_file(spec_file)
    assert tags["code_sha256"] == sha256_file(local / "registry_model.py")


def test_served_model_carries_its_code_and_pins_every_requirement(registered, tmp_path):
    """What `mlflow models serve` installs for a version (its requirements.txt) names no package of this
    project, which an index could serve to whoever registers the name, and pins every other one; the
    model's own code (dfkd_assets/core) travels with it: loaded in a process where the installed project
    cannot be imported, it answers like the student, importing dfkd_assets from the model's folder."""
    from importlib.metadata import version

    reg = registered
    local = _download(reg, reg.version, tmp_path / "model")
    reqs = [line.strip() for line in (local / "requirements.txt").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert reqs and not [r for r in reqs if "dfkd" in r.lower()], reqs
    assert all("==" in r for r in reqs), reqs
    assert f"torch=={version('torch')}" in reqs and f"timm=={version('timm')}" in reqs
    assert (local / "code" / "dfkd_assets" / "core" / "student.py").is_file() and not (local / "code" / "dfkd_assets" / "defs").exists()
    x = _flat([2, 0, 1], 32)
    np.save(tmp_path / "x.npy", x.numpy())
    script = (
        "import sys, json, numpy as np\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"  # the installed project's finder (pip -e)
        f"sys.path[:] = [p for p in sys.path if p not in ('', {str(ROOT)!r})]\n"
        "try:\n    import dfkd_assets\n    raise SystemExit('precondition: the project is still importable')\nexcept ImportError:\n    pass\n"
        "import mlflow.pyfunc\n"
        f"model = mlflow.pyfunc.load_model({str(local)!r})\n"
        f"out = model.predict(np.load({str(tmp_path / 'x.npy')!r}))\n"
        "import dfkd_assets\n"
        "print(json.dumps({'labels': list(out['label']), 'from': dfkd_assets.__file__}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    assert answer["labels"] == [reg.cfg.classes[i] for i in (2, 0, 1)]
    assert Path(answer["from"]).resolve().is_relative_to((local / "code").resolve()), answer["from"]


def test_pyfunc_and_dfkd_loader_answer_like_the_student(registered):
    """mlflow.pyfunc (what serving runs) and dfkd's own loader give the trained student's answers,
    at the student's size and at another size (the model resizes)."""
    import mlflow.pyfunc

    from dfkd_assets.defs.registry import load_student_model

    reg = registered
    client = registry_client(reg.cfg)
    model = mlflow.pyfunc.load_model(f"models:/{reg.name}@champion")
    for side in (32, 48):
        x = _flat([2, 0, 1], side)
        frame = model.predict(x.numpy())
        assert list(frame.columns) == ["label", "score", *reg.cfg.classes]
        assert frame["label"].tolist() == [reg.cfg.classes[i] for i in (2, 0, 1)]
        with torch.no_grad():
            want = reg.student(x).softmax(-1).numpy()
        np.testing.assert_allclose(frame[reg.cfg.classes].to_numpy(), want, atol=1e-6)
        np.testing.assert_allclose(frame["score"].to_numpy(), want.max(1), atol=1e-6)
    loaded = load_student_model(client, f"models:/{reg.name}/{reg.version}")
    with torch.no_grad():
        torch.testing.assert_close(loaded(_flat([0, 1, 2], 32)), reg.student(_flat([0, 1, 2], 32)))
    assert loaded.classes == reg.cfg.classes and loaded.input_size == reg.cfg.student.input_size


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_the_right_classes(registered, tmp_path):
    """`mlflow models serve -m models:/<name>@champion --env-manager local` on 127.0.0.1, then a real
    POST /invocations with flat red, green and blue images (two sizes): the classes the student was
    taught, with its probabilities."""
    reg = registered
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": reg.cfg.resolve(reg.cfg.mlflow.tracking_uri),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # MLflow starts `uvicorn` by name
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{reg.name}@champion", "--env-manager", "local",
                               "--host", "127.0.0.1", "--port", str(port)], env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.time() + 240
        while True:
            assert server.poll() is None, f"server exited ({server.returncode}):\n" + (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5):
                    break
            except OSError:
                assert time.time() < deadline, "server not up after 240 s:\n" + (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(1)
        for side in (32, 20):
            x = _flat([1, 2, 0], side)
            answer = _post(f"http://127.0.0.1:{port}/invocations", {"inputs": x.tolist()})["predictions"]
            assert [row["label"] for row in answer] == [reg.cfg.classes[i] for i in (1, 2, 0)], answer
            with torch.no_grad():
                want = reg.student(x).softmax(-1).numpy()
            got = np.array([[row[c] for c in reg.cfg.classes] for row in answer])
            np.testing.assert_allclose(got, want, atol=1e-5)
            assert all(set(row) == {"label", "score", *reg.cfg.classes} for row in answer)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        log.close()


def test_tampered_files_are_refused_naming_the_file(registered, tmp_path):
    """A weight changed in the artifact store (the file still loads as safetensors): refused by dfkd's
    loader, by mlflow.pyfunc and by `dfkd predict`, each naming model.safetensors; a changed code file
    is refused by dfkd's loader too."""
    import mlflow.pyfunc

    from dfkd_assets.defs.registry import load_student_model
    from dfkd_assets.registry_model import IntegrityError

    reg = registered
    client = registry_client(reg.cfg)
    stored = _stored_model_dir(reg, reg.version)
    weights, code = stored / "artifacts" / "model.safetensors", stored / "registry_model.py"
    original, original_code = weights.read_bytes(), code.read_bytes()
    try:
        weights.write_bytes(original[:-4] + bytes(b ^ 0x01 for b in original[-4:]))  # one float's low bits: still valid safetensors
        uri = f"models:/{reg.name}/{reg.version}"
        with pytest.raises(IntegrityError, match=r"model\.safetensors .*does not match the sha256 recorded in the registry's tags"):
            load_student_model(client, uri)
        with pytest.raises(Exception, match=r"model\.safetensors .*does not match the sha256 recorded in the model's MLmodel"):
            mlflow.pyfunc.load_model(uri)
        img = tmp_path / "red.png"
        from PIL import Image

        Image.new("RGB", (32, 32), (255, 0, 0)).save(img)
        out = subprocess.run([sys.executable, "-m", "dfkd_assets.tools.cli", "predict", str(img), "--config", str(reg.root / "settings.yaml"),
                              "--model-uri", uri], capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert out.returncode != 0 and "model.safetensors" in out.stderr and "does not match the sha256" in out.stderr, out.stderr[-2000:]

        weights.write_bytes(original)
        code.write_bytes(original_code + b"\nimport os  # an edit\n")
        with pytest.raises(IntegrityError, match=r"registry_model\.py .*code_sha256"):
            load_student_model(client, uri)
    finally:
        weights.write_bytes(original)
        code.write_bytes(original_code)
    assert load_student_model(client, uri).classes == reg.cfg.classes  # restored: loads again


class _Payload:
    """Unpickles as a call to os.system: what a hostile pickle-format model would smuggle in."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_old_pickle_format_version_is_refused_unloaded_with_guidance(registered, tmp_path):
    """A version logged as before (mlflow.pytorch, serialization_format='pickle'), its pickle replaced
    by one that would run a command: dfkd's loader and the evaluation asset's champion comparison
    refuse it, say how to re-register, and the command never runs."""
    import mlflow
    import mlflow.pytorch

    from dfkd_assets.defs.evaluation import _comparable_champion
    from dfkd_assets.defs.registry import LegacyModelError, load_student_model

    reg = registered
    client = registry_client(reg.cfg)
    with capture_mlflow_output() as logged, mlflow.start_run(experiment_id=reg.registry.tracking.experiment_id(reg.cfg)):
        info = mlflow.pytorch.log_model(reg.student, name="student", registered_model_name=reg.name, serialization_format="pickle",
                                        pip_requirements=["torch"])
    assert logged.mentioning("arbitrary code"), "control: the old format's logging warns about pickle (the warning the new one must not give)"
    legacy = str(info.registered_model_version)
    stored = _stored_model_dir(reg, legacy)
    assert pickle_findings(stored), "control: the scanner sees the old format's pickle"
    marker = tmp_path / "pwned"
    torch.save(_Payload(marker), stored / "data" / "model.pth")

    with pytest.raises(LegacyModelError, match=r"old pickle format.*distill_evaluate_promote.*dfkd run"):
        load_student_model(client, f"models:/{reg.name}/{legacy}")
    warnings = []
    assert _comparable_champion(reg.cfg, reg.registry, legacy, "999", "cpu", warnings.append) is None
    assert len(warnings) == 1 and "old pickle format" in warnings[0] and "not compared" in warnings[0]
    assert not marker.exists(), "the legacy model's pickle was executed"
