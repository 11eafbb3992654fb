"""Parse PEFT LoRA adapters from bytes: adapter_config.json + adapter_model.safetensors.

The safetensors reader is our own and strict (bounds, overlaps, dtypes): adapter files come
from tenants, and the only acceptable format is one that cannot execute code. Anything that
looks like a pickle, zip (torch .bin/.pt) or unknown file is refused, never deserialised.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from .adapters import Adapter, ModuleFactors, peft_scale
from .errors import InvalidArgumentError, LimitExceededError
from .signature import BaseModelSignature, split_peft_key

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
MAX_HEADER = 16 << 20
_DTYPES = {"F32": (np.dtype("<f4"), 4), "F16": (np.dtype("<f2"), 2), "BF16": (np.dtype("<u2"), 2)}
_REFUSED_MAGIC = ((b"\x80", "a Python pickle"), (b"PK\x03\x04", "a zip/torch archive"))


@dataclass(frozen=True)
class ParsedAdapter:
    adapter: Adapter
    upload_dtype: str            # "F32" | "F16" | "BF16" (the widest seen)
    base_model: str              # base_model_name_or_path from the config ('' if absent)
    config: Mapping[str, object]


def read_safetensors(data: bytes, *, field: str = WEIGHTS) -> tuple[dict[str, np.ndarray], str]:
    """Decode safetensors bytes into float32 arrays. Returns (tensors, widest dtype name)."""
    for magic, what in _REFUSED_MAGIC:
        if data[: len(magic)] == magic:
            raise InvalidArgumentError(f"refused: this is {what}, not safetensors (pickles are "
                                       "never loaded)", field=field)
    if len(data) < 8:
        raise InvalidArgumentError("too short for a safetensors file", field=field,
                                   limit=">=8 bytes", actual=len(data))
    (hlen,) = struct.unpack("<Q", data[:8])
    # Size check first: a text file or a truncated upload reads as an absurd header length,
    # and that is malformed input, not an oversize request.
    if 8 + hlen > len(data):
        raise InvalidArgumentError("not safetensors or truncated: header length exceeds the file",
                                   field=field, limit=len(data) - 8, actual=hlen)
    if hlen > MAX_HEADER:
        raise LimitExceededError("safetensors header too large", field=field,
                                 limit=MAX_HEADER, actual=hlen)
    try:
        header = json.loads(data[8:8 + hlen].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidArgumentError(f"safetensors header is not JSON ({e})", field=field) from None
    if not isinstance(header, dict):
        raise InvalidArgumentError("safetensors header must be an object", field=field)
    header.pop("__metadata__", None)
    body = memoryview(data)[8 + hlen:]
    spans, out, seen = [], {}, set()
    for key, info in header.items():
        f = f"{field}[{key}]"
        if not isinstance(info, dict) or info.get("dtype") not in _DTYPES:
            raise InvalidArgumentError("unsupported dtype (F32, F16, BF16 only)", field=f,
                                       actual=info.get("dtype") if isinstance(info, dict) else info)
        dt, size = _DTYPES[info["dtype"]]
        shape, offs = info.get("shape"), info.get("data_offsets")
        if (not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape)
                or not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) for o in offs)):
            raise InvalidArgumentError("bad shape or data_offsets", field=f, actual=info)
        begin, end = offs
        n = int(np.prod(shape, dtype=np.int64))
        if not (0 <= begin <= end <= len(body)) or end - begin != n * size:
            raise InvalidArgumentError("data_offsets out of bounds or inconsistent with shape",
                                       field=f, limit=len(body), actual=offs)
        spans.append((begin, end))
        raw = np.frombuffer(body[begin:end], dtype=dt).reshape(shape)
        if info["dtype"] == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        out[key] = np.asarray(raw, dtype=np.float32)
        seen.add(info["dtype"])
    spans.sort()
    pos = 0
    for b, e in spans:
        if b != pos:
            raise InvalidArgumentError("tensor data overlaps or leaves holes", field=field,
                                       actual=(b, e))
        pos = e
    if pos != len(body):
        raise InvalidArgumentError("trailing bytes after the last tensor", field=field,
                                   limit=pos, actual=len(body))
    widest = "F32" if "F32" in seen or not seen else ("BF16" if "BF16" in seen else "F16")
    return out, widest


def _config(raw: bytes) -> dict:
    try:
        cfg = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidArgumentError(f"not valid JSON ({e})", field=CONFIG) from None
    if not isinstance(cfg, dict):
        raise InvalidArgumentError("must be a JSON object", field=CONFIG)
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise InvalidArgumentError("only LoRA adapters are supported", field=f"{CONFIG}.peft_type",
                                   actual=cfg.get("peft_type"))
    if cfg.get("use_dora"):
        raise InvalidArgumentError("DoRA is not a plain B·A update; not supported",
                                   field=f"{CONFIG}.use_dora", actual=True)
    r = cfg.get("r")
    if not isinstance(r, int) or r < 1:
        raise InvalidArgumentError("r must be a positive int", field=f"{CONFIG}.r", actual=r)
    alpha = cfg.get("lora_alpha", r)
    if not isinstance(alpha, (int, float)) or not alpha > 0:
        raise InvalidArgumentError("lora_alpha must be > 0", field=f"{CONFIG}.lora_alpha",
                                   actual=alpha)
    return cfg


def _pattern(patterns: Mapping, module: str, default):
    # PEFT matches rank_pattern/alpha_pattern keys as suffixes of the module path.
    for key, val in (patterns or {}).items():
        if module == key or module.endswith("." + key):
            return val
    return default


def parse_peft_adapter(files: Mapping[str, bytes], *, name: str,
                       signature: BaseModelSignature | None = None,
                       meta: Mapping[str, object] | None = None) -> ParsedAdapter:
    """Build an Adapter from PEFT files given as bytes. Validates against ``signature``."""
    extra = sorted(set(files) - {CONFIG, WEIGHTS, "README.md", "seqr.json"})
    if extra:
        raise InvalidArgumentError("unexpected files (only adapter_config.json and "
                                   "adapter_model.safetensors are accepted)", field="files",
                                   actual=extra)
    for need in (CONFIG, WEIGHTS):
        if need not in files:
            raise InvalidArgumentError("missing required file", field=f"files.{need}")
    cfg = _config(files[CONFIG])
    tensors, dtype = read_safetensors(files[WEIGHTS])
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in tensors.items():
        module, part = split_peft_key(key)
        if part in parts.setdefault(module, {}):
            raise InvalidArgumentError("duplicate tensor for module", field=f"{WEIGHTS}[{key}]")
        parts[module][part] = arr
    if not parts:
        raise InvalidArgumentError("no LoRA tensors", field=WEIGHTS)
    factors = {}
    for module, p in sorted(parts.items()):
        if set(p) != {"lora_A", "lora_B"}:
            raise InvalidArgumentError("module needs both lora_A and lora_B",
                                       field=f"{WEIGHTS}[{module}]", actual=sorted(p))
        A, B = p["lora_A"], p["lora_B"]
        r = _pattern(cfg.get("rank_pattern"), module, cfg["r"])
        alpha = _pattern(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", cfg["r"]))
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != r or B.shape[1] != r:
            raise InvalidArgumentError("rank mismatch: lora_A must be (r, d_in) and lora_B "
                                       "(d_out, r) with r from adapter_config.json",
                                       field=f"{WEIGHTS}[{module}]", limit=r,
                                       actual=(A.shape, B.shape))
        if not (np.isfinite(A).all() and np.isfinite(B).all()):
            raise InvalidArgumentError("non-finite values (NaN/Inf)", field=f"{WEIGHTS}[{module}]")
        scale = peft_scale(lora_alpha=alpha, r=r, use_rslora=bool(cfg.get("use_rslora")))
        factors[module] = ModuleFactors(A=A, B=B, scale=scale)
    adapter = Adapter(name=name, factors=factors, meta=dict(meta or {}))
    if signature is not None:
        adapter.check_against(signature)
    return ParsedAdapter(adapter=adapter, upload_dtype=dtype,
                         base_model=str(cfg.get("base_model_name_or_path") or ""), config=cfg)


def write_safetensors(tensors: Mapping[str, np.ndarray]) -> bytes:
    """Encode float32 arrays as safetensors bytes (for tests and exports; no I/O)."""
    header, blobs, pos = {}, [], 0
    for key in sorted(tensors):
        a = np.ascontiguousarray(tensors[key], dtype="<f4")
        header[key] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [pos, pos + a.nbytes]}
        blobs.append(a.tobytes())
        pos += a.nbytes
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)
