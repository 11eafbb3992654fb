"""Library shape is bounded before CreateLibrary allocates anything (issue 9, item 7).

The reproduction: a 35-byte CreateLibrary (d_in 2**20, rank 128) used to add 525 MB of
memory and 537 MB of disk. Every refusal is RESOURCE_EXHAUSTED naming the field and the limit,
and leaves no library and no new blob behind.
"""

from __future__ import annotations

import numpy as np
import pytest

from seqr_client import RouterClient, SeqrError
from seqr_core import llama_signature
from seqr_server.config import Limits

SMALL = Limits(max_message_bytes=8 << 20, max_tokens=256, max_library_modules=4, max_d_in=256, max_d_out=256,
               max_rank=8, max_shared_a_bytes=16 << 10)


def _blobs(h) -> set[str]:
    return {p.name for p in (h.config.data_dir / "blobs").rglob("*") if p.is_file()}


def _refused(h, create, field, limit):
    before = _blobs(h)
    with RouterClient(h.target) as c:
        with pytest.raises(SeqrError) as ei:
            create(c)
        assert (ei.value.code, ei.value.field, ei.value.limit) == ("RESOURCE_EXHAUSTED", field, str(limit)), \
            str(ei.value)
        assert c.list_libraries() == []
    assert _blobs(h) == before


DEFAULT_CASES = [
    ("the issue's 35-byte request: d_in 2**20, rank 128",
     lambda c: c.create_library("big", signature=[("m.q", 1 << 20, 64)], shared_a_seed=1, shared_a_rank=128),
     "signature.modules[0].d_in", Limits().max_d_in),
    ("d_out above the limit", lambda c: c.create_library("big", signature=[("m.q", 64, 64), ("m.v", 64, 1 << 17)]),
     "signature.modules[1].d_out", Limits().max_d_out),
    ("more modules than a library may have",
     lambda c: c.create_library("big", signature=[(f"m.{i}", 8, 8) for i in range(Limits().max_library_modules + 1)]),
     "signature.modules", Limits().max_library_modules),
    ("rank above the limit",
     lambda c: c.create_library("big", signature=[("m.q", 64, 64)], shared_a_seed=1, shared_a_rank=Limits().max_rank + 1),
     "shared_a_rank", Limits().max_rank),
]


@pytest.mark.parametrize("case,create,field,limit", DEFAULT_CASES, ids=[c[0] for c in DEFAULT_CASES])
def test_oversized_libraries_are_refused_by_the_default_limits(start_server, tmp_path, case, create, field, limit):
    _refused(start_server(tmp_path / "d"), create, field, limit)


SIG4 = [(f"model.layers.0.{m}", 256, 256) for m in ("q", "k", "v", "o")]
SMALL_CASES = [
    ("generated shared A above max_shared_a_bytes",
     lambda c: c.create_library("big", signature=SIG4, shared_a_seed=1, shared_a_rank=8),
     "shared_a_rank", SMALL.max_shared_a_bytes),
    ("uploaded A of a rank above max_rank",
     lambda c: c.create_library("big", signature=SIG4, shared_a={SIG4[0][0]: np.zeros((9, 256), np.float32)}),
     f"uploaded.modules[{SIG4[0][0]}].shape[0]", SMALL.max_rank),
    ("uploaded A above max_shared_a_bytes",
     lambda c: c.create_library("big", signature=SIG4, shared_a={m: np.zeros((8, 256), np.float32)
                                                                 for m, _, _ in SIG4[:3]}),
     "uploaded.modules", SMALL.max_shared_a_bytes),
    ("modules above a configured max_library_modules",
     lambda c: c.create_library("big", signature=[*SIG4, ("m.x", 8, 8)]), "signature.modules", 4),
    ("d_in above a configured max_d_in", lambda c: c.create_library("big", signature=[("m.q", 257, 8)]),
     "signature.modules[0].d_in", 256),
]


@pytest.fixture
def small_server(start_server, tmp_path):
    return start_server(tmp_path / "d", limits=SMALL)


@pytest.mark.parametrize("case,create,field,limit", SMALL_CASES, ids=[c[0] for c in SMALL_CASES])
def test_configured_shape_limits_are_applied(small_server, case, create, field, limit):
    _refused(small_server, create, field, limit)


def test_a_library_exactly_at_the_limits_is_created(small_server):
    before = _blobs(small_server)
    with RouterClient(small_server.target) as c:
        info = c.create_library("fits", signature=SIG4, shared_a_seed=1, shared_a_rank=8,
                                shared_a_modules=[m for m, _, _ in SIG4[:2]])   # 2 x 8 x 256 x 4 B = 16 KiB
        assert [m.shared_rank for m in info.modules] == [8, 8, 0, 0]
    assert _blobs(small_server) > before      # what the refusals above are compared against


def test_default_limits_fit_llama_3_70b(start_server, tmp_path):
    sig = llama_signature(base_model="meta-llama/Meta-Llama-3-70B", hidden=8192, intermediate=28672,
                          layers=80, heads=64, kv_heads=8)
    lim = Limits()
    assert len(sig.modules) == 560 <= lim.max_library_modules
    # the documented budget: every module at rank 64 (1.5 GiB of fp32 A)
    assert 4 * 64 * sum(m.d_in for m in sig.modules) <= lim.max_shared_a_bytes
    h = start_server(tmp_path / "d", limits=Limits(max_message_bytes=8 << 20))
    with RouterClient(h.target) as c:
        info = c.create_library("llama70b", signature=sig, shared_a_seed=1, shared_a_rank=lim.max_rank,
                                shared_a_modules=["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"])
        assert len(info.modules) == 560 and max(m.d_in for m in info.modules) == 28672
