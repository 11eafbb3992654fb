"""Moments requests decode in one conversion (wire._moments_batch) to exactly what they carry;
anything irregular takes the general path and fails there as it always did, naming the field."""

from __future__ import annotations

import numpy as np
import pytest

from seqr_client.wire import add_inputs
from seqr_core.errors import InvalidArgumentError, LimitExceededError
from seqr_router.v1 import router_pb2, tensor_pb2
from seqr_server import wire
from seqr_server.config import Limits

LIMITS = Limits()
MODS = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(3) for p in "qv"]


def _moments(rng, r: int = 4) -> dict[str, np.ndarray]:
    out = {}
    for m in MODS:
        z = rng.standard_normal((9, r)).astype(np.float32)
        out[m] = (z.T @ z / 9).astype(np.float32)
    return out


def _request(**kw) -> router_pb2.RouteRequest:
    req = router_pb2.RouteRequest(library="lib")
    add_inputs(req, **kw)
    return req


@pytest.mark.parametrize("tokens", [None, 7])
def test_a_moments_request_decodes_to_the_matrices_it_carries(tokens):
    mom = _moments(np.random.default_rng(0))
    got = wire.decode_inputs(*(lambda r: (r.tensors, r.inputs))(_request(moments=mom, tokens=tokens)), limits=LIMITS)
    assert list(got) == MODS
    for m, inp in got.items():
        assert inp.form == "moments" and inp.tokens == (tokens or 1)
        assert inp.data.dtype == np.float32 and inp.data.shape == (4, 4)
        assert np.array_equal(inp.data, mom[m])


def test_moments_sharing_one_tensor_or_mixing_dtypes_decode_as_before():
    mom = _moments(np.random.default_rng(1))
    mom[MODS[1]] = mom[MODS[0]]                       # one tensor for two modules (sent once)
    req = _request(moments=mom, tokens=5)
    assert len(req.tensors) == len(MODS) - 1
    req.tensors[req.inputs[2].tensor].CopyFrom(tensor_pb2.Tensor(dtype=tensor_pb2.DType.F16, shape=[4, 4],
                                                  data=mom[MODS[2]].astype("<f2").tobytes()))
    got = wire.decode_inputs(req.tensors, req.inputs, limits=LIMITS)
    assert got[MODS[0]].data is got[MODS[1]].data
    assert np.array_equal(got[MODS[2]].data, mom[MODS[2]].astype(np.float16).astype(np.float32))
    assert all(np.array_equal(got[m].data, mom[m]) for m in MODS[3:])


def _cut_data(req):
    req.tensors["_t3"].data = req.tensors["_t3"].data[:-4]


def _other_shape(req):
    req.tensors["_t3"].shape[:] = [2, 8]


def _twice(req):
    req.inputs[4].module = req.inputs[0].module


def _unreferenced(req):
    req.tensors["spare"].CopyFrom(req.tensors["_t0"])


def _too_many_rows(req):
    t = req.tensors["_t3"]
    t.shape[:] = [LIMITS.max_tokens + 1, 1]
    t.data = bytes(4 * (LIMITS.max_tokens + 1))


@pytest.mark.parametrize("spoil, error, field", [
    (_cut_data, InvalidArgumentError, "tensors[_t3].data"),
    (_other_shape, None, None),                       # a well-formed tensor: the core judges its shape
    (_twice, InvalidArgumentError, "inputs[4].module"),
    (_unreferenced, InvalidArgumentError, "tensors"),
    (_too_many_rows, LimitExceededError, "tensors[_t3].shape[0]"),
])
def test_an_irregular_moments_request_fails_on_the_general_path_naming_the_field(spoil, error, field):
    req = _request(moments=_moments(np.random.default_rng(2)), tokens=3)
    spoil(req)
    if error is None:
        assert wire.decode_inputs(req.tensors, req.inputs, limits=LIMITS)[MODS[3]].data.shape == (2, 8)
        return
    with pytest.raises(error) as ei:
        wire.decode_inputs(req.tensors, req.inputs, limits=LIMITS)
    assert ei.value.field == field
