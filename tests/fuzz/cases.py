"""One fuzz case = who calls (server, principal) + the raw messages of one call of one RPC.

``structured`` cases draw protobuf messages (valid seeds, seeds with fields changed anywhere
in their tree, fully random messages, and the domain strategies of corpus.py) and serialize
them; ``bytes`` cases mutate the serialized seeds. Both sometimes send a unary RPC zero or
two messages, which a hostile peer can do and the typed stubs never do.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import Message
from hypothesis import strategies as st

from . import corpus, uploads
from .byte_mutations import mutated_bytes, mutated_streams
from .corpus import FuzzWorld, Rpc
from .proto_strategies import ProtoStrategies, rarely

# (server, principal), repeated to weight the draw; servers as in conftest. "admin-restricted" may use only shared-*
# adapters and libraries LIB and fz-*; "route-restricted" routes among shared-* only;
# "anonymous" sends no token. One call in eight comes with odd authorization metadata instead
# (harness.ODD_METADATA): refused before its message is read, so cheap and rarely interesting.
CALLERS = (("open", "open"),) * 2 + (("onnx", "open"),) + (("tokens", "admin"),) * 3 + (("tokens", "route-restricted"),) * 2 + (
    ("tokens", "admin-restricted"),) * 2 + (("tokens", "anonymous"),)
ODD_CALLERS = tuple(("tokens", p) for p in ("forged", "long-token", "basic-auth", "bearer-only", "forged-then-admin"))


@st.composite
def callers(draw) -> tuple[str, str]:
    return draw(st.sampled_from(ODD_CALLERS)) if rarely(draw, 7) else draw(st.sampled_from(CALLERS))

MAX_CASE_BYTES = 32 << 20        # all messages of one call; the servers take 8 MiB per message


@dataclass(frozen=True)
class Case:
    server: str
    principal: str
    messages: tuple[bytes, ...]

    def __repr__(self) -> str:       # what hypothesis prints for a falsifying example
        sizes = [len(m) for m in self.messages]
        return f"Case(server={self.server!r}, principal={self.principal!r}, message_sizes={sizes})"


def pick(items: list) -> st.SearchStrategy:
    """sampled_from by index: hypothesis would otherwise repr every (large) item."""
    return st.integers(0, len(items) - 1).map(items.__getitem__)


def proto_strategies(fw: FuzzWorld, *, max_string: int) -> ProtoStrategies:
    return ProtoStrategies(vocab=fw.vocab, max_string=max_string,
                           overrides={"seqr_router.v1.Tensor": corpus.tensors(fw)})


def _seed_messages(fw: FuzzWorld, rpc: Rpc, proto: ProtoStrategies) -> st.SearchStrategy[list[Message]]:
    seeds = corpus.seeds(fw)[rpc.name]
    fixed = pick(seeds).map(list)
    if rpc.name == "CreateLibrary":
        return st.one_of(fixed, st.builds(lambda n, k: [corpus.create_library(fw, n, k)],
                                          corpus.fresh_library_names(),
                                          st.sampled_from(("recipe", "uploaded", "none"))))
    if rpc.name == "PutAdapter":
        return st.one_of(fixed, uploads.put_streams(fw, proto), uploads.put_streams(fw, proto))
    return fixed


def _mutate_stream(proto: ProtoStrategies, base: st.SearchStrategy[list[Message]]):
    @st.composite
    def build(draw) -> list[Message]:
        msgs = []
        for m in draw(base):
            c = type(m)()
            c.CopyFrom(m)
            msgs.append(c)
        if msgs:
            for _ in range(draw(st.integers(1, 3))):
                proto.mutate_once(draw, msgs[draw(st.integers(0, len(msgs) - 1))])
        return msgs
    return build()


def _arity(rpc: Rpc, msgs: st.SearchStrategy[list[Message]], extra: st.SearchStrategy[Message]):
    """Unary RPCs: mostly one message, sometimes none or two."""
    if rpc.client_streaming:
        return msgs
    return st.one_of(msgs, msgs, msgs, msgs, msgs, msgs, msgs, msgs, st.just([]),
                     st.builds(lambda a, b: a[:1] + [b], msgs, extra))


def structured(fw: FuzzWorld, rpc: Rpc, *, max_string: int = 1 << 16) -> st.SearchStrategy[Case]:
    proto = proto_strategies(fw, max_string=max_string)
    seeds = _seed_messages(fw, rpc, proto)
    random_msg = proto.message(rpc.request.DESCRIPTOR)
    msgs = st.one_of(seeds, _mutate_stream(proto, seeds), _mutate_stream(proto, seeds),
                     _mutate_stream(proto, seeds), st.lists(random_msg, min_size=1, max_size=3))
    msgs = _arity(rpc, msgs, random_msg).filter(lambda ms: sum(m.ByteSize() for m in ms) <= MAX_CASE_BYTES)
    return st.builds(lambda who, ms: Case(who[0], who[1], tuple(m.SerializeToString() for m in ms)),
                     callers(), msgs)


def raw_bytes(fw: FuzzWorld, rpc: Rpc) -> st.SearchStrategy[Case]:
    streams = [[m.SerializeToString() for m in s] for s in corpus.seeds(fw)[rpc.name]]
    if rpc.client_streaming:
        msgs = mutated_streams(streams)
    else:
        one = mutated_bytes([s[0] for s in streams]).map(lambda b: [b])
        msgs = st.one_of(one, one, one, one, one, one, mutated_streams(streams))
    return st.builds(lambda who, ms: Case(who[0], who[1], tuple(ms)), callers(), msgs)


def cases(fw: FuzzWorld, rpc: Rpc, kind: str, **kw) -> st.SearchStrategy[Case]:
    return structured(fw, rpc, **kw) if kind == "structured" else raw_bytes(fw, rpc)
