"""Definition loading stays light, the layering rule holds, string selections parse (antlr4 guard)."""

import ast
import socket
import subprocess
import sys

import dagster as dg
import pytest

from conftest import ROOT, NetworkAccessError
from dfkd_assets.definitions import build_defs

ASSETS = {"teacher_head", "prompt_bank", "synthetic_images", "synthetic_round_images", "synthetic_dataset", "student_model", "student_head",
          "evaluation_report", "champion_student", "champion_onnx"}


def test_definitions_import_without_heavy_modules():
    code = (
        "import sys, dfkd_assets.definitions as d\n"
        "heavy = [m for m in ('torch', 'mlflow', 'open_clip', 'taming', 'dvc', 'timm') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"DFKD_CONFIG": str(ROOT / "configs" / "ci.yaml"), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "", f"heavy modules imported at definition load: {out.stdout}"


def _imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        yield from [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []


def test_core_never_imports_orchestration():
    """core/ (numerics), stages/ and artifacts.py (what compare and the assets share) stay free of
    Dagster, MLflow and DVC; core/ also never reaches up into the stages or the orchestration."""
    banned = {"dagster", "mlflow", "dvc"}
    pkg = ROOT / "dfkd_assets"
    for path in [*(pkg / "core").glob("*.py"), *(pkg / "stages").glob("*.py"), pkg / "artifacts.py"]:
        for n in _imports(path):
            assert n.split(".")[0] not in banned, f"{path.name} imports {n}"
    for path in (pkg / "core").glob("*.py"):
        for n in _imports(path):
            assert not n.startswith(("dfkd_assets.stages", "dfkd_assets.defs", "dfkd_assets.loaders", "dfkd_assets.artifacts",
                                     "dfkd_assets.config", "dfkd_assets.tools")), f"core/{path.name} imports {n}"


def test_library_never_imports_tools():
    """The tools (CLI, bench, compare, fleet, predict) sit on top of the library; nothing below them
    (config, core, stages, defs, the registry model, the worlds) imports them."""
    pkg = ROOT / "dfkd_assets"
    library = [p for p in pkg.rglob("*.py") if "tools" not in p.relative_to(pkg).parts]
    assert len(library) > 40  # the walk found the library
    for path in library:
        for n in _imports(path):
            assert not n.startswith("dfkd_assets.tools"), f"{path.relative_to(pkg)} imports {n}"


def test_graph_has_all_assets_and_class_partitions():
    defs = build_defs(ROOT / "configs" / "ci.yaml")
    graph = defs.resolve_asset_graph()
    assert {k.to_user_string() for k in graph.get_all_asset_keys()} == ASSETS
    part = graph.get(dg.AssetKey("synthetic_images")).partitions_def
    assert part.get_partition_keys() == ["dog", "elephant", "house"]
    assert graph.get(dg.AssetKey("student_model")).partitions_def is None
    rounds = graph.get(dg.AssetKey("synthetic_round_images")).partitions_def  # class x round (rounds: dynamic, added per retrain tick)
    assert isinstance(rounds, dg.MultiPartitionsDefinition) and rounds.partition_dimension_names == ["class", "round"]


def test_string_selection_parses():
    """dvc's hydra/omegaconf pin antlr4 4.9; Dagster's parser needs 4.13 (DEPENDENCIES.md #1)."""
    graph = build_defs(ROOT / "configs" / "ci.yaml").resolve_asset_graph()
    sel = dg.AssetSelection.from_string('key:"synthetic_dataset"+ or key:prompt_bank')
    assert {k.to_user_string() for k in sel.resolve(graph)} == {
        "synthetic_dataset", "student_model", "student_head", "evaluation_report", "champion_student", "champion_onnx", "prompt_bank"
    }


def test_network_guard_blocks_non_local_addresses():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with pytest.raises(NetworkAccessError):
            s.connect(("192.0.2.1", 80))  # refused before any packet leaves
    finally:
        s.close()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname(), timeout=5)  # localhost is fine
    client.close()
    server.close()


def test_paper_configs_validate_and_fewshot_adds_its_asset(tmp_path):
    from dfkd_assets.config import load_config
    from dfkd_assets.definitions import build_defs

    paper = load_config("configs/paper.yaml")
    assert (paper.teacher.model_name, paper.synthesis.image_size, paper.synthesis.iterations, paper.synthesis.cutn) == ("ViT-B-32", 224, 400, 32)
    assert paper.evaluation.datasets[0].preset == "pacs" and paper.fewshot.shots == [1, 5, 10]
    keys = {k.to_user_string() for k in build_defs("configs/paper-smoke.yaml").resolve_asset_graph().get_all_asset_keys()}
    assert "few_shot_report" in keys
    keys_ci = {k.to_user_string() for k in build_defs("configs/ci.yaml").resolve_asset_graph().get_all_asset_keys()}
    assert "few_shot_report" not in keys_ci and len(keys_ci) == 10  # eight pipeline assets (synthetic_round_images included) + student_head + champion_onnx


def test_paper_config_without_its_weight_files_names_them(tmp_path):
    import pytest

    from dfkd_assets.config import load_config
    from dfkd_assets.core.teacher import TeacherLoadError
    from dfkd_assets.core.vqgan import GeneratorLoadError
    from dfkd_assets.loaders import generator_for, teacher_for

    cfg = load_config("configs/paper.yaml", {"device": "cpu", "teacher": {"cache_dir": str(tmp_path)}})
    with pytest.raises(TeacherLoadError, match="timm/vit_base_patch32_clip_224.openai"):
        teacher_for(cfg, "cpu")
    with pytest.raises(GeneratorLoadError, match="generator.checkpoint storage/weights/vqgan_imagenet_f16_16384/last.ckpt not found"):
        generator_for(cfg, "cpu")


def test_operations_wiring_retries_runtime_checks_schedule_sensors():

    defs = build_defs(ROOT / "configs" / "ci.yaml")
    train = defs.resolve_job_def("distill_evaluate_promote")
    assert train.tags["dagster/max_runtime"] == str(24 * 3600)
    assert train.op_retry_policy is not None and train.op_retry_policy.max_retries == 2
    graph = defs.resolve_asset_graph()
    checks = {k.name: graph.get_check_spec(k) for k in graph.asset_check_keys}
    for name in ("shard_integrity", "teacher_agreement", "student_weights_finite", "not_worse_than_champion", "onnx_matches_pytorch"):
        assert checks[name].blocking, name
    assert defs.resolve_schedule_def("retrain").cron_schedule == "0 3 * * 1"
    assert {s.name for s in defs.sensors} == {"stale_partitions", "record_failures"}
    assert defs.resolve_job_def("rollback_champion") is not None
    add = defs.resolve_job_def("add_classes")  # classes added by name: re-head, then the same evaluation and promotion
    assert {k.to_user_string() for k in add.asset_layer.selected_asset_keys} == {"student_head", "evaluation_report", "champion_student", "champion_onnx"}
    train_keys = {k.to_user_string() for k in train.asset_layer.selected_asset_keys}  # student_head passes the distilled student through there
    assert ({"student_model", "student_head", "evaluation_report"} <= train_keys
            and "student_model" not in {k.to_user_string() for k in add.asset_layer.selected_asset_keys})
    assert defs.resolve_sensor_def("record_failures").sensor_type.name == "RUN_STATUS"


def test_assets_stay_thin_and_the_registry_names_live_in_one_module():
    """An asset loads, calls one stage, writes and attaches metadata (docs/ARCHITECTURE.md): no
    asset, check or op body over 40 lines; the registry's alias and tag names appear only in
    defs/registry.py, and compare.py defines no fingerprint or summary of its own."""
    import re

    defs_dir = ROOT / "dfkd_assets" / "defs"
    for path in defs_dir.glob("*.py"):
        functions = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)]
        for node in functions:
            if any(re.search(r"\b(asset|asset_check|op|multi_asset|gpu_asset)\b", ast.unparse(d)) for d in node.decorator_list):
                lines = node.body[-1].end_lineno - node.body[0].lineno + 1
                assert lines <= 40, f"{path.name}:{node.name} has a {lines}-line body"
    tagging = re.compile(r"\.(set_model_version_tag|set_registered_model_alias|delete_registered_model_alias|set_registered_model_tag)\(")
    for path in (ROOT / "dfkd_assets").rglob("*.py"):
        if path.name != "registry.py":
            assert not tagging.search(path.read_text()), f"{path.relative_to(ROOT)} sets a registry alias or tag (only defs/registry.py may)"
    compare = (ROOT / "dfkd_assets" / "tools" / "compare.py").read_text()
    assert "hashlib.sha256(json" not in compare and "markdown_table" not in compare and "def _synthesis_fingerprint" not in compare


@pytest.mark.parametrize("instance_yaml", ["dagster_home/dagster.yaml", "infra/dagster-postgres.yaml", "infra/k8s/dagster.yaml"])
def test_instance_files_validate_and_turn_off_the_sign_up_dialog(instance_yaml, tmp_path):
    """Every shipped instance file passes the installed Dagster's instance schema with `nux: enabled:
    false` (an unknown key would fail here), and the one-machine instance starts with the dialog off."""
    import shutil

    from dagster._core.instance.config import dagster_instance_config

    shutil.copy(ROOT / instance_yaml, tmp_path / "dagster.yaml")
    config, _ = dagster_instance_config(str(tmp_path))
    assert config["nux"] == {"enabled": False}
    if instance_yaml.startswith("dagster_home"):
        with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
            assert instance.nux_enabled is False and instance.telemetry_enabled is False
