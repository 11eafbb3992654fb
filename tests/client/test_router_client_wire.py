"""The client's numpy <-> wire conversion and error mapping (no server needed)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from seqr_client import errors, wire
from seqr_core.errors import LimitExceededError, NotFoundError
from seqr_router.v1 import router_pb2
from seqr_server.status import to_status
from seqr_server.wire import decode_tensor
from seqr_server.config import Limits


def test_same_array_for_two_modules_is_sent_once():
    x = np.ones((3, 8), np.float32)
    req = router_pb2.RouteRequest()
    wire.add_inputs(req, inputs={"a.q_proj": x, "a.v_proj": x, "b.q_proj": x + 1})
    assert len(req.tensors) == 2
    assert req.inputs[0].tensor == req.inputs[1].tensor != req.inputs[2].tensor


def test_named_shared_tensors_and_moments_tokens():
    req = router_pb2.RouteRequest()
    wire.add_inputs(req, moments={"m": "g"}, shared={"g": np.eye(4)}, tokens=17)
    assert list(req.tensors) == ["g"] and req.inputs[0].tokens == 17
    assert req.inputs[0].form == router_pb2.MOMENTS
    with pytest.raises(ValueError):
        wire.add_inputs(router_pb2.RouteRequest(), inputs={"m": "missing"})
    with pytest.raises(ValueError):
        wire.add_inputs(router_pb2.RouteRequest(), inputs={"m": np.ones((1, 2))}, projected={"m": np.ones((1, 2))})


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_tensors_round_trip_through_the_server_decoder(dtype):
    a = (np.arange(12, dtype=np.float64).reshape(3, 4) / 7).astype(dtype)
    got = decode_tensor(wire.encode_tensor(a), field="t", limits=Limits())
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, a.astype(np.float32))


def test_bf16_tensors_decode_to_the_upper_half_of_float32():
    from seqr_router.v1 import tensor_pb2
    a = np.array([[1.0, -2.5, 3.140625]], np.float32)
    bf = (a.view(np.uint32) >> 16).astype("<u2")
    t = tensor_pb2.Tensor(dtype=tensor_pb2.BF16, shape=[1, 3], data=bf.tobytes())
    np.testing.assert_array_equal(decode_tensor(t, field="t", limits=Limits()), a)
    np.testing.assert_array_equal(wire.decode_tensor(t), a)


@pytest.mark.parametrize("label,kind,gran,tr", [
    ("frobenius", "FROBENIUS", "ADAPTER_MODULE", "E"),
    ("zscore/adapter/log", "ZSCORE", "ADAPTER", "LOG"),
    ("activation", "ACTIVATION", "ADAPTER_MODULE", "E")])
def test_normalisation_labels_parse(label, kind, gran, tr):
    n = wire.normalisation_msg(label)
    N = router_pb2.Normalisation
    assert (N.Kind.Name(n.kind), N.ZGranularity.Name(n.granularity), N.Transform.Name(n.transform)) == (kind, gran, tr)
    with pytest.raises(ValueError):
        wire.normalisation_msg("l2")


class _FakeRpcError(grpc.RpcError):
    def __init__(self, status: grpc.Status):
        self._s = status

    def code(self):
        return self._s.code

    def details(self):
        return self._s.details

    def trailing_metadata(self):
        return self._s.trailing_metadata


@pytest.mark.parametrize("err,cls,reason", [
    (NotFoundError("no adapter 'x'", field="candidates", actual="x"), errors.NotFoundError, "NOT_FOUND_ERROR"),
    (LimitExceededError("too many tokens", field="tensors[h].shape[0]", limit=256, actual=300),
     errors.LimitExceededError, "LIMIT_EXCEEDED_ERROR")])
def test_server_status_becomes_the_matching_client_exception(err, cls, reason):
    got = errors.from_rpc_error(_FakeRpcError(to_status(err)))
    assert type(got) is cls and got.code == err.code and got.field == err.field
    assert got.message == err.message and str(got) == str(err)
    assert got.limit == (None if err.limit is None else str(err.limit)) and got.actual == str(err.actual)
    assert got.reason == reason
