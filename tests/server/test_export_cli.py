"""`seqr export onnx|triton`: refuses without the plaintext acknowledgement, writes 0600 files."""

from __future__ import annotations

import argparse
import stat

import numpy as np
import onnxruntime as ort
import pytest

from seqr_server.export_cli import ACK_FLAG, REFUSAL, add_export_parser
from tests.core.libraries import random_library


@pytest.fixture()
def cli():
    idx = random_library(np.random.default_rng(21), n_adapters=4, n_modules=2, d=8, r=2)
    loads = []

    def load(args):
        loads.append(args.library)
        return idx
    parser = argparse.ArgumentParser(prog="seqr")
    add_export_parser(parser.add_subparsers(dest="command", required=True), load_library=load)
    return parser, idx, loads


def main(parser, argv) -> int:
    args = parser.parse_args(argv)
    return args.func(args)


def test_refuses_without_the_flag_and_loads_nothing(cli, tmp_path, capsys):
    parser, _, loads = cli
    for argv in (["export", "onnx", str(tmp_path / "m.onnx"), "--library", "lib"],
                 ["export", "triton", str(tmp_path / "repo"), "--library", "lib"]):
        assert main(parser, argv) == 2
        assert REFUSAL in capsys.readouterr().err
    assert loads == [] and list(tmp_path.iterdir()) == []


def test_onnx_export_writes_a_private_model_and_never_overwrites(cli, tmp_path, capsys):
    parser, idx, loads = cli
    out = tmp_path / "m.onnx"
    argv = ["export", "onnx", str(out), "--library", "lib", ACK_FLAG, "--top-k", "2",
            "--normalisation", "none", "--no-per-token"]
    assert main(parser, argv) == 0 and loads == ["lib"]
    assert "PLAINTEXT" in capsys.readouterr().err
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    sess = ort.InferenceSession(out.read_bytes(), providers=["CPUExecutionProvider"])
    md = sess.get_modelmeta().custom_metadata_map
    assert md["seqr.library"] == idx.name and md["seqr.top_k"] == "2" and md["seqr.per_token"] == "false"
    assert main(parser, argv) == 1 and "exists" in capsys.readouterr().err
    assert main(parser, argv + ["--force"]) == 0


def test_triton_repository_layout_and_config(cli, tmp_path):
    parser, idx, _ = cli
    m0 = idx.signature.names[0]
    assert main(parser, ["export", "triton", str(tmp_path / "repo"), "--library", "lib", ACK_FLAG,
                         "--model-name", "router", "--max-batch-size", "16", "--module", m0,
                         "--input-dtype", "float16"]) == 0
    root = tmp_path / "repo" / "router"
    assert (root / "1" / "model.onnx").is_file()
    cfg = (root / "config.pbtxt").read_text()
    for needle in ('name: "router"', 'backend: "onnxruntime"', "max_batch_size: 16",
                   "dynamic_batching", "KIND_GPU", f'name: "{m0}:activations" data_type: TYPE_FP16 dims: [ -1, 8 ]',
                   f'name: "candidate_mask" data_type: TYPE_BOOL dims: [ {len(idx.adapters)} ]',
                   f'name: "scores" data_type: TYPE_FP32 dims: [ {len(idx.adapters)} ]',
                   'name: "topk_adapter_ids" data_type: TYPE_INT64 dims: [ 1 ]'):
        assert needle in cfg, needle
    assert stat.S_IMODE((root / "1" / "model.onnx").stat().st_mode) == 0o600


def test_bad_options_are_usage_errors(cli, tmp_path, capsys):
    parser, _, _ = cli
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "onnx", "x", "--library", "l", "--normalisation", "zscore/bad"])
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "onnx", "x", "--library", "l", "--module-form", "noequals"])
    assert main(parser, ["export", "onnx", str(tmp_path / "m.onnx"), "--library", "l", ACK_FLAG,
                         "--normalisation", "activation"]) == 1
    assert "uncalibrated" in capsys.readouterr().err
