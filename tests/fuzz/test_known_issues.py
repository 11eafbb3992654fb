"""The temporary allowlist stays honest: each entry still reproduces on today's server, so the
day its fix lands this test fails and says which entry to delete (see known_issues.py)."""

from __future__ import annotations

import json
import struct

import pytest

from seqr_router.v1 import admin_pb2, library_pb2, router_pb2

from . import corpus
from .cases import Case
from .corpus import BY_NAME, FuzzWorld
from .known_issues import KNOWN_ISSUES

pytestmark = pytest.mark.fuzz


def _dtype_as_list(fw: FuzzWorld) -> tuple[str, Case]:
    config = fw.adapter_files[sorted(fw.adapter_files)[0]][corpus.CONFIG]
    header = json.dumps({f"base_model.model.{fw.qv[0]}.lora_A.weight":
                         {"dtype": ["F32"], "shape": [fw.rank, fw.d_in(fw.qv[0])], "data_offsets": [0, 0]}}).encode()
    header += b" " * (-len(header) % 8)     # a length of 128 mod 256 would read as a pickle (issue 9 item 1)
    header += b" " * (8 if len(header) % 256 == 128 else 0)
    weights = struct.pack("<Q", len(header)) + header
    msgs = corpus.put_stream(fw.lib, "fz-known-issue", {corpus.CONFIG: config, corpus.WEIGHTS: weights})
    return "PutAdapter", Case("open", "open", tuple(m.SerializeToString() for m in msgs))


def _long_library_name(fw: FuzzWorld) -> tuple[str, Case]:
    req = router_pb2.DescribeLibraryRequest(library="x" * 20_000)
    return "DescribeLibrary", Case("open", "open", (req.SerializeToString(),))


def _big_recipe_library(fw: FuzzWorld) -> tuple[str, Case]:
    # The issue's 35-byte request: one module with d_in 2**20 and a rank-128 recipe (525 MB RSS).
    req = admin_pb2.CreateLibraryRequest(
        name="fz-big", signature=library_pb2.Signature(modules=[library_pb2.ModuleSpec(name="m", d_in=1 << 20,
                                                                                        d_out=1)]),
        recipe=library_pb2.SharedARecipe(seed=1), shared_a_rank=128)
    return "CreateLibrary", Case("tokens", "admin-restricted", (req.SerializeToString(),))


REPRODUCTIONS = {"peft_shape_overflow": _dtype_as_list, "long_library_name": _long_library_name,
                 "big_recipe_library": _big_recipe_library}


@pytest.mark.parametrize("issue", KNOWN_ISSUES, ids=lambda k: k.key)
def test_known_issue_still_reproduces_delete_its_entry_once_fixed(fuzzer, issue):
    rpc, case = REPRODUCTIONS[issue.reproduce](fuzzer.fw)
    msgs = list(case.messages)
    if issue.avoids(rpc, msgs):
        # Too expensive to send in CI; the entry must at least leave every valid seed alone.
        seeds = corpus.seeds(fuzzer.fw)
        assert not any(issue.avoids(name, [m.SerializeToString() for m in s])
                       for name, streams in seeds.items() for s in streams)
        return
    outcome = fuzzer.send(BY_NAME[rpc], fuzzer.servers[case.server], case.principal, msgs)
    assert outcome.problem is not None and issue.matches(outcome), (
        f"{issue.key} no longer reproduces ({outcome.code}: {outcome.details[:200]!r}); its fix has "
        f"landed: delete it from KNOWN_ISSUES in tests/fuzz/known_issues.py")
