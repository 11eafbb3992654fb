"""Mixed libraries: an upload whose A is not the library's shared A is never silently stored as
general; a flag allows it, and a library created shared_a_only refuses it outright."""

from __future__ import annotations

import pytest

from seqr_client import FailedPreconditionError, RouterClient
from seqr_cli.main import main

from .conftest import LIB, RANK, SEED, create_library


def test_foreign_a_is_refused_unless_the_header_allows_general(world, start_server, tmp_path):
    h = start_server(tmp_path / "data")
    with RouterClient(h.target, timeout=30) as c:
        create_library(c, world)
        c.put_adapter(world.adapters["shared-a0"], name="shared-a0", library=LIB)
        version = c.describe(LIB).version
        with pytest.raises(FailedPreconditionError) as e:
            c.put_adapter(world.adapters["general-g0"], name="general-g0", library=LIB)
        assert e.value.field == "header.allow_general"
        assert "not the library's shared A" in str(e.value) and "--allow-general" in str(e.value)
        assert [a.name for a in c.list_adapters(LIB)] == ["shared-a0"]        # nothing stored
        assert c.describe(LIB).version == version
        got = c.put_adapter(world.adapters["general-g0"], name="general-g0", library=LIB, allow_general=True)
        assert got.kind == "general"
        # an adapter whose A is the shared A needs no flag (fp16 uploads of it included)
        assert c.put_adapter(world.adapters["shared-f16"], name="shared-f16", library=LIB).kind == "shared_a"


def test_a_library_without_shared_a_takes_general_adapters_without_the_flag(world, start_server, tmp_path):
    h = start_server(tmp_path / "data")
    with RouterClient(h.target, timeout=30) as c:
        c.create_library("plain", signature=world.sig)
        assert c.put_adapter(world.adapters["general-g0"], name="g", library="plain").kind == "general"


def test_shared_a_only_library_refuses_general_adapters_even_when_allowed(world, start_server, tmp_path):
    h = start_server(tmp_path / "data")
    with RouterClient(h.target, timeout=30) as c:
        info = c.create_library(LIB, signature=world.sig, shared_a_seed=SEED, shared_a_rank=RANK,
                                shared_a_modules=world.qv, shared_a_only=True)
        assert info.shared_a_only
        for allow in (False, True):
            with pytest.raises(FailedPreconditionError) as e:
                c.put_adapter(world.adapters["general-g1"], name="g", library=LIB, allow_general=allow)
            assert e.value.field == "library.shared_a_only"
        assert c.put_adapter(world.adapters["shared-a1"], name="s", library=LIB).kind == "shared_a"
        assert [a.name for a in c.list_adapters(LIB)] == ["s"]
    h.stop(grace=1.0)
    h2 = start_server(tmp_path / "data")                                 # the option is stored
    with RouterClient(h2.target, timeout=30) as c:
        assert c.describe(LIB).shared_a_only
        with pytest.raises(FailedPreconditionError):
            c.put_adapter(world.adapters["general-g1"], name="g", library=LIB, allow_general=True)


def test_cli_says_why_and_how_to_allow_a_general_upload(world, start_server, tmp_path, capsys):
    h = start_server(tmp_path / "data")
    with RouterClient(h.target, timeout=30) as c:
        create_library(c, world)
    conn = ["--target", h.target, "--library", LIB]
    assert main(["adapters", "put", str(world.adapters["general-g0"]), *conn]) == 1
    err = capsys.readouterr().err
    assert "FAILED_PRECONDITION" in err and "--allow-general" in err and "seqr train --library" in err
    assert main(["adapters", "put", str(world.adapters["general-g0"]), "--allow-general", *conn]) == 0
    assert "general" in capsys.readouterr().out
