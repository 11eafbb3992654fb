"""TEMPORARY allowlist: what the fuzz finds that other engineers are fixing right now (issue 9).

Remove an entry when its fix is merged. Each entry carries a concrete reproduction, and
``test_known_issues_still_reproduce`` fails as soon as that reproduction stops failing, so a
fixed entry cannot linger and widen the allowlist. An entry either tolerates an outcome
(``matches``: the run records it as known instead of failing) or keeps inputs from being
sent at all (``avoids``: ones too expensive for CI, e.g. a library that allocates gigabytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from google.protobuf.message import DecodeError

from seqr_router.v1 import admin_pb2

from .outcome import Outcome


@dataclass(frozen=True)
class KnownIssue:
    key: str
    owner: str                                   # the change that fixes it
    what: str
    matches: Callable[[Outcome], bool] = lambda o: False
    avoids: Callable[[str, list[bytes]], bool] = lambda rpc, msgs: False
    reproduce: str = ""                           # name of the reproduction in test_known_issues


def _in_peft_io(o: Outcome) -> bool:
    """INTERNAL raised inside the PEFT/safetensors parser (issue 9 item 5)."""
    return (o.rpc == "PutAdapter" and o.code == "INTERNAL" and o.server_error is not None
            and any(f.endswith("seqr_core/peft_io.py") for f, _, _ in o.server_error.frames))


def _echo_overflows_metadata(o: Outcome) -> bool:
    """A status that echoes a long caller-supplied name outgrows the client's metadata limit
    (8 KiB soft, 16 KiB hard), so the caller gets a transport RESOURCE_EXHAUSTED instead of the
    handler's status (issue 9 item 3)."""
    return o.code in ("RESOURCE_EXHAUSTED", "INTERNAL") and "received metadata size exceeds" in o.details


RECIPE_ELEMENTS = 1 << 21        # shared-A floats a fuzzed CreateLibrary may make the server draw


def _big_library(rpc: str, msgs: list[bytes]) -> bool:
    """A CreateLibrary whose recipe would draw more than RECIPE_ELEMENTS floats (item 7)."""
    if rpc != "CreateLibrary" or not msgs:
        return False
    try:
        req = admin_pb2.CreateLibraryRequest.FromString(msgs[0])
    except DecodeError:
        return False
    if req.WhichOneof("shared_a") != "recipe":
        return False
    d_in = {m.name: m.d_in for m in req.signature.modules}
    names = set(req.shared_a_modules) or set(d_in)
    return sum(max(d_in.get(m, 0), 0) for m in names) * max(req.shared_a_rank, 0) > RECIPE_ELEMENTS


# Empty: the three entries the fuzz found while issue 9 was open (malformed PEFT uploads answering
# INTERNAL, over-long names echoed at full length, unbounded library shapes) were fixed when
# their branches landed, and their reproductions (test_known_issues.py) now pass.
KNOWN_ISSUES: tuple[KnownIssue, ...] = ()


def tolerated(o: Outcome) -> KnownIssue | None:
    return next((k for k in KNOWN_ISSUES if k.matches(o)), None)


def avoided(rpc: str, msgs: list[bytes]) -> KnownIssue | None:
    return next((k for k in KNOWN_ISSUES if k.avoids(rpc, msgs)), None)
