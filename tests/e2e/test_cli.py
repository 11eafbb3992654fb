"""The `seqr` command line against a real server, and `seqr serve` as a real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from seqr_client import RouterClient
from seqr_cli.main import build_parser, main

from .conftest import LIB, activations, create_library

SEQR = str(Path(sys.executable).with_name("seqr"))
COMMANDS = [["serve"], ["keys", "init"], ["tokens", "new"], ["libraries", "create"], ["libraries", "ls"],
            ["adapters", "put"], ["adapters", "ls"], ["adapters", "rm"], ["route"], ["describe"],
            ["calibrate"], ["health"], ["export", "onnx"], ["keys", "rotate"], ["keys", "ls"], ["backup"],
            ["restore"], ["audit", "verify"], ["host"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=" ".join)
def test_every_command_explains_itself(cmd, capsys):
    with pytest.raises(SystemExit) as ei:
        build_parser().parse_args([*cmd, "--help"])
    assert ei.value.code == 0
    assert len(capsys.readouterr().out) > 200


def test_serve_help_names_the_environment_variables(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for var in ("SEQR_LISTEN", "SEQR_DATA_DIR", "SEQR_METRICS_PORT", "SEQR_TOKENS_FILE", "SEQR_KEY_FILE"):
        assert var in out


def test_admin_and_route_commands_work_against_a_server(world, start_server, tmp_path, capsys):
    h = start_server(tmp_path / "d")
    with RouterClient(h.target) as c:
        create_library(c, world)
    conn = ["--target", h.target, "--library", LIB]
    dirs = [str(world.adapters[n]) for n in world.shared_names]
    assert main(["adapters", "put", *dirs, *conn, "--json"]) == 0
    put = json.loads(capsys.readouterr().out)
    assert [a["name"] for a in put] == list(world.shared_names)
    np.savez(tmp_path / "x.npz", **activations(world))
    assert main(["route", str(tmp_path / "x.npz"), *conn, "--json", "--top-k", "2"]) == 0
    routed = json.loads(capsys.readouterr().out)
    with RouterClient(h.target) as c:
        want = c.route(LIB, activations(world), top_k=2)
    assert [ch["name"] for ch in routed["choices"]] == [ch.name for ch in want.choices]
    assert main(["calibrate", str(tmp_path / "x.npz"), *conn]) == 0
    assert "calibrated 3 adapters on 1 sequences" in capsys.readouterr().out
    assert main(["adapters", "rm", world.shared_names[0], *conn]) == 0
    assert f"deleted {world.shared_names[0]} (id 0)" in capsys.readouterr().out
    assert main(["adapters", "ls", *conn]) == 0
    listed = capsys.readouterr().out
    assert world.shared_names[0] not in listed and world.shared_names[1] in listed
    assert main(["describe", *conn]) == 0
    assert f"{LIB} v" in capsys.readouterr().out
    assert main(["describe", "--target", h.target, "--library", "nope"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_keys_init_and_tokens_new_write_private_files(tmp_path, capsys):
    assert main(["keys", "init", str(tmp_path / "kek.json")]) == 0
    assert oct((tmp_path / "kek.json").stat().st_mode & 0o777) == "0o600"
    assert "key id" in capsys.readouterr().out
    assert main(["tokens", "new", "--file", str(tmp_path / "t.json"), "--name", "h", "--role", "route",
                 "--adapters", "team-a-*"]) == 0
    token = capsys.readouterr().out.strip()
    doc = json.loads((tmp_path / "t.json").read_text())
    assert token.startswith("seqr_") and token not in (tmp_path / "t.json").read_text()
    assert doc["tokens"][0]["adapters"] == ["team-a-*"]
    assert oct((tmp_path / "t.json").stat().st_mode & 0o777) == "0o600"


def test_plain_seqr_serve_works_on_a_fresh_directory_and_stops_on_sigterm(tmp_path):
    env = {**os.environ, "SEQR_LISTEN": "127.0.0.1:0", "SEQR_METRICS_PORT": "off"}
    proc = subprocess.Popen([SEQR, "serve"], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    try:
        port, lines = None, []
        for line in proc.stderr:
            lines.append(line)
            doc = json.loads(line)
            port = doc.get("port", port)
            if doc["msg"] == "serving":
                break
        assert port, "".join(lines)
        joined = "".join(lines)
        assert "DEVELOPMENT KEY" in joined and "NO TOKENS FILE" in joined
        with RouterClient(f"127.0.0.1:{port}") as c:
            info = c.describe("demo")
            assert len(info.adapters) == 4
            assert c.route("demo", {m.name: np.ones((3, m.d_in), np.float32)
                                    for m in info.modules if m.shared_rank}).choices
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (tmp_path / "data").is_dir() and (tmp_path / "dev.kek").is_file()


def test_routing_an_empty_library_says_it_has_no_adapters(world, start_server, tmp_path, capsys):
    h = start_server(tmp_path / "d")
    (tmp_path / "config.json").write_text(json.dumps(world.model.config.to_dict()))
    conn = ["--target", h.target]
    # The old spelling of --target-modules still works, and says it is deprecated.
    assert main(["libraries", "create", LIB, "--hf-config", str(tmp_path / "config.json"), "--shared-a-seed", "1",
                 "--targets", "q_proj", *conn]) == 0
    out = capsys.readouterr()
    assert "--targets is deprecated" in out.err and f"{len(world.qv) // 2} with a shared A" in out.out
    assert main(["route", "--random", "4", "--library", LIB, *conn]) == 1
    err = capsys.readouterr().err
    assert f"library '{LIB}' has no adapters" in err and "FAILED_PRECONDITION" in err


def test_export_through_the_server_takes_only_what_the_rpc_carries(world, populated, tmp_path, capsys):
    h, _ = populated
    base = ["export", "onnx", str(tmp_path / "m.onnx"), "--library", LIB, "--target", h.target,
            "--i-understand-plaintext"]
    assert main([*base, "--top-k", "3", "--opset", "17"]) == 2
    assert "--top-k, --opset not available through the ExportScorer RPC" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
    assert main([*base, "--tokens", "12"]) == 0
    import onnx
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert {p.key: p.value for p in model.metadata_props}["seqr.library"] == LIB
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][1] == 12   # --tokens got there
    with pytest.raises(SystemExit) as ei:       # the client's error, one line
        main(["export", "onnx", str(tmp_path / "n.onnx"), "--library", "nope", "--target", h.target,
              "--i-understand-plaintext"])
    assert str(ei.value).startswith("export failed: NOT_FOUND")
