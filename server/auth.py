"""Caller identity: bearer tokens or client certificates -> roles and adapter ACLs (DESIGN §4).

Tokens file (JSON; stores only SHA-256 digests of the tokens, so reading it grants nothing)::

    {"tokens": [
      {"name": "vllm-host-a", "sha256": "<hex>", "roles": ["route"],
       "libraries": ["prod-*"], "adapters": ["team-a-*", "shared-*"]},
      {"name": "host-b", "mtls": {"san": "spiffe://corp/ns/b/sa/vllm"}, "roles": ["route"]},
      {"name": "ops", "sha256": "<hex>", "roles": ["admin"],
       "quota": {"libraries": 5, "adapters": 50, "bytes": 1073741824}}
    ]}

An entry names its caller by ``sha256`` (a bearer token) or by ``mtls`` (a client certificate
under --tls-client-ca: ``cn`` is matched exactly against the subject CN, ``san`` against any
subject alternative name; when both are given both must match). A bearer token, when sent,
decides who the caller is; otherwise the verified certificate does. A certificate that matches
no entry, or entries of more than one caller, is refused.

Roles: ``route`` (Route, RouteStream, DescribeLibrary), ``observer`` (DescribeLibrary,
ListLibraries, ListAdapters), ``admin`` (everything). ``libraries`` and ``adapters`` are glob
patterns (fnmatch, case-sensitive; default ``*``). A caller is only ever routed among the
adapters it may use, and hidden libraries and adapters look exactly like absent ones.
Without a tokens file the server is open (every caller is admin on everything) and says so
loudly at startup. ``quota`` (optional, see quotas.py) limits what the principal may own.

The file is read again on ``reload()`` (SIGHUP) and when it changes (checked on the request
path at most once per ``poll_s``, by inode, size and mtime): revocation takes effect on the
next call after the reload. A reload that fails keeps the previous callers, logs an error and
is audited, like every successful one.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Iterable, Mapping, Sequence

from seqr_core.errors import (FailedPreconditionError, InvalidArgumentError, PermissionDeniedError, SeqrError,
                              UnauthenticatedError)

from .audit import NO_AUDIT
from .quotas import Quota

log = logging.getLogger("seqr.auth")

ROLES = ("route", "observer", "admin")

# Which roles may call each RPC (full method name suffix "Service/Method").
METHOD_ROLES: dict[str, frozenset[str]] = {
    "Router/Route": frozenset({"route", "admin"}),
    "Router/RouteStream": frozenset({"route", "admin"}),
    "Router/DescribeLibrary": frozenset({"route", "observer", "admin"}),
    "LibraryAdmin/ListLibraries": frozenset({"observer", "admin"}),
    "LibraryAdmin/ListAdapters": frozenset({"observer", "admin"}),
    "LibraryAdmin/CreateLibrary": frozenset({"admin"}),
    "LibraryAdmin/PutAdapter": frozenset({"admin"}),
    "LibraryAdmin/DeleteAdapter": frozenset({"admin"}),
    "LibraryAdmin/Calibrate": frozenset({"admin"}),
    "LibraryAdmin/ExportScorer": frozenset({"admin"}),
}


@dataclass(frozen=True)
class Principal:
    """Who is calling: a name, roles, and glob patterns over library and adapter names."""

    name: str
    roles: frozenset[str]
    libraries: tuple[str, ...] = ("*",)
    adapters: tuple[str, ...] = ("*",)
    quota: Quota | None = None

    @property
    def unrestricted(self) -> bool:
        return self.adapters == ("*",)

    def may_see_library(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.libraries)

    def may_use_adapter(self, name: str) -> bool:
        return self.unrestricted or any(fnmatch.fnmatchcase(name, p) for p in self.adapters)

    def visible(self, names: Iterable[str]) -> list[str]:
        return [n for n in names if self.may_use_adapter(n)]


OPEN = Principal(name="anonymous (open server)", roles=frozenset(ROLES))


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


_MAX_NAME = 256                 # characters of an entry's name and of an mtls cn/san


def _patterns(entry: dict, key: str, where: str) -> tuple[str, ...]:
    pats = entry.get(key, ["*"])
    if not isinstance(pats, list) or not pats or not all(isinstance(p, str) and p for p in pats):
        raise InvalidArgumentError("must be a non-empty list of glob patterns",
                                   field=f"{where}.{key}", actual=pats)
    return tuple(pats)


@dataclass(frozen=True)
class CertRule:
    """Which verified client certificates an ``mtls`` entry admits (exact matches)."""

    cn: str | None = None
    san: str | None = None

    def matches(self, cns: frozenset[str], sans: frozenset[str]) -> bool:
        return (self.cn is None or self.cn in cns) and (self.san is None or self.san in sans)


@dataclass(frozen=True)
class Identities:
    """One tokens file, parsed. Swapped whole on reload, so a call sees the old or the new."""

    by_digest: Mapping[str, Principal]
    by_cert: tuple[tuple[CertRule, Principal], ...] = ()

    def names(self) -> set[str]:
        return {p.name for p in self.by_digest.values()} | {p.name for _, p in self.by_cert}


def _cert_rule(entry: dict, where: str) -> CertRule:
    m = entry["mtls"]
    ok = (isinstance(m, dict) and m and set(m) <= {"cn", "san"}
          and all(isinstance(v, str) and 0 < len(v) <= _MAX_NAME for v in m.values()))
    if not ok:
        raise InvalidArgumentError('mtls must be {"cn": ..., "san": ...} (one or both, non-empty strings)',
                                   field=f"{where}.mtls")
    return CertRule(cn=m.get("cn"), san=m.get("san"))


def parse_tokens(doc: object) -> Identities:
    """The callers a tokens-file document admits; raises InvalidArgumentError naming the entry."""
    entries = doc.get("tokens") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise InvalidArgumentError('tokens file must be {"tokens": [...]}', field="tokens_file")
    by_digest: dict[str, Principal] = {}
    by_cert: dict[CertRule, Principal] = {}
    for i, e in enumerate(entries):
        where = f"tokens[{i}]"
        if not isinstance(e, dict) or ("sha256" in e) == ("mtls" in e):
            raise InvalidArgumentError('each entry is an object with either "sha256" or "mtls"', field=where)
        roles = e.get("roles")
        if not isinstance(roles, list) or not roles or not set(map(str, roles)) <= set(ROLES):
            raise InvalidArgumentError(f"roles must be a non-empty subset of {ROLES}",
                                       field=f"{where}.roles", actual=roles)
        name = e.get("name") or f"token-{i}"
        if not isinstance(name, str) or len(name) > _MAX_NAME:
            raise InvalidArgumentError(f"name must be a string of at most {_MAX_NAME} characters",
                                       field=f"{where}.name")
        quota = Quota.parse(e.get("quota"), field=f"{where}.quota")
        if quota is not None and not e.get("name"):   # the name is the quota account
            raise InvalidArgumentError("an entry with a quota needs a name", field=f"{where}.name")
        principal = Principal(name=name, roles=frozenset(roles), libraries=_patterns(e, "libraries", where),
                              adapters=_patterns(e, "adapters", where), quota=quota)
        if "mtls" in e:
            rule = _cert_rule(e, where)
            if rule in by_cert:
                raise InvalidArgumentError("duplicate mtls rule", field=f"{where}.mtls")
            by_cert[rule] = principal
            continue
        digest = str(e["sha256"]).lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise InvalidArgumentError("sha256 must be 64 hex digits", field=f"{where}.sha256")
        if digest in by_digest:
            raise InvalidArgumentError("duplicate token", field=f"{where}.sha256")
        by_digest[digest] = principal
    return Identities(by_digest=MappingProxyType(by_digest), by_cert=tuple(by_cert.items()))


def read_tokens_file(path: str | os.PathLike[str]) -> Identities:
    try:
        doc = json.loads(Path(path).read_bytes().decode("utf-8"))
    except OSError as e:
        raise FailedPreconditionError(f"cannot read {path}: {e.strerror}", field="tokens_file") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise InvalidArgumentError(f"not JSON ({type(e).__name__}: {str(e)[:200]})", field="tokens_file") from None
    return parse_tokens(doc)


def _stamp(path: Path) -> tuple | None:
    """What tells a rewritten file from the one we read (None: cannot stat it)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _texts(peer_identity: Mapping | None, key: str) -> frozenset[str]:
    values = (peer_identity or {}).get(key) or ()
    return frozenset(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values)


def _has_certificate(peer_identity: Mapping | None) -> bool:
    return bool(peer_identity and (peer_identity.get("x509_common_name")
                                   or peer_identity.get("x509_subject_alternative_name")))


class Authenticator:
    """Maps a call's bearer token or verified client certificate to a Principal."""

    def __init__(self, principals_by_digest: Mapping[str, Principal] | None, *,
                 certs: Sequence[tuple[CertRule, Principal]] = (), source: str | os.PathLike[str] | None = None,
                 audit=NO_AUDIT, poll_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        # None: open server
        self._ids = None if principals_by_digest is None else Identities(
            MappingProxyType(dict(principals_by_digest)), tuple(certs))
        self._source = Path(source) if source is not None else None
        self._stamp = _stamp(self._source) if self._source is not None else None
        self.audit = audit
        self._poll_s, self._clock = poll_s, clock
        self._next_check = clock() + poll_s
        self._reload_lock = threading.RLock()

    @property
    def open(self) -> bool:
        return self._ids is None

    @classmethod
    def open_server(cls) -> "Authenticator":
        return cls(None)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **kw) -> "Authenticator":
        """Callers from a tokens file, reloaded on ``reload()`` and on change (see module doc)."""
        stamp = _stamp(Path(path))       # before reading: a change while we read is seen next time
        ids = read_tokens_file(path)
        auth = cls(ids.by_digest, certs=ids.by_cert, source=path, **kw)
        auth._stamp = stamp
        return auth

    # ------------------------------------------------------------------ reloading
    def reload(self, *, trigger: str = "SIGHUP") -> bool:
        """Read the tokens file again; on failure keep the current callers. Never raises."""
        if self._source is None:
            return False
        with self._reload_lock:
            stamp = _stamp(self._source)
            try:
                ids = read_tokens_file(self._source)
            except SeqrError as e:
                self._stamp = stamp      # retried when the file changes again, not every poll
                log.error("tokens file reload failed; keeping the previous callers",
                          extra={"trigger": trigger, "tokens_file": str(self._source), "error": str(e)})
                self.audit.note({"event": "identity.reload", "trigger": trigger, "code": e.code,
                                 "error": str(e), "tokens_file": str(self._source)})
                return False
            old = self._ids.names() if self._ids is not None else set()
            self._ids, self._stamp = ids, stamp
        new = ids.names()
        change = {"trigger": trigger, "tokens": len(ids.by_digest), "certificates": len(ids.by_cert),
                  "added": sorted(new - old), "removed": sorted(old - new)}
        log.info("tokens file reloaded", extra=change)
        self.audit.note({"event": "identity.reload", "code": "OK", **change})
        return True

    def _poll(self) -> None:
        now = self._clock()
        if now < self._next_check or not self._reload_lock.acquire(blocking=False):
            return
        try:
            self._next_check = now + self._poll_s
            if _stamp(self._source) != self._stamp:
                self.reload(trigger="change")
        finally:
            self._reload_lock.release()

    # ------------------------------------------------------------------ per call
    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]], method: str, *,
                     peer_identity: Mapping[str, Sequence[bytes]] | None = None) -> Principal:
        """The caller's Principal for ``method`` ("Router/Route"); raises if not allowed.
        ``peer_identity`` is grpc's ``context.auth_context()`` (verified certificate fields)."""
        if self._source is not None:
            self._poll()
        ids = self._ids
        if ids is None:
            return OPEN
        header = next((v for k, v in metadata if k == "authorization"), None)
        if isinstance(header, bytes):
            header = header.decode("latin-1")
        if header is None and ids.by_cert and _has_certificate(peer_identity):
            principal = self._by_certificate(ids, peer_identity)
        elif not header or not header.startswith("Bearer "):
            raise UnauthenticatedError("missing bearer token (metadata 'authorization: Bearer <token>')",
                                       field="authorization")
        else:
            # Lookup by digest: the secret is never compared byte by byte, so timing reveals nothing.
            principal = ids.by_digest.get(token_digest(header[len("Bearer "):].strip()))
            if principal is None:
                raise UnauthenticatedError("unknown bearer token", field="authorization")
        allowed = METHOD_ROLES.get(method, frozenset({"admin"}))
        if not principal.roles & allowed:
            err = PermissionDeniedError(f"roles {sorted(principal.roles)} may not call {method}",
                                        field="authorization", limit=sorted(allowed))
            err.principal = principal    # for the audit record (see refused); never sent to the caller
            raise err
        return principal

    @staticmethod
    def _by_certificate(ids: Identities, peer_identity: Mapping) -> Principal:
        cns = _texts(peer_identity, "x509_common_name")
        sans = _texts(peer_identity, "x509_subject_alternative_name")
        found = {p for rule, p in ids.by_cert if rule.matches(cns, sans)}
        if len(found) != 1:
            raise UnauthenticatedError("the client certificate matches no caller in the tokens file" if not found
                                       else "the client certificate matches several callers in the tokens file",
                                       field="authorization")
        return found.pop()

    def refused(self, method: str, error: SeqrError, *, peer: str | None, principal: Principal | None) -> None:
        """Audit a call refused for who it is (UNAUTHENTICATED / PERMISSION_DENIED)."""
        if error.code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
            who = principal or getattr(error, "principal", None)
            self.audit.auth_failure(method, error.message, peer, principal=who, code=error.code)


def new_token_entry(*, name: str, roles: Sequence[str], libraries: Sequence[str] = ("*",),
                    adapters: Sequence[str] = ("*",), quota: Quota | None = None) -> tuple[str, dict]:
    """A fresh random token and the tokens-file entry that admits it (only its digest)."""
    if not roles or not set(roles) <= set(ROLES):
        raise InvalidArgumentError(f"roles must be a non-empty subset of {ROLES}", field="roles",
                                   actual=list(roles))
    token = "seqr_" + secrets.token_urlsafe(32)
    entry = {"name": name, "sha256": token_digest(token), "roles": list(roles),
             "libraries": list(libraries), "adapters": list(adapters)}
    if quota is not None and quota.to_json():
        entry["quota"] = quota.to_json()
    return token, entry


def append_token(path: str | os.PathLike[str], entry: dict) -> None:
    """Add ``entry`` to the tokens file (created 0600 if missing), atomically."""
    p = Path(path)
    doc = json.loads(p.read_text(encoding="utf-8")) if p.exists() else {"tokens": []}
    doc["tokens"].append(entry)
    tmp = p.with_name(p.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
