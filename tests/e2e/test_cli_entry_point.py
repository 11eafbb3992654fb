"""Every `seqr` sub-command through the installed entry point (.venv/bin/seqr, a subprocess):
its --help, and one real invocation against a real server (serve: test_cli.py runs it as a
process; demo trains for half an hour, so only its help runs here)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from seqr_cli.main import build_parser

from .conftest import LIB, RANK, SEED, activations

SEQR = str(Path(sys.executable).with_name("seqr"))
ROOT = Path(__file__).resolve().parents[2]
HELP_ONLY = {("demo",): "trains SmolLM2 adapters (~30 min)", ("serve",): "test_cli.py runs `seqr serve`",
             ("host",): "test_openai_host.py runs `seqr host` through the entry point with a model"}


def leaf_commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(command path, parser) of every runnable sub-command."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix, parser
        return
    for name, sub in subs[0].choices.items():
        yield from leaf_commands(sub, prefix + (name,))


COMMANDS = dict(leaf_commands(build_parser()))


def seqr(*args: str, env: dict | None = None, check: bool = True, cwd=None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SEQR_")}
    out = subprocess.run([SEQR, *args], capture_output=True, text=True, timeout=300, cwd=cwd,
                         env={**clean, "SEQR_CACHE_DIR": os.environ.get("SEQR_CACHE_DIR", ""), **(env or {})})
    if check:
        assert out.returncode == 0, f"seqr {' '.join(args)}\n{out.stdout}\n{out.stderr}"
    return out


def shown_defaults(parser: argparse.ArgumentParser) -> int:
    """Options whose help must show a default (one that is not None or False)."""
    return sum(1 for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS
               and a.default not in (None, False, argparse.SUPPRESS, []) and not isinstance(a, argparse._HelpAction))


def test_every_subcommand_answers_help_with_its_defaults():
    with ThreadPoolExecutor(4) as pool:
        outs = dict(zip(COMMANDS, pool.map(lambda c: seqr(*c, "--help", check=False), COMMANDS)))
    assert len(COMMANDS) >= 22          # the walker found the whole tree
    for cmd, out in outs.items():
        assert out.returncode == 0, (cmd, out.stderr)
        assert out.stdout.startswith(f"usage: seqr {' '.join(cmd)}"), (cmd, out.stdout[:200])
        assert out.stdout.count("(default:") >= shown_defaults(COMMANDS[cmd]), (cmd, out.stdout)
    assert "(default: 3)" in outs[("route",)].stdout and "--shared-a-seed" in outs[("train",)].stdout


@pytest.mark.parametrize("env,args,line", [
    ({"SEQR_TIMEOUT": "abc"}, ["health"], "seqr: SEQR_TIMEOUT: expected a number, got 'abc'"),
    ({"SEQR_WORKERS": "abc"}, ["serve"], "seqr: SEQR_WORKERS: expected an integer, got 'abc'"),
    ({"SEQR_WORKERS": "0"}, ["serve"], "seqr: SEQR_WORKERS: expected an integer >= 1, got '0'"),
    ({"SEQR_METRICS_PORT": "70000"}, ["serve"],
     "seqr: SEQR_METRICS_PORT: expected a port number (0-65535) or 'off', got '70000'"),
    ({"SEQR_INSECURE_OPEN": "maybe"}, ["serve", "--data-dir", "/nonexistent/x"],
     "seqr: SEQR_INSECURE_OPEN: expected a boolean (1/0, true/false, yes/no, on/off), got 'maybe'"),
    ({}, ["route", "--library", "x", "--top-k", "two"], "argument --top-k: expected an integer, got 'two'"),
], ids=["timeout", "workers", "workers-zero", "metrics-port", "insecure-open", "flag"])
def test_a_value_that_does_not_parse_is_one_line_naming_it(env, args, line):
    out = seqr(*args, env=env, check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert line in out.stderr.splitlines()[-1], out.stderr


def test_client_commands_need_a_library_named(tmp_path):
    out = seqr("describe", "--target", "127.0.0.1:9", check=False)
    assert out.returncode == 2 and "--library" in out.stderr and "demo" not in out.stderr
    out = seqr("describe", "--target", "127.0.0.1:9", "--timeout", "0.5", env={"SEQR_LIBRARY": "x"}, check=False)
    assert out.returncode == 1 and "UNAVAILABLE" in out.stderr     # it got as far as calling


def test_the_readme_lists_every_environment_variable():
    readme = (ROOT / "README.md").read_text()
    used = set()
    for folder in ("server", "client", "cli", "eval", "seqr_core"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            used |= set(re.findall(r"[\"'](SEQR_[A-Z][A-Z0-9_]*)[\"']", text))     # os.environ.get("SEQR_X")
            used |= {f"SEQR_{n}" for n in re.findall(r'\benv\("([A-Z][A-Z0-9_]*)"', text)}
    assert {"SEQR_TIMEOUT", "SEQR_CLIENT_CERT", "SEQR_WORKERS", "SEQR_LIBRARY"} <= used
    missing = sorted(v for v in used if v not in readme)
    assert not missing, f"README.md does not mention {missing}"


def test_every_subcommand_runs_through_the_entry_point(world, start_server, tmp_path):
    (tmp_path / "srv").mkdir()
    h = start_server(tmp_path / "srv" / "data")
    conn = ["--target", h.target]
    lib = [*conn, "--library", LIB]
    ran: set[tuple[str, ...]] = set()

    def run(*args: str, **kw) -> subprocess.CompletedProcess:
        cmd = next(c for c in sorted(COMMANDS, key=len, reverse=True) if tuple(args[: len(c)]) == c)
        ran.add(cmd)
        return seqr(*args, **kw)

    (tmp_path / "config.json").write_text(json.dumps(world.model.config.to_dict()))
    run("keys", "init", str(tmp_path / "kek.json"))
    token = run("tokens", "new", "--file", str(tmp_path / "tokens.json"), "--name", "n", "--role", "route")
    assert token.stdout.startswith("seqr_")
    assert "SERVING" in run("health", *conn).stdout
    made = run("libraries", "create", LIB, "--hf-config", str(tmp_path / "config.json"), "--shared-a-seed",
               str(SEED), "--rank", str(RANK), "--target-modules", "q_proj", "v_proj", *conn)
    assert f"{len(world.qv)} with a shared A" in made.stdout
    assert LIB in run("libraries", "ls", *conn).stdout
    run("libraries", "shared-a", *lib, "--out", str(tmp_path / "A"))
    assert json.loads((tmp_path / "A" / "shared_a.json").read_text())["rank"] == RANK
    put = json.loads(run("adapters", "put", *[str(world.adapters[n]) for n in world.shared_names], *lib,
                         "--json").stdout)
    assert [a["kind"] for a in put] == ["shared_a"] * len(world.shared_names)
    again = json.loads(run("adapters", "put", str(world.adapters["shared-a1"]), "--name", "shared-a0",
                           "--replace", *lib, "--json").stdout)
    assert (again[0]["adapter_id"], again[0]["version"]) == (put[0]["adapter_id"], 2)
    assert "\tshared-a0\tv2\tshared_a" in run("adapters", "ls", *lib).stdout
    np.savez(tmp_path / "x.npz", **activations(world))
    assert "calibrated 3 adapters" in run("calibrate", str(tmp_path / "x.npz"), *lib).stdout
    routed = json.loads(run("route", str(tmp_path / "x.npz"), *lib, "--json").stdout)
    assert routed["choices"][0]["name"] in world.shared_names
    assert "margin=" in run("route", "--random", "4", *lib).stdout
    assert f"{LIB} v" in run("describe", *lib).stdout
    ack = "--i-understand-plaintext"
    out = run("export", "onnx", str(tmp_path / "m.onnx"), "--library", LIB, *conn, ack)
    assert (tmp_path / "m.onnx").stat().st_size > 1000 and "from " + h.target in out.stderr
    run("export", "triton", str(tmp_path / "repo"), "--library", LIB, *conn, ack, "--instance-kind", "cpu")
    assert (tmp_path / "repo" / "seqr_scorer" / "config.pbtxt").is_file()
    assert "deleted shared-f16" in run("adapters", "rm", "shared-f16", *lib).stdout
    data, kek = str(tmp_path / "srv" / "data"), str(tmp_path / "srv" / "dev.kek")
    assert "OK:" in run("audit", "verify", str(tmp_path / "srv" / "data.audit.log")).stdout
    run("backup", str(tmp_path / "b.tar"), "--data-dir", data)
    h.stop(grace=1.0)
    shutil.copy(kek, tmp_path / "kek2.json")
    offline = ["--data-dir", str(tmp_path / "r" / "data"), "--key-file", str(tmp_path / "kek2.json")]
    run("restore", str(tmp_path / "b.tar"), *offline)
    assert json.loads(run("keys", "ls", *offline).stdout)["key_ids"]
    run("export", "onnx", str(tmp_path / "m2.onnx"), "--library", LIB, *offline, ack)
    assert json.loads(run("keys", "rotate", *offline).stdout)["added_key_id"]
    left = set(COMMANDS) - ran - set(HELP_ONLY) - {("train",)}
    assert not left, f"not invoked: {sorted(left)}"
