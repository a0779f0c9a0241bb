"""The code stays readable: ruff's lint rules and formatter (configured in pyproject.toml, lines of
at most 100 characters) pass on every Python file."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUFF = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")


@pytest.mark.skipif(RUFF is None, reason="ruff not installed (test extra)")
@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(command):
    result = subprocess.run([RUFF, *command, "."], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


DOCUMENTED = ["thighseg/pipeline", "client", "thighseg/serving", "dicom_listener"]


def test_every_public_function_of_pipeline_inference_and_listener_says_why():
    import ast

    missing = []
    for folder in DOCUMENTED:
        for path in sorted((REPO / folder).glob("*.py")):
            tree = ast.parse(path.read_text())
            nodes = [(node, "") for node in tree.body]
            while nodes:
                node, prefix = nodes.pop()
                if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                    nodes += [(child, f"{node.name}.") for child in node.body]
                elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    public = not node.name.startswith("_")
                    if public and ast.get_docstring(node) is None:
                        missing.append(
                            f"{path.relative_to(REPO)}:{node.lineno} {prefix}{node.name}"
                        )
    assert not missing, "\n".join(missing)
