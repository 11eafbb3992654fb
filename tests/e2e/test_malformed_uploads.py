"""Malformed PutAdapter uploads over the real socket: the status and field of tests/malformed_uploads,
never INTERNAL, and nothing stored."""

from __future__ import annotations

import grpc
import pytest

from seqr_router.v1 import admin_pb2_grpc

from ..malformed_uploads import CASES
from ..peft_factory import read_dir
from .test_bad_input import _upload, rpc_error, state


@pytest.mark.parametrize("case, mutate, code, field", CASES, ids=[c[0] for c in CASES])
def test_malformed_upload_is_refused_naming_the_field(world, shared_server, case, mutate, code, field):
    h, client = shared_server
    good = read_dir(world.adapters["shared-a0"])
    files = mutate({k: good[k] for k in ("adapter_config.json", "adapter_model.safetensors")})
    before = state(h, client)
    with grpc.insecure_channel(h.target) as ch:
        err = rpc_error(lambda: admin_pb2_grpc.LibraryAdminStub(ch).PutAdapter(
            _upload(files)(), timeout=30))
    assert (err.code, err.field) == (code, field), str(err)
    assert state(h, client) == before
