"""The layers stay visible: every module imports only from layers below its own (or from its own
package), function-level imports included. The order is the README's "Layout" table."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# (package, folder), bottom to top; packages on one rank may not import each other.
LAYERS: list[list[tuple[str, str]]] = [
    [("thighseg.core", "thighseg/core")],
    [("thighseg.measure", "thighseg/measure")],
    [("thighseg.synthetic", "thighseg/synthetic")],
    [("thighseg.learning", "thighseg/learning")],
    [("thighseg.export", "export")],
    [("thighseg.client", "client"), ("thighseg.serving", "thighseg/serving")],
    [("thighseg.pipeline", "thighseg/pipeline")],
    [("thighseg.dicom_listener", "dicom_listener")],
    [("thighseg.apps", "thighseg/apps")],
    [("thighseg.cli", "thighseg/cli.py")],
]
RANK = {package: rank for rank, layer in enumerate(LAYERS) for package, _ in layer}


def _package_of(module: str) -> str | None:
    """The layer package a dotted module name belongs to (None: the root's __version__)."""
    matches = [p for p in RANK if module == p or module.startswith(p + ".")]
    return max(matches, key=len) if matches else None


def _modules() -> list[tuple[str, Path]]:
    found = []
    for package, folder in (entry for layer in LAYERS for entry in layer):
        path = REPO / folder
        files = [path] if path.suffix == ".py" else sorted(path.rglob("*.py"))
        found += [(package, f) for f in files]
    return found


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "thighseg":
                out += [(node.lineno, f"thighseg.{alias.name}") for alias in node.names]
            elif node.module.startswith("thighseg."):
                out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [
                (node.lineno, alias.name)
                for alias in node.names
                if alias.name.startswith("thighseg.")
            ]
    return out


def test_every_source_file_belongs_to_a_layer():
    covered = {path for _, path in _modules()}
    sources = {
        p
        for folder in ("thighseg", "client", "export", "dicom_listener")
        for p in (REPO / folder).rglob("*.py")
    }
    stray = sorted(
        str(p.relative_to(REPO)) for p in sources - covered if p != REPO / "thighseg/__init__.py"
    )
    assert not stray, f"modules outside every layer: {stray}"


@pytest.mark.parametrize(
    "package,path", _modules(), ids=lambda v: str(v).replace(str(REPO) + "/", "")
)
def test_no_upward_or_sideways_import(package, path):
    bad = []
    for line, module in _imports(path):
        target = _package_of(module)
        if target is None or target == package:
            continue
        if RANK[target] >= RANK[package]:
            bad.append(
                f"{path.relative_to(REPO)}:{line} imports {module} (layer {RANK[target]} >= "
                f"{RANK[package]})"
            )
    assert not bad, "\n".join(bad)


def test_the_check_catches_an_upward_import(tmp_path):
    module = tmp_path / "probe.py"
    module.write_text("def f():\n    from thighseg.apps.demo import run_demo\n")
    assert [m for _, m in _imports(module)] == ["thighseg.apps.demo"]
    assert RANK[_package_of("thighseg.apps.demo")] > RANK["thighseg.pipeline"]


def test_the_runtime_imports_no_torch():
    """The listener, the pipeline, batch mode and the CLI run where only the runtime is
    installed."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for name in ('torch', 'segmentation_models_pytorch', 'onnx'): sys.modules[name] = None\n"
        "import thighseg.cli, thighseg.dicom_listener.service, thighseg.pipeline.stages, "
        "thighseg.apps.batch\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
