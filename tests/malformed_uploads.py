"""Malformed PEFT uploads that once escaped as INTERNAL (issue 9, item 5), as one table.

Each case turns a good upload (adapter_config.json + adapter_model.safetensors) into a bad one
and says which status and field the refusal must carry. tests/core checks the table against
parse_peft_adapter, tests/e2e against the real server's PutAdapter.
"""

from __future__ import annotations

import json
import struct

CONFIG = "adapter_config.json"
SAFE = "adapter_model.safetensors"
KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def raw_safetensors(header: bytes | dict, body: bytes = b"") -> bytes:
    """A file framed like safetensors around any header, valid or not."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def _weights(data: bytes):
    return lambda files: {**files, SAFE: data}


def _one_tensor(**info):
    entry = {"dtype": "F32", "shape": [4, 32], "data_offsets": [0, 512], **info}
    body = b"\0" * (entry["data_offsets"][1] - entry["data_offsets"][0])
    return _weights(raw_safetensors({KEY: entry}, body))


def _config(**changes):
    def mutate(files):
        cfg = {**json.loads(files[CONFIG]), **changes}
        return {**files, CONFIG: json.dumps(cfg).encode()}
    return mutate


def _config_bytes(raw: bytes):
    return lambda files: {**files, CONFIG: raw}


DEEP = 100_000
SHAPE = f"{SAFE}[{KEY}].shape"

# (case, mutate(files) -> files, gRPC status code, field the refusal names)
CASES = [
    ("shape 2**63 beside a 0", _one_tensor(shape=[2**63, 0], data_offsets=[0, 0]), "INVALID_ARGUMENT", SHAPE),
    ("shape 2**64-1 beside a 0", _one_tensor(shape=[2**64 - 1, 0], data_offsets=[0, 0]), "INVALID_ARGUMENT", SHAPE),
    ("shape above uint64", _one_tensor(shape=[2**64, 4]), "INVALID_ARGUMENT", SAFE),
    ("shape product overflows", _one_tensor(shape=[2**32, 2**32, 2]), "INVALID_ARGUMENT", SAFE),
    ("boolean shape", _one_tensor(shape=[True, 128]), "INVALID_ARGUMENT", SAFE),
    ("negative shape", _one_tensor(shape=[-4, 32]), "INVALID_ARGUMENT", SAFE),
    ("dtype as a list", _one_tensor(dtype=["F32"]), "INVALID_ARGUMENT", SAFE),
    ("dtype as a dict", _one_tensor(dtype={"F32": 1}), "INVALID_ARGUMENT", SAFE),
    ("dtype F64", _one_tensor(dtype="F64", shape=[2, 32]), "INVALID_ARGUMENT", f"{SAFE}[{KEY}].dtype"),
    ("deeply nested header", _weights(raw_safetensors(b'{"a":' + b"[" * DEEP + b"]" * DEEP + b"}")),
     "INVALID_ARGUMENT", SAFE),
    ("deeply nested header metadata", _weights(raw_safetensors(
        b'{"__metadata__":' + b'{"a":' * DEEP + b"1" + b"}" * (DEEP + 1))), "INVALID_ARGUMENT", SAFE),
    ("deeply nested config", _config_bytes(b'{"r": 4, "x": ' + b"[" * DEEP + b"]" * DEEP + b"}"),
     "INVALID_ARGUMENT", CONFIG),
    ("deeply nested config objects", _config_bytes(b'{"a":' * DEEP + b"1" + b"}" * DEEP),
     "INVALID_ARGUMENT", CONFIG),
    ("config too large", _config_bytes(b'{"r": 4, "pad": "' + b"x" * (1 << 20) + b'"}'),
     "RESOURCE_EXHAUSTED", CONFIG),
    ("rank_pattern as a list", _config(rank_pattern=["q_proj", 4]), "INVALID_ARGUMENT", f"{CONFIG}.rank_pattern"),
    ("rank_pattern value a string", _config(rank_pattern={"q_proj": "4"}), "INVALID_ARGUMENT",
     f"{CONFIG}.rank_pattern[q_proj]"),
    ("alpha_pattern as a string", _config(alpha_pattern="q_proj"), "INVALID_ARGUMENT", f"{CONFIG}.alpha_pattern"),
    ("alpha_pattern as a list", _config(alpha_pattern=[8]), "INVALID_ARGUMENT", f"{CONFIG}.alpha_pattern"),
    ("alpha_pattern value a list", _config(alpha_pattern={"v_proj": [8]}), "INVALID_ARGUMENT",
     f"{CONFIG}.alpha_pattern[v_proj]"),
    ("r is a boolean", _config(r=True), "INVALID_ARGUMENT", f"{CONFIG}.r"),
    ("lora_alpha above float range", _config(lora_alpha=10**400), "INVALID_ARGUMENT", CONFIG),
    ("integer of 5000 digits", _config_bytes(b'{"r": 4, "lora_alpha": ' + b"9" * 5000 + b"}"),
     "INVALID_ARGUMENT", CONFIG),
    ("lora_alpha NaN", _config_bytes(b'{"r": 4, "lora_alpha": NaN}'), "INVALID_ARGUMENT", CONFIG),
    ("peft_type a list", _config(peft_type=["LORA"]), "INVALID_ARGUMENT", f"{CONFIG}.peft_type"),
]
