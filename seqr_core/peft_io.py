"""Parse PEFT LoRA adapters from bytes: adapter_config.json + adapter_model.safetensors.

Adapter files come from tenants, and the only acceptable format is one that cannot execute code.
The `safetensors` package parses the bytes (its parser refuses holes, overlaps, trailing bytes,
offsets or shapes that disagree, size overflow and deep or malformed headers). On top of it we
keep a dtype whitelist, widen bf16, refuse tensors without elements (a dimension of 2**63 beside
a 0 passes its size check but not numpy's) and name the field in every refusal. Pickles and zip
(torch) archives are named only where those formats start and a safetensors header cannot: byte
0 is the low byte of a safetensors header length, so it may be anything, 0x80 included.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass
from functools import partial
from typing import Mapping

import numpy as np
from safetensors import SafetensorError, deserialize
from safetensors.numpy import save

from .adapters import MAX_RANK, Adapter, ModuleFactors, peft_scale
from .bounded_json import loads_bounded
from .errors import InvalidArgumentError, LimitExceededError
from .signature import BaseModelSignature, split_peft_key

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
MAX_HEADER = 16 << 20
MAX_CONFIG_BYTES = 1 << 20
_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
# A safetensors file is an 8-byte little-endian header length, then a JSON object (writers start
# it with '{'; leading JSON whitespace is accepted, as the package and our old reader did).
_HEADER_START = re.compile(rb"[ \t\n\r]*+\{")
_PICKLE_PROTOS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")   # PROTO opcode + version
_ZIP = b"PK\x03\x04"


@dataclass(frozen=True)
class ParsedAdapter:
    adapter: Adapter
    upload_dtype: str            # "F32" | "F16" | "BF16" (the widest seen)
    base_model: str              # base_model_name_or_path from the config ('' if absent)
    config: Mapping[str, object]


def _foreign_format(data: bytes) -> str | None:
    """What a file that is not framed as safetensors looks like, for a clear refusal."""
    if data[:2] in _PICKLE_PROTOS:
        return "a Python pickle"
    if data[:4] == _ZIP:
        return "a zip/torch archive"
    return None


def _check_framing(data: bytes, field: str) -> None:
    framed = _HEADER_START.match(data, 8, 8 + MAX_HEADER) is not None
    what = None if framed else _foreign_format(data)
    if what is not None:
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
    if not framed:
        raise InvalidArgumentError("not safetensors: the 8-byte header length must be followed "
                                   "by a JSON object", field=field)


def _parse_error(e: SafetensorError) -> str:
    detail = str(e).removeprefix("Error while deserializing: ")
    return detail if len(detail) <= 200 else detail[:200] + "..."


def _tensor(name: str, info: Mapping, field: str) -> np.ndarray:
    f = f"{field}[{name}]"
    dt = _DTYPES.get(info["dtype"])
    if dt is None:
        raise InvalidArgumentError("unsupported dtype (F32, F16, BF16 only)", field=f"{f}.dtype",
                                   actual=info["dtype"])
    shape = tuple(info["shape"])
    if math.prod(shape) == 0:
        raise InvalidArgumentError("tensor has no elements", field=f"{f}.shape",
                                   limit="every dimension >= 1", actual=list(shape)[:8])
    raw = np.frombuffer(info["data"], dtype=dt).reshape(shape)
    if info["dtype"] == "BF16":
        raw = (raw.astype(np.uint32) << 16).view(np.float32)
    return np.asarray(raw, dtype=np.float32)


def read_safetensors(data: bytes, *, field: str = WEIGHTS) -> tuple[dict[str, np.ndarray], str]:
    """Decode safetensors bytes into float32 arrays. Returns (tensors, widest dtype name)."""
    _check_framing(data, field)
    try:
        entries = deserialize(data)
    except SafetensorError as e:
        raise InvalidArgumentError(f"not a valid safetensors file: {_parse_error(e)}",
                                   field=field) from None
    out = {name: _tensor(name, info, field) for name, info in entries}
    seen = {info["dtype"] for _, info in entries}
    widest = "F32" if "F32" in seen or not seen else ("BF16" if "BF16" in seen else "F16")
    return out, widest


def _positive_int(v, *, field: str, limit: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= limit:
        raise InvalidArgumentError("must be an integer in range", field=field,
                                   limit=f"[1, {limit}]", actual=_short(v))
    return v


def _positive_number(v, *, field: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
        raise InvalidArgumentError("must be a finite number > 0", field=field, actual=_short(v))
    return float(v)


def _pattern_map(cfg: Mapping, key: str, check) -> dict:
    """``rank_pattern``/``alpha_pattern``: absent, null or {module suffix: value}."""
    val = cfg.get(key)
    if val is None:
        return {}
    f = f"{CONFIG}.{key}"
    if not isinstance(val, dict):
        raise InvalidArgumentError("must be an object {module: value}", field=f,
                                   actual=type(val).__name__)
    return {k: check(v, field=f"{f}[{k}]") for k, v in val.items()}


def _short(v) -> object:
    text = repr(v)
    return v if len(text) <= 64 else text[:64] + "..."


def _config(raw: bytes) -> dict:
    cfg = loads_bounded(raw, field=CONFIG, max_bytes=MAX_CONFIG_BYTES)
    if not isinstance(cfg, dict):
        raise InvalidArgumentError("must be a JSON object", field=CONFIG)
    peft_type = cfg.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise InvalidArgumentError("only LoRA adapters are supported", field=f"{CONFIG}.peft_type",
                                   actual=_short(peft_type))
    if cfg.get("use_dora"):
        raise InvalidArgumentError("DoRA is not a plain B·A update; not supported",
                                   field=f"{CONFIG}.use_dora", actual=True)
    r = _positive_int(cfg.get("r"), field=f"{CONFIG}.r", limit=MAX_RANK)
    alpha = _positive_number(cfg.get("lora_alpha", r), field=f"{CONFIG}.lora_alpha")
    return {**cfg, "r": r, "lora_alpha": alpha,
            "rank_pattern": _pattern_map(cfg, "rank_pattern", partial(_positive_int, limit=MAX_RANK)),
            "alpha_pattern": _pattern_map(cfg, "alpha_pattern", _positive_number)}


def _pattern(patterns: Mapping, module: str, default):
    # PEFT matches rank_pattern/alpha_pattern keys as suffixes of the module path.
    for key, val in patterns.items():
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
        r = _pattern(cfg["rank_pattern"], module, cfg["r"])
        alpha = _pattern(cfg["alpha_pattern"], module, cfg["lora_alpha"])
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
    """Encode arrays as float32 safetensors bytes with the `safetensors` package (no I/O)."""
    return save({k: np.ascontiguousarray(v, dtype="<f4") for k, v in tensors.items()})
