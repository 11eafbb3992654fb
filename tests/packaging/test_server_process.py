"""`seqr serve` as a real process loads only the server: no torch, transformers, peft, matplotlib,
no seqr_client and no seqr_eval (-X importtime lists every module the process imported)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

from seqr_client import RouterClient

FORBIDDEN = ("torch", "transformers", "peft", "matplotlib", "tqdm", "seqr_client", "seqr_eval", "onnx", "pytest")


def test_seqr_serve_imports_no_model_stack_and_no_client(tmp_path):
    cmd = [sys.executable, "-X", "importtime", "-m", "seqr_cli", "serve", "--listen", "127.0.0.1:0",
           "--metrics-port", "off", "--data-dir", str(tmp_path / "data")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    modules, port = set(), None
    try:
        for line in proc.stderr:
            if line.startswith("import time:"):
                modules.add(line.rsplit("|", 1)[1].strip())
                continue
            doc = json.loads(line)
            port = doc.get("port", port)
            if doc["msg"] == "serving":
                break
        assert port
        with RouterClient(f"127.0.0.1:{port}") as c:
            assert c.health() == "SERVING"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "seqr_server.app" in modules and "grpc" in modules
    loaded = sorted(m for m in modules if m.split(".")[0] in FORBIDDEN)
    assert not loaded, loaded
