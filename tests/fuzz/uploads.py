"""Upload strategies: PutAdapter streams that reach the PEFT parser and then break it.

Files are the real test adapters or safetensors-like bytes (LoRA keys of the signature, odd
dtypes and shapes, offsets right or wrong, header lengths that lie, pickle/zip magic) with an
adapter_config.json whose fields take odd JSON values (deeply nested ones included). Each
distortion of the stream itself (lying headers, extra files, messages out of order) is rare on
its own, so most streams get past the framing checks to the parser.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct

from hypothesis import strategies as st

from seqr_router.v1 import admin_pb2

from .corpus import CONFIG, WEIGHTS, FuzzWorld, fill, put_stream
from .proto_strategies import INT64_EDGES, ProtoStrategies, rarely


def json_values(max_leaves: int = 8) -> st.SearchStrategy:
    scalars = st.one_of(st.none(), st.booleans(), st.sampled_from((0, -1, 1, 2**63, 2**64, -2**63, 10**30)),
                        st.integers(), st.floats(), st.text(max_size=8))
    nested = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c,
                                                                                       max_size=3),
                          max_leaves=max_leaves)
    return st.one_of(nested, st.integers(1, 5000).map(_Deep))


class _Deep:
    """A JSON value nested ``depth`` lists deep (json.dumps would recurse; written by hand)."""

    def __init__(self, depth: int):
        self.depth = depth

    def json(self) -> str:
        return "[" * self.depth + "]" * self.depth


def _dumps(doc) -> str:
    """json.dumps where _Deep values are spliced in as raw text."""
    deep: list[_Deep] = []

    def walk(v):
        if isinstance(v, _Deep):
            deep.append(v)
            return f"@@DEEP{len(deep) - 1}@@"
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        return v
    text = json.dumps(walk(doc))
    for i, d in enumerate(deep):
        text = text.replace(f'"@@DEEP{i}@@"', d.json())
    return text


def configs(fw: FuzzWorld) -> st.SearchStrategy[bytes]:
    """adapter_config.json: valid, with fields set to odd JSON values, or not JSON at all."""
    keys = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "peft_type",
            "target_modules", "base_model_name_or_path")

    @st.composite
    def build(draw) -> bytes:
        base = json.loads(fw.adapter_files[sorted(fw.adapter_files)[0]][CONFIG])
        for k in draw(st.lists(st.sampled_from(keys), max_size=3, unique=True)):
            base[k] = draw(st.one_of(json_values(), st.dictionaries(st.sampled_from(fw.qv + ("q_proj", "v_proj")),
                                                                    json_values(4), max_size=2)))
        if rarely(draw, 9):
            return draw(st.one_of(st.binary(max_size=64), json_values().map(lambda v: _dumps(v).encode())))
        return _dumps(base).encode()
    return build()


def safetensors_like(fw: FuzzWorld) -> st.SearchStrategy[bytes]:
    """Files shaped like safetensors: LoRA keys of the signature, odd dtypes and shapes
    (huge, negative, bool, nested), offsets right or wrong, header lengths that lie, magic bytes."""
    r = fw.rank
    shape_vals = st.one_of(st.sampled_from(INT64_EDGES), st.sampled_from((True, False, 1.5, "4", None)))

    @st.composite
    def build(draw) -> bytes:
        header, blobs, pos = {}, [], 0
        for m in draw(st.lists(st.sampled_from(fw.qv), min_size=1, max_size=3, unique=True)):
            for part in draw(st.sampled_from((("lora_A", "lora_B"), ("lora_A",), ("lora_B", "lora_A")))):
                good = [r, fw.d_in(m)] if part == "lora_A" else [next(o for n, _, o in fw.modules if n == m), r]
                dtype = draw(st.one_of(st.sampled_from(("F32", "F32", "F16", "BF16")),
                                       st.sampled_from(("F64", "I64", "U8", "BOOL", "", "f32")), json_values(3)))
                shape = draw(st.one_of(st.just(good), st.just(good), st.lists(shape_vals, max_size=4),
                                       json_values(3)))
                size = {"F32": 4, "F16": 2, "BF16": 2}.get(dtype, 4) if isinstance(dtype, str) else 4
                ok = isinstance(shape, list) and all(type(s) is int and 0 <= s <= 1 << 12 for s in shape)
                n = math.prod(shape) * size if ok else draw(st.integers(0, 64))
                offs = draw(st.one_of(st.just([pos, pos + n]), st.just([pos, pos + n]),
                                      st.lists(shape_vals, max_size=3), json_values(3)))
                header[f"base_model.model.{m}.{part}.weight"] = {"dtype": dtype, "shape": shape,
                                                                 "data_offsets": offs}
                blobs.append(fill(draw(st.sampled_from(("normal", "specials", "bytes"))), n,
                                   draw(st.integers(0, 2**16))))
                pos += n
        if draw(st.booleans()):
            header["__metadata__"] = draw(st.one_of(json_values(), st.just({"format": "pt"})))
        text = _dumps(header).encode()
        text += b" " * draw(st.sampled_from((0, -len(text) % 8, 120 - len(text) % 128 + 8)))
        hlen = draw(st.one_of(st.just(len(text)), st.just(len(text)),
                              st.sampled_from((0, 1, len(text) - 1, len(text) + 1, 2**63, 2**64 - 1))))
        prefix = draw(st.sampled_from((b"", b"", b"", b"\x80\x04", b"PK\x03\x04")))
        return prefix + struct.pack("<Q", hlen % 2**64) + text + b"".join(blobs)
    return build()


def put_streams(fw: FuzzWorld, proto: ProtoStrategies) -> st.SearchStrategy[list[admin_pb2.PutAdapterRequest]]:
    """PutAdapter streams: real or synthetic files, honest or lying headers, odd message orders."""
    real = st.sampled_from(sorted(fw.adapter_files)).map(lambda n: dict(fw.adapter_files[n]))
    synthetic = st.builds(lambda c, w: {CONFIG: c, WEIGHTS: w}, configs(fw), safetensors_like(fw))
    fresh = st.integers(0, 10**9).map(lambda i: f"fz-{i}")
    taken_or_odd = st.one_of(st.sampled_from(sorted(fw.adapter_files)), proto.strings())

    @st.composite
    def build(draw) -> list[admin_pb2.PutAdapterRequest]:
        files = draw(st.one_of(real, synthetic, synthetic))
        # Each distortion is rare on its own, so most streams reach the parser.
        if rarely(draw, 4):
            for extra in draw(st.lists(st.sampled_from(("README.md", "seqr.json", "model.bin", "drop")),
                                       min_size=1, max_size=2)):
                if extra == "drop":
                    files.pop(draw(st.sampled_from(sorted(files))), None)
                else:
                    files[extra] = draw(st.one_of(st.binary(max_size=32),
                                                  json_values().map(lambda v: _dumps(v).encode())))
        lies = {}
        if rarely(draw, 4):
            fname = draw(st.sampled_from(sorted(files))) if files else ""
            data = files.get(fname, b"")
            lie = draw(st.sampled_from(("size+", "size-", "sha", "SHA", "short", "neg", "huge")))
            lies[fname] = {"size+": {"size": len(data) + 1}, "size-": {"size": max(len(data) - 1, 0)},
                           "sha": {"sha256": "0" * 64}, "SHA": {"sha256": hashlib.sha256(data).hexdigest().upper()},
                           "short": {"sha256": "abc"}, "neg": {"size": -1}, "huge": {"size": 2**63 - 1}}[lie]
        library = draw(proto.strings()) if rarely(draw, 7) else fw.lib
        name = draw(taken_or_odd) if rarely(draw, 5) else draw(fresh)
        total = sum(len(d) for d in files.values())
        chunk = draw(st.sampled_from((1 << 12, 1 << 20, 64, 7) + ((1,) if total < 512 else ())))
        msgs = put_stream(library, name, files, chunk=chunk, headers=lies)
        ops = draw(st.lists(st.sampled_from(("no_header", "header_twice", "header_last", "empty_chunk",
                                             "extra_chunk", "drop_chunk", "shuffle")), min_size=1, max_size=2)
                   if rarely(draw, 5) else st.just([]))
        for op in ops:
            if op == "no_header":
                msgs = msgs[1:]
            elif op == "header_twice":
                msgs.insert(draw(st.integers(1, len(msgs))), msgs[0])
            elif op == "header_last" and msgs:
                msgs.append(msgs.pop(0))
            elif op == "empty_chunk":
                msgs.insert(draw(st.integers(0, len(msgs))), admin_pb2.PutAdapterRequest(chunk=admin_pb2.FileChunk()))
            elif op == "extra_chunk":
                msgs.append(admin_pb2.PutAdapterRequest(chunk=admin_pb2.FileChunk(data=draw(st.binary(max_size=16)))))
            elif op == "drop_chunk" and len(msgs) > 1:
                del msgs[draw(st.integers(1, len(msgs) - 1))]
            elif op == "shuffle" and len(msgs) > 2:
                msgs = draw(st.permutations(msgs))
        return msgs
    return build()
