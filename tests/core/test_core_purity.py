"""seqr_core stays pure numerics: no gRPC, no file or network I/O; torch/onnx only in the
exporter (onnx_export and the graph builder it uses, onnx_graph)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "seqr_core"
FORBIDDEN = {"grpc", "socket", "os", "io", "pathlib", "subprocess", "urllib", "http", "requests",
             "shutil", "tempfile", "pickle", "seqr_server", "seqr_client", "seqr_router"}
EXPORT_ONLY = {"torch", "onnx", "onnxruntime", "onnxscript"}
EXPORTERS = {"onnx_export.py", "onnx_graph.py"}


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module.split(".")[0]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "open":
            yield "open()"


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_core_module_does_no_io_and_no_grpc(path):
    found = set(_imports(path))
    bad = found & (FORBIDDEN | {"open()"})
    if path.name not in EXPORTERS:
        bad |= found & EXPORT_ONLY
    assert not bad, f"{path.name} imports {sorted(bad)}"


def test_importing_the_core_loads_no_torch_or_grpc():
    code = ("import sys, seqr_core; bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'torch', 'onnx', 'onnxruntime', 'grpc'}); print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
