"""Issue 37, item 2: bounds for serving and loading.

The registered pyfunc enforces its input contract (batch, sides, dtype, finite values in [0, 1])
before anything that grows with the input is allocated, from limits in its own MLmodel, and
refuses with an MlflowException that MLflow's scoring server turns into HTTP 400. The evaluation
loaders refuse images whose header declares too many pixels (decoded or after the resize) before
decoding, and anything in an evaluation folder that is not a regular file or a symlink to one
inside the dataset (FIFOs, devices, sockets, symlinks out of the root), naming it.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from conftest import make_workspace, registry_client
from dfkd_assets.core.evaluation import MAX_IMAGE_PIXELS, EvalDataError, load_image, scan_domainbed

CLASSES = ["dog", "hot dog", "house"]


# ------------------------------------------------------------------------------------------ loaders


def _tree(root: Path, n: int = 1) -> None:
    for c in CLASSES:
        (root / "photo" / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.full((12, 12, 3), 40 * i, np.uint8)).save(root / "photo" / c / f"{i}.png")


class _NoDecoding:
    """Counts PIL decodes (ImageFile.load) while active."""

    def __init__(self, monkeypatch):
        from PIL import ImageFile

        self.calls = 0
        real = ImageFile.ImageFile.load

        def load(im):
            self.calls += 1
            return real(im)

        monkeypatch.setattr(ImageFile.ImageFile, "load", load)


@pytest.mark.parametrize("w, h", [(2, 1_000_000), (1_000_000, 2)])
def test_a_strip_png_declaring_2_x_1000000_pixels_is_refused_before_decoding(tmp_path, monkeypatch, w, h):
    """A valid PNG of a few KB whose shorter side resized to 224 px would be 224 x 112 000 000 (75 GB)."""
    path = tmp_path / "strip.png"
    Image.new("RGB", (w, h)).save(path)
    assert path.stat().st_size < 20_000 and w * h <= MAX_IMAGE_PIXELS  # small file, and within the decode bound
    decodes = _NoDecoding(monkeypatch)
    start = time.perf_counter()
    with pytest.raises(EvalDataError, match=rf"image {path} is {w} x {h} pixels: with its shorter side resized to 224 px it would be "
                                            rf"{max(w, h) * 112 if w > h else 224} x {max(w, h) * 112 if h > w else 224}, more than the {MAX_IMAGE_PIXELS}"):
        load_image(path, 224)
    assert decodes.calls == 0 and time.perf_counter() - start < 5


def test_an_ordinary_aspect_ratio_still_loads(tmp_path):
    path = tmp_path / "pano.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 4000, 3), dtype=np.uint8)).save(path)  # 100:1 panorama
    assert load_image(path, 32).shape == (32, 32, 3)


@pytest.mark.timeout(60)
def test_a_fifo_in_an_evaluation_folder_is_refused_naming_it_without_blocking(tmp_path):
    _tree(tmp_path)
    fifo = tmp_path / "photo" / "dog" / "stream.jpg"
    os.mkfifo(fifo)  # opening it to read would wait for a writer forever
    with pytest.raises(EvalDataError, match=rf"{fifo} is a FIFO \(named pipe\), not an image file"):
        scan_domainbed(tmp_path, CLASSES, name="ci")
    with pytest.raises(EvalDataError, match=rf"image {fifo} is a FIFO"):
        load_image(fifo, 16)  # the loader itself never blocks on one (a path given to `dfkd predict`)
    quiet = tmp_path / "photo" / "dog" / "notes"  # no image suffix, but still not a file
    fifo.unlink()
    os.mkfifo(quiet)
    with pytest.raises(EvalDataError, match=rf"{quiet} is a FIFO"):
        scan_domainbed(tmp_path, CLASSES, name="ci")


@pytest.mark.timeout(60)
def test_symlinks_out_of_the_root_devices_sockets_and_broken_links_are_refused_all_named(tmp_path):
    root = tmp_path / "eval"
    _tree(root)
    outside = tmp_path / "secret.png"
    Image.new("RGB", (12, 12)).save(outside)
    links = {root / "photo" / "dog" / "leak.png": outside, root / "photo" / "house" / "zero.png": Path("/dev/zero"),
             root / "photo" / "hot dog" / "gone.png": root / "photo" / "missing.png"}  # broken, inside
    for link, target in links.items():
        link.symlink_to(target)
    (root / "sketch").symlink_to(tmp_path, target_is_directory=True)  # a domain folder that leaves the root
    sock_path = root / "photo" / "dog" / "s.png"
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(sock_path))
    except OSError:  # a path too long for AF_UNIX on this machine
        sock_path = None
    try:
        with pytest.raises(EvalDataError) as e:
            scan_domainbed(root, CLASSES, name="ci")
        msg = str(e.value)
        assert "evaluation dataset ci" in msg
        assert f"{root / 'photo' / 'dog' / 'leak.png'} is a symlink to {outside}, outside the dataset root {root}" in msg
        assert f"{root / 'photo' / 'house' / 'zero.png'} is a symlink to /dev/zero, outside" in msg
        assert f"{root / 'photo' / 'hot dog' / 'gone.png'} cannot be examined" in msg
        assert f"{root / 'sketch'} is a symlink to {tmp_path}, outside" in msg
        if sock_path:
            assert f"{sock_path} is a socket" in msg
        # a symlink inside the root is fine
        for link in links:
            link.unlink()
        (root / "sketch").unlink()
        if sock_path:
            sock_path.unlink()
        (root / "photo" / "dog" / "again.png").symlink_to(root / "photo" / "dog" / "0.png")
        sets = scan_domainbed(root, CLASSES, name="ci")
        assert sorted(p.name for p in sets[0].paths) == ["0.png", "0.png", "0.png", "again.png"]
    finally:
        sock.close()


def test_a_folder_named_like_an_image_is_refused(tmp_path):
    _tree(tmp_path)
    (tmp_path / "photo" / "dog" / "album.jpg").mkdir()
    with pytest.raises(EvalDataError, match=r"album.jpg is a folder, not an image file"):
        scan_domainbed(tmp_path, CLASSES)


# ------------------------------------------------------------------------------------------ serving


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """An (untrained) CI student registered the way student_model registers it, and its pyfunc."""
    import mlflow.pyfunc

    from dfkd_assets.config import load_config
    from dfkd_assets.core.student import build_student
    from dfkd_assets.defs.registry import ModelRegistry
    from dfkd_assets.defs.resources import MlflowTracking

    root = tmp_path_factory.mktemp("serving")
    cfg = load_config(make_workspace(root))
    tracking = MlflowTracking()
    registry = ModelRegistry(cfg, tracking)
    student = build_student(cfg.student.arch, cfg.classes, cfg.student.input_size, 0).eval()
    with tracking.run(cfg, run_name="contract", tags={}):
        version = registry.register_challenger(student, {"teacher_id": "t"})
    registry_client(cfg)
    model = mlflow.pyfunc.load_model(f"models:/{registry.name}/{version}")
    forwards = []
    model.unwrap_python_model().student.register_forward_pre_hook(lambda m, args: forwards.append(tuple(args[0].shape)))
    return SimpleNamespace(cfg=cfg, registry=registry, version=version, model=model, forwards=forwards, root=root)


def _refused(served, x, match: str):
    from mlflow.exceptions import MlflowException

    served.forwards.clear()
    start = time.perf_counter()
    with pytest.raises(MlflowException, match=match) as e:
        served.model.predict(x)
    assert e.value.error_code == "INVALID_PARAMETER_VALUE" and e.value.get_http_status_code() == 400
    assert served.forwards == [] and time.perf_counter() - start < 5  # refused before the network ran
    return str(e.value)


def test_a_batch_of_256_tiny_images_is_refused_before_any_forward(served):
    """The issue's 7 KB request: 256 images of 1 x 1, each upsampled before the forward (+2.1 GB)."""
    msg = _refused(served, np.zeros((256, 3, 1, 1), np.float32), r"input contract: a batch of 256 images; this model takes 1 to 32")
    assert "max_batch" in msg


def test_nan_and_infinite_values_are_refused(served):
    x = np.full((1, 3, 32, 32), 0.5, np.float32)
    x[0, 1, 3, 4] = np.nan
    _refused(served, x, "NaN or infinite")
    x[0, 1, 3, 4] = np.inf
    _refused(served, x, "NaN or infinite")


def test_pixels_in_0_255_are_refused_not_guessed(served):
    x = np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32)).astype(np.float32)
    _refused(served, x, r"values must be in \[0, 1\], got 0 to 255 \(0..255 pixels: divide by 255\)")
    _refused(served, np.full((1, 3, 32, 32), -0.5, np.float32), r"values must be in \[0, 1\]")


def test_an_empty_image_is_refused_with_the_contract_message(served):
    """[1, 3, 0, 0] raised deep inside interpolate before."""
    _refused(served, np.zeros((1, 3, 0, 0), np.float32), r"input contract: image height 0 px; this model takes sides of 8 to 1024 px")
    _refused(served, np.zeros((1, 3, 32, 5000), np.float32), r"image width 5000 px; this model takes sides of 8 to 1024")
    _refused(served, np.zeros((0, 3, 32, 32), np.float32), r"a batch of 0 images")


def test_integer_images_are_refused(served):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException):  # MLflow's own signature check (float32) or the contract's dtype rule
        served.model.predict(np.zeros((1, 3, 32, 32), np.uint8))
    from dfkd_assets.registry_model import InputContractError, check_input

    with pytest.raises(InputContractError, match="dtype uint8"):
        check_input(np.zeros((1, 3, 32, 32), np.uint8), {"max_batch": 4, "min_side": 8, "max_side": 64})


def test_inputs_within_the_contract_are_answered(served):
    served.forwards.clear()
    frame = served.model.predict(np.random.default_rng(0).random((32, 3, 8, 1024), dtype=np.float32))
    assert len(frame) == 32 and served.forwards == [(32, 3, 8, 1024)]
    from dfkd_assets.registry_model import DEFAULT_CONTRACT, check_input

    assert check_input(np.full((3, 32, 32), 0.5), DEFAULT_CONTRACT).shape == (1, 3, 32, 32)  # one image, no batch axis (a direct call)


def test_the_limits_live_in_the_model_and_are_stated(served, tmp_path):
    """MLmodel's model_config holds the limits (what serving enforces, no project settings needed), its
    metadata and the version's tag and card state them."""
    import mlflow.artifacts
    import yaml

    from dfkd_assets.registry_model import DEFAULT_CONTRACT

    reg = served.registry
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{reg.name}/{served.version}", dst_path=str(tmp_path)))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    config = mlmodel["flavors"]["python_function"]["config"]
    assert {k: config[k] for k in DEFAULT_CONTRACT} == DEFAULT_CONTRACT
    assert mlmodel["metadata"]["input_contract"]["max_batch"] == 32 and "HTTP 400" in mlmodel["metadata"]["input_contract"]["text"]
    mv = registry_client(served.cfg).get_model_version(reg.name, served.version)
    assert json.loads(mv.tags["input_contract"]) == DEFAULT_CONTRACT
    assert "1 <= N <= 32 and 8 <= H, W <= 1024" in mv.description


def test_a_served_model_enforces_the_limits_of_its_own_mlmodel(served, tmp_path):
    """The same files with max_batch 2 in model_config: 3 images are refused, 2 answered."""
    import mlflow.artifacts
    import mlflow.pyfunc
    import yaml

    reg = served.registry
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{reg.name}/{served.version}", dst_path=str(tmp_path)))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    mlmodel["flavors"]["python_function"]["config"].update(max_batch=2, min_side=16, max_side=40)
    (local / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    model = mlflow.pyfunc.load_model(str(local))
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="a batch of 3 images; this model takes 1 to 2"):
        model.predict(np.zeros((3, 3, 32, 32), np.float32))
    with pytest.raises(MlflowException, match="sides of 16 to 40"):
        model.predict(np.zeros((1, 3, 32, 41), np.float32))
    assert len(model.predict(np.zeros((2, 3, 32, 32), np.float32))) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_answers_bad_input_with_400_naming_the_limit(served, tmp_path):
    """`mlflow models serve --env-manager local` on 127.0.0.1: the issue's requests get HTTP 400 with
    the contract's message; a good request still gets 200."""
    import signal

    reg = served.registry
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": served.cfg.resolve(served.cfg.mlflow.tracking_uri),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{reg.name}/{served.version}",
                               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def post(body: str) -> tuple[int, str]:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body.encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    try:
        deadline = time.time() + 240
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5):
                    break
            except OSError:
                assert time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(1)
        tiny = json.dumps({"inputs": np.zeros((256, 3, 1, 1)).tolist()})
        assert len(tiny) < 8000  # the 7 KB body
        status, body = post(tiny)
        assert status == 400 and "a batch of 256 images; this model takes 1 to 32" in body, body
        nan = np.full((1, 3, 16, 16), 0.5)
        nan[0, 0, 0, 0] = np.nan
        status, body = post(json.dumps({"inputs": nan.tolist()}))
        assert status == 400 and "NaN or infinite" in body, body
        status, body = post(json.dumps({"inputs": (np.ones((1, 3, 16, 16)) * 200).tolist()}))
        assert status == 400 and "divide by 255" in body, body
        status, body = post(json.dumps({"inputs": [[[[]], [[]], [[]]]]}))  # [1, 3, 1, 0]
        assert status == 400 and "input contract: image height 1 px" in body, body
        status, body = post(json.dumps({"inputs": np.full((2, 3, 16, 16), 0.5).tolist()}))
        assert status == 200 and len(json.loads(body)["predictions"]) == 2, body
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        log.close()


def test_the_settings_defaults_are_the_contract_of_versions_logged_without_one():
    """serving.* has its one default in config.py; registry_model.DEFAULT_CONTRACT (what a version
    logged before contracts existed enforces) must say the same, and an inverted range is refused at load."""
    from dfkd_assets.config import DfkdConfig, ServingConfig
    from dfkd_assets.registry_model import DEFAULT_CONTRACT

    assert ServingConfig().model_dump() == DEFAULT_CONTRACT
    with pytest.raises(ValueError, match="serving.min_side"):
        DfkdConfig.model_validate({"classes": ["a", "b"], "generator": {"config_file": "x"}, "serving": {"min_side": 64, "max_side": 32}})
