"""Bound every caller-supplied string of a request before anything else looks at it.

``check_request(msg, limits=...)`` walks every string field of any request message through
its descriptor (singular, repeated, map keys and values, nested messages; bytes are not
strings) and refuses with INVALID_ARGUMENT naming the proto field path (``inputs[3].module``,
``options.candidates[0]``, ``meta[owner]``) when a string is too long or has a character its
kind does not allow. Everything downstream (errors, logs, metrics labels, the store) then only
ever sees short, clean strings.

Kinds:
* names (the default, so a field added later is strict until someone decides otherwise):
  at most ``max_name_length`` characters of ``[A-Za-z0-9._:/@+=-]``. That covers module
  paths (``model.layers.0.self_attn.q_proj``, ``transformer.h.0.attn.c_attn``), PEFT file
  names (``adapter_model.safetensors``), hex digests, HF ids (``org/Model-7B``) and
  tensor names; it excludes spaces, quotes, control and non-ASCII characters.
* text (``TEXT_FIELDS``): printable Unicode (no control, format or separator characters
  other than the space), at most its own limit: the free-form base-model name and meta values.

Cost: the plan for each message type is built once; a request is checked by collecting its
strings and testing them together (one ``max(len)``, then deleting the allowed bytes from their
concatenation must leave nothing). Only a request that fails is walked again to name the field.
Measured (bench/request_bounds_bench.py): 26 µs for a Route with 60 modules and 30 tensors.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from itertools import chain
from operator import attrgetter
from typing import Callable

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from seqr_core.errors import InvalidArgumentError

from .config import Limits

NAME_CHARS = "A-Za-z0-9._:/@+=-"
_NAME_BYTES = (string.ascii_letters + string.digits + "._:/@+=-").encode()
_BAD_NAME_CHAR = re.compile(f"[^{NAME_CHARS}]").search

NAME, BASE_MODEL, META_VALUE = "name", "base_model", "meta_value"
# Full proto names of the fields (maps: of the map field, for its values) that hold free text.
TEXT_FIELDS = {
    "seqr_router.v1.Signature.base_model": BASE_MODEL,
    "seqr_router.v1.CreateLibraryRequest.meta": META_VALUE,
    "seqr_router.v1.PutAdapterHeader.meta": META_VALUE,
}

_STR, _STRS, _MSG, _MSGS, _MAP = range(5)


@dataclass(frozen=True)
class _Field:
    name: str
    shape: int                  # _STR, _STRS, _MSG, _MSGS or _MAP
    kind: str | None            # kind of the string(s); for maps of the values when they are strings
    sub: tuple | None = None    # plan of the (map value) message
    key_is_str: bool = False    # maps only
    # Repeated messages whose strings are all singular names (ModuleInput): one C-level
    # getter per element instead of the generic walk (a Route with 60 modules: 2x faster).
    flat: Callable | None = None


_PLANS: dict[str, tuple[_Field, ...]] = {}


def _plan(desc: Descriptor, visiting: frozenset = frozenset()) -> tuple[_Field, ...]:
    """The string-bearing fields of ``desc``; message fields without strings are left out."""
    cached = _PLANS.get(desc.full_name)
    if cached is not None:
        return cached
    if desc.full_name in visiting:      # our protos have none; fail loudly should one appear
        raise TypeError(f"recursive message {desc.full_name} is not supported")
    visiting = visiting | {desc.full_name}
    plan = []
    for fd in desc.fields:
        kind = TEXT_FIELDS.get(fd.full_name, NAME)
        if fd.type == FieldDescriptor.TYPE_STRING:
            plan.append(_Field(fd.name, _STRS if fd.is_repeated else _STR, kind))
        elif fd.type == FieldDescriptor.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry:
            key, value = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
            key_is_str = key.type == FieldDescriptor.TYPE_STRING
            value_kind = kind if value.type == FieldDescriptor.TYPE_STRING else None
            sub = _plan(value.message_type, visiting) if value.type == FieldDescriptor.TYPE_MESSAGE else None
            if key_is_str or value_kind or sub:
                plan.append(_Field(fd.name, _MAP, value_kind, sub or None, key_is_str))
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            sub = _plan(fd.message_type, visiting)
            if sub:
                flat = None
                if fd.is_repeated and all(s.shape == _STR and s.kind == NAME for s in sub):
                    flat = attrgetter(*(s.name for s in sub))
                    flat = flat if len(sub) > 1 else (lambda m, g=flat: (g(m),))
                plan.append(_Field(fd.name, _MSGS if fd.is_repeated else _MSG, None, sub, flat=flat))
    _PLANS[desc.full_name] = out = tuple(plan)
    return out


def check_request(msg: Message, *, limits: Limits) -> None:
    """Refuse ``msg`` (INVALID_ARGUMENT naming the field) if any string in it is out of bounds."""
    plan = _plan(msg.DESCRIPTOR)
    if not plan:
        return
    names: list[str] = []
    texts: list[tuple[str, str]] = []
    _collect(msg, plan, names, texts)
    if _names_ok(names, limits) and all(_text_ok(s, k, limits) for s, k in texts):
        return
    _find(msg, plan, "", limits)
    # _find raises for whatever the fast check refused; should the two ever disagree, refuse.
    raise InvalidArgumentError("a string field is out of bounds", field="")


def _names_ok(names: list[str], limits: Limits) -> bool:
    # Length first: a 60 MB name must not be copied into the joined string. Then the charset
    # of all names at once: deleting the allowed bytes must leave nothing.
    if not names or max(map(len, names)) > limits.max_name_length:
        return not names
    joined = "".join(names)
    return joined.isascii() and not joined.encode("ascii").translate(None, _NAME_BYTES)


def _limit(kind: str, limits: Limits) -> int:
    return limits.max_meta_value_length if kind == META_VALUE else limits.max_name_length


def _text_ok(s: str, kind: str, limits: Limits) -> bool:
    return len(s) <= _limit(kind, limits) and s.isprintable()


def _add(s: str, kind: str, names: list, texts: list) -> None:
    if kind == NAME:
        names.append(s)
    else:
        texts.append((s, kind))


def _collect(msg: Message, plan: tuple[_Field, ...], names: list, texts: list) -> None:
    for f in plan:
        if f.shape == _MSG:
            if msg.HasField(f.name):
                _collect(getattr(msg, f.name), f.sub, names, texts)
            continue
        v = getattr(msg, f.name)
        if f.shape == _STR:
            if v:
                _add(v, f.kind, names, texts)
        elif f.shape == _STRS:
            if f.kind == NAME:
                names.extend(v)
            else:
                texts.extend((s, f.kind) for s in v)
        elif f.flat is not None:
            names.extend(chain.from_iterable(map(f.flat, v)))
        elif f.shape == _MSGS:
            for m in v:
                _collect(m, f.sub, names, texts)
        else:   # map
            if f.key_is_str:
                names.extend(v)
            if f.kind is not None:
                for s in v.values():
                    _add(s, f.kind, names, texts)
            elif f.sub is not None:
                for m in v.values():
                    _collect(m, f.sub, names, texts)


def _check_one(s: str, kind: str, path: str, limits: Limits, *, what: str = "") -> None:
    """``what`` prefixes the message for map keys: their path names the map, not the (bad) key."""
    limit = _limit(kind, limits)
    if len(s) > limit:
        raise InvalidArgumentError(f"{what}longer than {limit} characters", field=path, limit=limit,
                                   actual=len(s))
    if kind == NAME:
        bad = _BAD_NAME_CHAR(s)
        if bad is not None:
            raise InvalidArgumentError(f"{what}names may only use [{NAME_CHARS}]", field=path,
                                       limit=NAME_CHARS, actual=f"{bad.group()!r} at {bad.start()}")
    elif not s.isprintable():
        pos = next(i for i, c in enumerate(s) if not c.isprintable())
        raise InvalidArgumentError("must be printable text (no control, format or separator characters)",
                                   field=path, actual=f"{s[pos]!r} at {pos}")


def _find(msg: Message, plan: tuple[_Field, ...], prefix: str, limits: Limits) -> None:
    """The slow walk: raise for the first bad string, with its field path."""
    for f in plan:
        path = f"{prefix}{f.name}"
        v = getattr(msg, f.name)
        if f.shape == _STR:
            _check_one(v, f.kind, path, limits)
        elif f.shape == _STRS:
            for i, s in enumerate(v):
                _check_one(s, f.kind, f"{path}[{i}]", limits)
        elif f.shape == _MSG:
            if msg.HasField(f.name):
                _find(v, f.sub, f"{path}.", limits)
        elif f.shape == _MSGS:
            for i, m in enumerate(v):
                _find(m, f.sub, f"{path}[{i}].", limits)
        else:
            # Keys first: a key that passes is short and clean, so it can name its value.
            if f.key_is_str:
                for k in v:
                    _check_one(k, NAME, path, limits, what="map key: ")
            for k in v:
                if f.kind is not None:
                    _check_one(v[k], f.kind, f"{path}[{k}]", limits)
                elif f.sub is not None:
                    _find(v[k], f.sub, f"{path}[{k}].", limits)
