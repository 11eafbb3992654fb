"""Send fuzz cases to real servers through real channels and judge every answer.

Oracles, for every call:
- the status is one a handler may answer (never INTERNAL, UNKNOWN, DATA_LOSS, UNAVAILABLE or
  a client-side DEADLINE_EXCEEDED, i.e. a hang);
- an OK answer's messages decode as the RPC's response type, and a status with details
  carries a google.rpc.Status consistent with it;
- every ``check_every`` calls and after every campaign: the server's loop thread is alive,
  health answers SERVING, and a valid Route still returns a choice.
A failure writes the reproducer (raw messages, caller, status, the server's traceback) to
``out_dir`` before it fails the test. Outcomes a temporary known issue explains are recorded,
not failed (known_issues.py).
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import text_format
from google.protobuf.message import DecodeError
from google.rpc.error_details_pb2 import ErrorInfo
from grpc_status import rpc_status

from seqr_client import RouterClient
from seqr_client.errors import SeqrError as ClientError

from .cases import Case
from .corpus import BY_NAME, FuzzWorld, Rpc
from .known_issues import avoided, tolerated
from .outcome import Incidents, Outcome

HANDLER_CODES = frozenset({"OK", "INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "RESOURCE_EXHAUSTED",
                           "FAILED_PRECONDITION", "PERMISSION_DENIED", "UNAUTHENTICATED"})
# Refusals gRPC itself makes before a handler runs; every handler status carries ErrorInfo.
_TRANSPORT_REFUSAL = re.compile(r"(Received|Sent) message larger than max")
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


# Callers whose authorization metadata is odd rather than absent or right.
ODD_METADATA = {
    "forged": lambda admin: (("authorization", "Bearer seqr_forged-token-that-nobody-holds"),),
    "long-token": lambda admin: (("authorization", "Bearer " + "x" * 7000),),
    "basic-auth": lambda admin: (("authorization", "Basic dXNlcjpwYXNz"),),
    "bearer-only": lambda admin: (("authorization", "Bearer"),),
    "forged-then-admin": lambda admin: (("authorization", "Bearer seqr_forged"), ("authorization", f"Bearer {admin}")),
}


@dataclass
class FuzzServer:
    name: str                                     # "open" | "tokens"
    target: str
    tokens: dict[str, str | None]                 # principal -> bearer token (None: no header)
    admin: str                                    # an unrestricted admin principal
    handles: object = None                        # seqr_server.app.ServerHandles when in-process
    channel: grpc.Channel = field(init=False)
    client: RouterClient = field(init=False)

    def __post_init__(self) -> None:
        self.channel = grpc.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        self.client = RouterClient(self.target, token=self.tokens[self.admin], timeout=60)

    def metadata(self, principal: str) -> tuple:
        if principal in ODD_METADATA:
            return ODD_METADATA[principal](self.tokens.get("admin"))
        token = self.tokens[principal]
        return (("authorization", f"Bearer {token}"),) if token else ()

    def close(self) -> None:
        self.client.close()
        self.channel.close()


@dataclass
class Ledger:
    """Every (rpc, status) seen, the known issues met, what was not sent, and the failures."""

    statuses: Counter = field(default_factory=Counter)          # (rpc, code)
    callers: Counter = field(default_factory=Counter)           # (rpc, server, principal)
    known: Counter = field(default_factory=Counter)             # (issue, rpc, code)
    avoided: Counter = field(default_factory=Counter)           # (issue, rpc)
    fields: Counter = field(default_factory=Counter)            # (rpc, code, field named)
    failures: list[str] = field(default_factory=list)
    seconds: dict = field(default_factory=lambda: defaultdict(float))   # rpc -> time in calls

    def examples(self, rpc: str) -> int:
        return sum(n for (r, _), n in self.statuses.items() if r == rpc)

    def to_json(self) -> dict:
        by_rpc: dict = defaultdict(dict)
        for (r, code), n in sorted(self.statuses.items()):
            by_rpc[r][code] = n
        return {"statuses": by_rpc,
                "callers": {f"{r} {s}/{p}": n for (r, s, p), n in sorted(self.callers.items())},
                "known_issues": {f"{k} {r} {c}": n for (k, r, c), n in sorted(self.known.items())},
                "not_sent": {f"{k} {r}": n for (k, r), n in sorted(self.avoided.items())},
                "call_seconds": {r: round(s, 2) for r, s in sorted(self.seconds.items())},
                "fields": {f"{r} {c} {f}": n for (r, c, f), n in self.fields.most_common(200)},
                "failures": self.failures}


class Fuzzer:
    def __init__(self, servers: dict[str, FuzzServer], fw: FuzzWorld, *, incidents: Incidents,
                 ledger: Ledger, out_dir: Path, timeout_s: float = 60.0, check_every: int = 50):
        self.servers, self.fw, self.incidents, self.ledger = servers, fw, incidents, ledger
        self.out_dir, self.timeout_s, self.check_every = out_dir, timeout_s, check_every
        self._calls = 0

    # ------------------------------------------------------------------ one case
    def check(self, rpc_name: str, case: Case) -> Outcome | None:
        """Send ``case``; raise AssertionError (after saving a reproducer) if an oracle fails."""
        rpc, msgs = BY_NAME[rpc_name], list(case.messages)
        issue = avoided(rpc.name, msgs)
        if issue is not None:
            self.ledger.avoided[(issue.key, rpc.name)] += 1
            return None
        server = self.servers[case.server]
        t0 = time.perf_counter()
        outcome = self.send(rpc, server, case.principal, msgs)
        self.ledger.seconds[rpc.name] += time.perf_counter() - t0
        self.ledger.statuses[(rpc.name, outcome.code)] += 1
        self.ledger.callers[(rpc.name, case.server, case.principal)] += 1
        if outcome.field:
            self.ledger.fields[(rpc.name, outcome.code, outcome.field)] += 1
        if outcome.problem is not None:
            known = tolerated(outcome)
            if known is not None:
                self.ledger.known[(known.key, rpc.name, outcome.code)] += 1
            else:
                path = self.save(rpc, case, outcome)
                self.ledger.failures.append(str(path))
                raise AssertionError(f"{rpc.name} from {case.server}/{case.principal}: {outcome.problem} "
                                     f"({outcome.code}: {outcome.details[:300]!r}); reproducer: {path}")
        if outcome.code == "OK" and rpc.name in ("DeleteAdapter", "PutAdapter"):
            self.repair(server)
        self._calls += 1
        if self._calls % self.check_every == 0:
            self.assert_alive(server, route=False)
        return outcome

    def send(self, rpc: Rpc, server: FuzzServer, principal: str, msgs: list[bytes]) -> Outcome:
        md, t = server.metadata(principal), self.timeout_s
        stream_in = rpc.client_streaming or len(msgs) != 1
        responses: list[bytes] = []
        try:
            if stream_in and rpc.server_streaming:
                responses = list(server.channel.stream_stream(rpc.path)(iter(msgs), timeout=t, metadata=md))
            elif stream_in:
                responses = [server.channel.stream_unary(rpc.path)(iter(msgs), timeout=t, metadata=md)]
            elif rpc.server_streaming:
                responses = list(server.channel.unary_stream(rpc.path)(msgs[0], timeout=t, metadata=md))
            else:
                responses = [server.channel.unary_unary(rpc.path)(msgs[0], timeout=t, metadata=md)]
        except grpc.RpcError as e:
            code, details = e.code().name, e.details() or ""
            incident, err = self.incidents.lookup(details)
            problem = None if code in HANDLER_CODES else f"status {code}"
            field_name = ""
            if problem is None:
                try:
                    st = rpc_status.from_call(e)
                except ValueError as bad:
                    st, problem = None, f"status details inconsistent with the status ({bad})"
                if st is not None:
                    field_name = _field(st)
                elif problem is None and not _TRANSPORT_REFUSAL.search(details):
                    problem = f"{code} without the server's error details: not a handler's answer"
            return Outcome(rpc.name, server.name, principal, code, details, len(responses), incident, err, problem,
                           field=field_name)
        problem = None
        for r in responses:
            try:
                rpc.response.FromString(r)
            except DecodeError:
                problem = "an OK response does not decode as " + rpc.response.DESCRIPTOR.name
        return Outcome(rpc.name, server.name, principal, "OK", "", len(responses), problem=problem)

    # ------------------------------------------------------------------ the server stays up
    def assert_alive(self, server: FuzzServer, *, route: bool = True) -> None:
        if server.handles is not None:
            assert server.handles.loop._thread.is_alive(), f"{server.name}: the server's event loop thread died"
        try:
            health = server.client.health(timeout=10)
            if route:
                self.repair(server)
                r = server.client.route(self.fw.lib, {m: self.fw.hidden[int(m.split(".")[2])] for m in self.fw.qv})
                assert r.best is not None, f"{server.name}: a valid Route returned no choice"
        except ClientError as e:
            raise AssertionError(f"{server.name}: the server stopped serving valid calls ({e!r})") from None
        assert health == "SERVING", f"{server.name}: health is {health}, not SERVING"

    def repair(self, server: FuzzServer, *, keep_fuzz: int = 16) -> None:
        """Keep the reference library routable: re-upload deleted test adapters and drop
        fuzz-uploaded ones past ``keep_fuzz`` (so it does not grow through a long run)."""
        c, lib = server.client, self.fw.lib
        have = {a.name for a in c.list_adapters(lib)}
        for n, files in self.fw.adapter_files.items():
            if n not in have:
                c.put_adapter_files(files, name=n, library=lib)
        extra = sorted(have - set(self.fw.adapter_files))
        for n in extra[: max(0, len(extra) - keep_fuzz)]:
            c.delete_adapter(n, library=lib)

    # ------------------------------------------------------------------ reproducers
    def save(self, rpc: Rpc, case: Case, o: Outcome) -> Path:
        """The reproducer; one file per (rpc, code, caller), overwritten while hypothesis
        shrinks, so what remains is the smallest failing input."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{rpc.name}-{o.code}-{case.server}-{case.principal}.json"
        doc = {"rpc": rpc.name, "path": rpc.path, "server": case.server, "principal": case.principal,
               "code": o.code, "details": o.details[:2000], "problem": o.problem, "incident": o.incident,
               "server_error": o.server_error.render() if o.server_error else None,
               "messages_base64": [base64.b64encode(m).decode() for m in case.messages],
               "messages_text": [_text(rpc, m) for m in case.messages]}
        path.write_text(json.dumps(doc, indent=1))
        return path


def _field(st) -> str:
    """The field a refusal names, with caller-chosen names inside [...] elided."""
    for d in st.details if st is not None else ():
        info = ErrorInfo()
        if d.Unpack(info):
            return re.sub(r"\[[^\]]*\]?", "[…]", info.metadata.get("field", ""))[:80]
    return ""


def _text(rpc: Rpc, raw: bytes) -> str:
    try:
        return text_format.MessageToString(rpc.request.FromString(raw), as_utf8=True)[:4000]
    except DecodeError:
        return f"<undecodable, {len(raw)} bytes>"


def load_reproducer(path: Path) -> tuple[str, Case]:
    doc = json.loads(Path(path).read_text())
    return doc["rpc"], Case(doc["server"], doc["principal"],
                            tuple(base64.b64decode(m) for m in doc["messages_base64"]))

