"""Bearer-token authentication, roles and adapter ACLs (DESIGN §4).

Tokens file (JSON; stores only SHA-256 digests of the tokens, so reading it grants nothing)::

    {"tokens": [
      {"name": "vllm-host-a", "sha256": "<hex>", "roles": ["route"],
       "libraries": ["prod-*"], "adapters": ["team-a-*", "shared-*"]},
      {"name": "ops", "sha256": "<hex>", "roles": ["admin"],
       "quota": {"libraries": 5, "adapters": 50, "bytes": 1073741824}}
    ]}

Roles: ``route`` (Route, RouteStream, DescribeLibrary), ``observer`` (DescribeLibrary,
ListLibraries, ListAdapters), ``admin`` (everything). ``libraries`` and ``adapters`` are glob
patterns (fnmatch, case-sensitive; default ``*``). A caller is only ever routed among the
adapters it may use, and hidden libraries and adapters look exactly like absent ones.
Without a tokens file the server is open (every caller is admin on everything) and says so
loudly at startup. ``quota`` (optional, see quotas.py) limits what the principal may own.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from seqr_core.errors import (FailedPreconditionError, InvalidArgumentError, PermissionDeniedError,
                              UnauthenticatedError)

from .quotas import Quota

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


def _patterns(entry: dict, key: str, where: str) -> tuple[str, ...]:
    pats = entry.get(key, ["*"])
    if not isinstance(pats, list) or not pats or not all(isinstance(p, str) and p for p in pats):
        raise InvalidArgumentError("must be a non-empty list of glob patterns",
                                   field=f"{where}.{key}", actual=pats)
    return tuple(pats)


class Authenticator:
    """Maps a request's ``authorization: Bearer <token>`` metadata to a Principal."""

    def __init__(self, principals_by_digest: dict[str, Principal] | None):
        self._by_digest = principals_by_digest  # None: open server

    @property
    def open(self) -> bool:
        return self._by_digest is None

    @classmethod
    def open_server(cls) -> "Authenticator":
        return cls(None)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> "Authenticator":
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise FailedPreconditionError(f"cannot read {path}: {e.strerror}", field="tokens_file") from None
        except json.JSONDecodeError as e:
            raise InvalidArgumentError(f"not JSON ({e})", field="tokens_file") from None
        entries = doc.get("tokens") if isinstance(doc, dict) else None
        if not isinstance(entries, list):
            raise InvalidArgumentError('tokens file must be {"tokens": [...]}', field="tokens_file")
        out: dict[str, Principal] = {}
        for i, e in enumerate(entries):
            where = f"tokens[{i}]"
            digest = str(e.get("sha256", "")).lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise InvalidArgumentError("sha256 must be 64 hex digits", field=f"{where}.sha256")
            roles = e.get("roles")
            if not isinstance(roles, list) or not roles or not set(roles) <= set(ROLES):
                raise InvalidArgumentError(f"roles must be a non-empty subset of {ROLES}",
                                           field=f"{where}.roles", actual=roles)
            if digest in out:
                raise InvalidArgumentError("duplicate token", field=f"{where}.sha256")
            quota = Quota.parse(e.get("quota"), field=f"{where}.quota")
            if quota is not None and not e.get("name"):   # the name is the quota account
                raise InvalidArgumentError("an entry with a quota needs a name", field=f"{where}.name")
            out[digest] = Principal(name=str(e.get("name") or f"token-{i}"), roles=frozenset(roles),
                                    libraries=_patterns(e, "libraries", where),
                                    adapters=_patterns(e, "adapters", where), quota=quota)
        return cls(out)

    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]], method: str, *,
                     peer_identity: dict | None = None) -> Principal:
        """The caller's Principal for ``method`` ("Router/Route"); raises if not allowed."""
        if self._by_digest is None:
            return OPEN
        header = next((v for k, v in metadata if k == "authorization"), None)
        if isinstance(header, bytes):
            header = header.decode("latin-1")
        if not header or not header.startswith("Bearer "):
            raise UnauthenticatedError("missing bearer token (metadata 'authorization: Bearer <token>')",
                                       field="authorization")
        # Lookup by digest: the secret is never compared byte by byte, so timing reveals nothing.
        principal = self._by_digest.get(token_digest(header[len("Bearer "):].strip()))
        if principal is None:
            raise UnauthenticatedError("unknown bearer token", field="authorization")
        allowed = METHOD_ROLES.get(method, frozenset({"admin"}))
        if not principal.roles & allowed:
            raise PermissionDeniedError(f"roles {sorted(principal.roles)} may not call {method}",
                                        field="authorization", limit=sorted(allowed))
        return principal


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
