"""PEFT ingestion on adapters produced by the real `peft` library, and table-driven refusals."""

import json
import pickle
import struct

import numpy as np
import pytest
import torch
from safetensors.numpy import save

from seqr_core import (InvalidArgumentError, LimitExceededError, NotFoundError, SeqrError, SharedARecipe,
                       generate_shared_a, parse_peft_adapter, read_safetensors, write_safetensors)

from ..malformed_uploads import CASES as MALFORMED
from ..malformed_uploads import raw_safetensors
from ..peft_factory import make_peft_adapter, read_dir, signature, tiny_llama


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def files(model, tmp_path_factory):
    return read_dir(make_peft_adapter(model, tmp_path_factory.mktemp("a"), seed=1,
                                      shared_a=SharedARecipe(seed=7)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_peft_adapter_parses_to_its_own_factors(model, tmp_path, dtype):
    path = make_peft_adapter(model, tmp_path, seed=3, dtype=dtype, alpha=12)
    parsed = parse_peft_adapter(read_dir(path), name="x", signature=signature(model))
    from safetensors.torch import load_file
    sd = load_file(str(path / "adapter_model.safetensors"))
    assert parsed.upload_dtype == {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[dtype]
    assert sorted(parsed.adapter.modules) == sorted(f"model.layers.{i}.self_attn.{p}"
                                                     for i in range(2) for p in ("q_proj", "v_proj"))
    for m, f in parsed.adapter.factors.items():
        A = sd[f"base_model.model.{m}.lora_A.weight"].float().numpy()
        B = sd[f"base_model.model.{m}.lora_B.weight"].float().numpy()
        np.testing.assert_array_equal(f.A, A)
        np.testing.assert_array_equal(f.B, B)
        assert f.scale == pytest.approx(12 / 4)


def test_rslora_scale_is_alpha_over_sqrt_r(model, tmp_path):
    path = make_peft_adapter(model, tmp_path, seed=2, alpha=8, rank=4, use_rslora=True)
    parsed = parse_peft_adapter(read_dir(path), name="rs", signature=signature(model))
    assert all(f.scale == pytest.approx(8 / 2) for f in parsed.adapter.factors.values())


def test_shared_a_adapter_carries_the_generated_a(files, model):
    parsed = parse_peft_adapter(files, name="s", signature=signature(model))
    for m, f in parsed.adapter.factors.items():
        np.testing.assert_array_equal(f.A, generate_shared_a(SharedARecipe(seed=7), module=m,
                                                             rank=4, d_in=f.A.shape[1]))


def _with_weights(files, mutate):
    tensors, _ = read_safetensors(files["adapter_model.safetensors"])
    mutate(tensors)
    return {**files, "adapter_model.safetensors": write_safetensors(tensors)}


def _first(tensors, part):
    return next(k for k in sorted(tensors) if part in k)


def _nan(t):
    k = _first(t, "lora_B")
    t[k] = t[k].copy()
    t[k][0, 0] = np.nan


def _inf(t):
    k = _first(t, "lora_A")
    t[k] = t[k].copy()
    t[k][0, 0] = np.inf


REFUSALS = [
    ("raw pickle", lambda f, m: {**f, "adapter_model.safetensors": pickle.dumps({"a": 1})},
     InvalidArgumentError, "adapter_model.safetensors", "pickle"),
    ("protocol 2 pickle", lambda f, m: {**f, "adapter_model.safetensors": pickle.dumps({"a": 1}, protocol=2)},
     InvalidArgumentError, "adapter_model.safetensors", "pickle"),
    ("header not an object", lambda f, m: {**f, "adapter_model.safetensors": raw_safetensors(b" [1, 2]")},
     InvalidArgumentError, "adapter_model.safetensors", "followed by a JSON object"),
    ("torch .bin archive", lambda f, m: {**f, "adapter_model.safetensors": b"PK\x03\x04" + b"\0" * 64},
     InvalidArgumentError, "adapter_model.safetensors", "zip"),
    ("pickle file beside", lambda f, m: {**f, "adapter_model.bin": b"\x80\x04"},
     InvalidArgumentError, "files", "unexpected"),
    ("missing config", lambda f, m: {k: v for k, v in f.items() if k != "adapter_config.json"},
     InvalidArgumentError, "files.adapter_config.json", "missing"),
    ("NaN in B", lambda f, m: _with_weights(f, _nan), InvalidArgumentError, "adapter_model.safetensors[model.layers.0", "non-finite"),
    ("Inf in A", lambda f, m: _with_weights(f, _inf), InvalidArgumentError, "adapter_model.safetensors[model.layers.0", "non-finite"),
    ("wrong B shape", lambda f, m: _with_weights(f, lambda t: t.__setitem__(_first(t, "lora_B"), np.ones((5, 4), np.float32))),
     InvalidArgumentError, "adapter.model.layers", "base model mismatch"),
    ("rank mismatch", lambda f, m: {**f, "adapter_config.json": json.dumps({**json.loads(f["adapter_config.json"]), "r": 8}).encode()},
     InvalidArgumentError, "adapter_model.safetensors[", "rank mismatch"),
    ("wrong base model", lambda f, m: read_dir(make_peft_adapter(tiny_llama(hidden=48), m, seed=0)),
     InvalidArgumentError, "adapter.model.layers", "base model mismatch"),
    ("unknown module", lambda f, m: _with_weights(f, lambda t: t.update({
        "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": np.ones((4, 32), np.float32),
        "base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight": np.ones((32, 4), np.float32)})),
     NotFoundError, "adapter.model.layers.9", "not in the base-model signature"),
    ("bias tensor", lambda f, m: _with_weights(f, lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.bias": np.ones(4, np.float32)})),
     InvalidArgumentError, "adapter_model.safetensors", "not a LoRA"),
    ("truncated weights", lambda f, m: {**f, "adapter_model.safetensors": f["adapter_model.safetensors"][:-7]},
     InvalidArgumentError, "adapter_model.safetensors", "not fully covered"),
    ("huge header", lambda f, m: {**f, "adapter_model.safetensors": struct.pack("<Q", (16 << 20) + 8) + b" " * ((16 << 20) + 8)},
     LimitExceededError, "adapter_model.safetensors", "header too large"),
    ("text file", lambda f, m: {**f, "adapter_model.safetensors": b"this is not a tensor file at all\n"},
     InvalidArgumentError, "adapter_model.safetensors", "not safetensors"),
    ("DoRA", lambda f, m: {**f, "adapter_config.json": json.dumps({**json.loads(f["adapter_config.json"]), "use_dora": True}).encode()},
     InvalidArgumentError, "adapter_config.json.use_dora", "DoRA"),
    ("config not JSON", lambda f, m: {**f, "adapter_config.json": b"\x00garbage"},
     InvalidArgumentError, "adapter_config.json", "JSON"),
]


@pytest.mark.parametrize("what, mutate, error, field, text", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_bad_adapter_is_refused_with_a_clear_message(files, model, tmp_path, what, mutate, error, field, text):
    with pytest.raises(error) as ei:
        parse_peft_adapter(mutate(files, tmp_path), name="bad", signature=signature(model))
    assert ei.value.field.startswith(field), ei.value
    assert text in str(ei.value)


@pytest.mark.parametrize("case, mutate, code, field", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_upload_is_refused_naming_the_field(files, model, case, mutate, code, field):
    with pytest.raises(SeqrError) as ei:
        parse_peft_adapter(mutate(files), name="bad", signature=signature(model))
    assert ei.value.code == code, ei.value
    assert ei.value.field == field, ei.value


def _lora_tensors(rng) -> dict[str, np.ndarray]:
    m = "base_model.model.model.layers.0.self_attn"
    return {f"{m}.q_proj.lora_A.weight": rng.standard_normal((4, 32)).astype(np.float32),
            f"{m}.q_proj.lora_B.weight": rng.standard_normal((32, 4)).astype(np.float32)}


def _with_header_length_residue(tensors, residue: int) -> tuple[bytes, bool]:
    """A file the `safetensors` package wrote, with header length = ``residue`` (mod 256).

    The package pads its header with spaces to a multiple of 8, so it reaches the 32 aligned
    residues itself; the others keep its header and drop some of that padding (the format
    allows any trailing whitespace). Returns (bytes, written by the package untouched).
    """
    for k in range(512):
        data = save(tensors, metadata={"pad": "x" * k})
        (hlen,) = struct.unpack("<Q", data[:8])
        header, body = data[8:8 + hlen], data[8 + hlen:]
        for n in (hlen, *range(len(header.rstrip(b" ")), hlen)):
            if n % 256 == residue:
                return struct.pack("<Q", n) + header[:n] + body, n == hlen
    raise AssertionError(f"no file with header length {residue} mod 256")


def test_every_header_length_residue_parses(files, model):
    # The header length's low byte is the file's first byte: 0x80 (a pickle's first byte) is
    # as valid as any other.
    tensors = _lora_tensors(np.random.default_rng(0))
    untouched = 0
    for residue in range(256):
        data, as_written = _with_header_length_residue(tensors, residue)
        assert data[0] == residue
        untouched += as_written
        got, dtype = read_safetensors(data)
        assert dtype == "F32" and sorted(got) == sorted(tensors)
        for k, a in tensors.items():
            np.testing.assert_array_equal(got[k], a)
        parsed = parse_peft_adapter({**files, "adapter_model.safetensors": data}, name=f"r{residue}")
        assert parsed.adapter.modules == ("model.layers.0.self_attn.q_proj",)
    assert untouched == 32


def test_written_safetensors_read_back_whatever_the_header_length():
    rng = np.random.default_rng(1)
    seen = set()
    for n in range(300):
        tensors = {f"m{'x' * n}.lora_A.weight": rng.standard_normal((2, 3)).astype(np.float32),
                   "m.lora_B.weight": rng.standard_normal((3, 2)).astype(np.float16)}
        data = write_safetensors(tensors)
        seen.add(data[0])
        got, _ = read_safetensors(data)
        assert sorted(got) == sorted(tensors)
        for k, a in tensors.items():
            np.testing.assert_array_equal(got[k], a.astype(np.float32))
    assert seen == set(range(0, 256, 8))


def test_header_with_leading_whitespace_still_parses():
    # The old reader (json.loads) and the package accept it; stored files may have it.
    data = save(_lora_tensors(np.random.default_rng(2)))
    (hlen,) = struct.unpack("<Q", data[:8])
    header = b"\n \t" + data[8:8 + hlen]
    got, _ = read_safetensors(struct.pack("<Q", len(header)) + header + data[8 + hlen:])
    assert sorted(got) == sorted(_lora_tensors(np.random.default_rng(2)))


def test_bf16_is_widened_exactly():
    bits = np.array([0x3F80, 0xC000, 0x0001, 0x7F7F], dtype="<u2")     # 1, -2, tiny, max
    body = bits.tobytes()
    data = raw_safetensors({"x": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, len(body)]}}, body)
    got, dtype = read_safetensors(data)
    assert dtype == "BF16"
    np.testing.assert_array_equal(got["x"].view(np.uint32).ravel(), bits.astype(np.uint32) << 16)
