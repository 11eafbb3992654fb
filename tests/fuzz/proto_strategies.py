"""Hypothesis strategies for any protobuf message, built from its descriptor.

Two ways in: ``messages(desc)`` draws a whole message field by field (every scalar type at its
edges, enums out of range, repeated and map fields, nested messages to a bounded depth), and
``mutated(base)`` takes a valid message and changes a few fields anywhere in its tree (set to
an odd value, clear, append, drop, duplicate), which reaches much deeper than random messages.
Strings mostly come from a vocabulary of names the server knows, so lookups succeed and the
request gets past them. ``overrides`` replaces the strategy of a message type by full name
(the fuzz uses it for Tensor, whose bytes must roughly agree with dtype and shape to matter).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

FD = FieldDescriptor

INT64_EDGES = (0, 1, -1, 2, 127, 128, 255, 256, 2**31 - 1, 2**31, -2**31, 2**32, 2**53 + 1,
               2**62, 2**63 - 1, -2**63, -2**63 + 1)
UINT64_EDGES = (0, 1, 2, 255, 256, 2**31, 2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1)
INT32_EDGES = (0, 1, -1, 2, 127, 128, 2**31 - 1, -2**31)
UINT32_EDGES = (0, 1, 2, 64, 65, 2**31 - 1, 2**31, 2**32 - 1)
ODD_STRINGS = ("", " ", "\x00", "a\x00b", "*", "?", "[", "../../etc/passwd", "%s%n{0}", "\u202e",
               "\ufeff", "\u0301", "🙂", "\U0010ffff", "NaN", "-1", "ÄÖÜ", "a" * 129, "\n\r\t")

OVERSIZE = b"\xab" * (9 << 20)

_RANGES = {
    FD.TYPE_INT64: (-2**63, 2**63 - 1, INT64_EDGES), FD.TYPE_SINT64: (-2**63, 2**63 - 1, INT64_EDGES),
    FD.TYPE_SFIXED64: (-2**63, 2**63 - 1, INT64_EDGES), FD.TYPE_UINT64: (0, 2**64 - 1, UINT64_EDGES),
    FD.TYPE_FIXED64: (0, 2**64 - 1, UINT64_EDGES), FD.TYPE_INT32: (-2**31, 2**31 - 1, INT32_EDGES),
    FD.TYPE_SINT32: (-2**31, 2**31 - 1, INT32_EDGES), FD.TYPE_SFIXED32: (-2**31, 2**31 - 1, INT32_EDGES),
    FD.TYPE_UINT32: (0, 2**32 - 1, UINT32_EDGES), FD.TYPE_FIXED32: (0, 2**32 - 1, UINT32_EDGES),
}


def _repeated(fd: FieldDescriptor) -> bool:
    return fd.is_repeated


def _is_map(fd: FieldDescriptor) -> bool:
    return (fd.type == FD.TYPE_MESSAGE and _repeated(fd)
            and fd.message_type.GetOptions().map_entry)


def rarely(draw: Callable, k: int) -> bool:
    """True about once in k+1 draws. (Hypothesis favours small integers, so ``integers(0, k)
    == 0`` would be true far more often; it favours the first element of a sample too.)"""
    return draw(st.sampled_from((False,) * k + (True,)))


def huge_strings(max_len: int) -> st.SearchStrategy[str]:
    """Long strings made by repetition (drawing megabytes character by character is slow)."""
    return st.builds(lambda piece, n: (piece * (n // len(piece) + 1))[:n],
                     st.text(min_size=1, max_size=3), st.integers(256, max_len))


@dataclass
class ProtoStrategies:
    vocab: tuple[str, ...]                          # names the server knows
    max_string: int = 1 << 16                       # longest string / bytes drawn
    max_depth: int = 4
    max_items: int = 4                              # repeated/map fields, usually
    overrides: Mapping[str, st.SearchStrategy] = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ scalars
    def strings(self) -> st.SearchStrategy[str]:
        return st.one_of(st.sampled_from(self.vocab), st.sampled_from(ODD_STRINGS), st.text(max_size=40),
                         st.builds(lambda a, b: a + b, st.sampled_from(self.vocab), st.text(max_size=8)),
                         huge_strings(self.max_string))

    def blobs(self) -> st.SearchStrategy[bytes]:
        small_or_long = st.one_of(st.binary(max_size=64), st.builds(
            lambda b, n: (b * (n // len(b) + 1))[:n], st.binary(min_size=1, max_size=8),
            st.integers(64, self.max_string)))

        @st.composite
        def build(draw) -> bytes:
            # Now and then one past the servers' 8 MiB message limit (gRPC refuses it unread).
            return OVERSIZE if rarely(draw, 49) else draw(small_or_long)
        return build()

    def scalar(self, fd: FieldDescriptor) -> st.SearchStrategy:
        t = fd.type
        if t in _RANGES:
            lo, hi, edges = _RANGES[t]
            return st.one_of(st.sampled_from(edges), st.integers(lo, hi), st.integers(max(lo, -2), 300))
        if t in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
            return st.one_of(st.sampled_from((0.0, -0.0, 1.0, -1.0, 1e-300, 5e-324, 1e308, 3.4e38,
                                              float("inf"), float("-inf"), float("nan"))),
                             st.floats(width=64 if t == FD.TYPE_DOUBLE else 32))
        if t == FD.TYPE_BOOL:
            return st.booleans()
        if t == FD.TYPE_STRING:
            return self.strings()
        if t == FD.TYPE_BYTES:
            return self.blobs()
        if t == FD.TYPE_ENUM:
            known = sorted(v.number for v in fd.enum_type.values)
            return st.one_of(st.sampled_from(known), st.sampled_from((-1, max(known) + 1, 2**31 - 1, -2**31)),
                             st.integers(-2**31, 2**31 - 1))
        raise TypeError(f"no strategy for field type {t} ({fd.full_name})")

    def value(self, fd: FieldDescriptor, depth: int) -> st.SearchStrategy:
        """One value of ``fd`` (one element when repeated)."""
        if fd.type == FD.TYPE_MESSAGE:
            return self.message(fd.message_type, depth + 1)
        return self.scalar(fd)

    # ------------------------------------------------------------------ messages
    def message(self, desc: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
        if desc.full_name in self.overrides:
            return self.overrides[desc.full_name]
        key = (desc.full_name, min(depth, self.max_depth))
        if key not in self._cache:
            self._cache[key] = st.deferred(lambda: self._build(desc, depth))
        return self._cache[key]

    def _build(self, desc: Descriptor, depth: int) -> st.SearchStrategy[Message]:
        cls = message_class(desc)
        if depth >= self.max_depth:
            return st.just(cls())

        @st.composite
        def build(draw) -> Message:
            msg = cls()
            for fd in desc.fields:
                if rarely(draw, 2):         # leave about a third of fields unset
                    continue
                self.set_field(draw, msg, fd, depth)
            return msg
        return build()

    def set_field(self, draw: Callable, msg: Message, fd: FieldDescriptor, depth: int) -> None:
        """Give ``msg.fd`` a drawn value. Repeated and map fields get a few drawn elements, or
        past a server limit (65, 1025) copies of one drawn element: drawing each is slow."""
        if not _repeated(fd):
            if fd.type == FD.TYPE_MESSAGE:
                getattr(msg, fd.name).CopyFrom(draw(self.value(fd, depth)))
            else:
                setattr(msg, fd.name, draw(self.scalar(fd)))
            return
        n = draw(self.counts())
        few = min(n, self.max_items)
        target = getattr(msg, fd.name)
        if _is_map(fd):
            kfd, vfd = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
            keys = [draw(self.scalar(kfd)) for _ in range(few)]
            vals = [draw(self.value(vfd, depth)) for _ in range(max(few, 1))]
            n = self._copies(n, few, vals[-1])
            if n > few:
                keys += [f"{keys[-1] if keys else ''}{i}" for i in range(n - few)]
            for i, k in enumerate(keys):
                v = vals[min(i, len(vals) - 1)]
                if vfd.type == FD.TYPE_MESSAGE:
                    target[k].CopyFrom(v)
                else:
                    target[k] = v
            return
        vals = [draw(self.value(fd, depth)) for _ in range(max(few, 1))]
        n = self._copies(n, few, vals[-1])
        vals = (vals + [vals[-1]] * (n - len(vals)))[:n]
        if fd.type == FD.TYPE_MESSAGE:
            for v in vals:
                target.add().CopyFrom(v)
        else:
            target.extend(vals)

    def _copies(self, n: int, few: int, item) -> int:
        """``n`` capped so the copies of ``item`` stay within max_string bytes: counts past a
        limit are the point, not gigabyte messages (protobuf cannot even serialize 2 GiB)."""
        if n <= few:
            return n
        size = item.ByteSize() if isinstance(item, Message) else len(item) if isinstance(item, (str, bytes)) else 8
        return max(few, min(n, self.max_string // max(size, 1)))

    def counts(self) -> st.SearchStrategy[int]:
        return st.one_of(st.integers(0, self.max_items), st.integers(0, self.max_items),
                         st.sampled_from((65, 1025)))

    # ------------------------------------------------------------------ mutations
    def mutated(self, base: st.SearchStrategy[Message], *, max_ops: int = 3) -> st.SearchStrategy[Message]:
        """``base`` with 1..max_ops field-level changes anywhere in its tree."""
        @st.composite
        def mutate(draw) -> Message:
            msg = draw(base)
            out = type(msg)()
            out.CopyFrom(msg)
            for _ in range(draw(st.integers(1, max_ops))):
                self.mutate_once(draw, out)
            return out
        return mutate()

    def mutate_once(self, draw: Callable, root: Message) -> None:
        sites = list(_sites(root, depth=0, max_depth=self.max_depth))
        if not sites:                       # a message without fields (ListLibrariesRequest)
            return
        parent, fd, depth = draw(st.sampled_from(sites))
        if _is_map(fd):
            target = getattr(parent, fd.name)
            keys = list(target.keys())
            op = draw(st.sampled_from(("add", "drop", "rekey") if keys else ("add",)))
            if op == "drop":
                del target[draw(st.sampled_from(keys))]
            elif op == "rekey":
                k = draw(st.sampled_from(keys))
                v = target[k]
                new = draw(self.scalar(fd.message_type.fields_by_name["key"]))
                if fd.message_type.fields_by_name["value"].type == FD.TYPE_MESSAGE:
                    kept = type(v)()
                    kept.CopyFrom(v)
                    del target[k]
                    target[new].CopyFrom(kept)
                else:
                    del target[k]
                    target[new] = v
            else:
                self.set_field(draw, parent, fd, depth)
        elif _repeated(fd):
            target = getattr(parent, fd.name)
            n = len(target)
            op = draw(st.sampled_from(("append", "drop", "dup", "clear") if n else ("append",)))
            if op == "drop":
                del target[draw(st.integers(0, n - 1))]
            elif op == "dup":
                item = target[draw(st.integers(0, n - 1))]
                if fd.type == FD.TYPE_MESSAGE:
                    target.add().CopyFrom(item)
                else:
                    target.append(item)
            elif op == "clear":
                del target[:]
            elif fd.type == FD.TYPE_MESSAGE:
                target.add().CopyFrom(draw(self.value(fd, depth)))
            else:
                target.append(draw(self.scalar(fd)))
        elif rarely(draw, 4):
            parent.ClearField(fd.name)
        else:
            self.set_field(draw, parent, fd, depth)


def _sites(msg: Message, *, depth: int, max_depth: int):
    """(parent, field, depth) for every field of ``msg`` and of its present sub-messages."""
    for fd in msg.DESCRIPTOR.fields:
        yield msg, fd, depth
        if depth >= max_depth or fd.type != FD.TYPE_MESSAGE:
            continue
        if _is_map(fd):
            if fd.message_type.fields_by_name["value"].type == FD.TYPE_MESSAGE:
                for v in getattr(msg, fd.name).values():
                    yield from _sites(v, depth=depth + 1, max_depth=max_depth)
        elif _repeated(fd):
            for v in getattr(msg, fd.name):
                yield from _sites(v, depth=depth + 1, max_depth=max_depth)
        elif msg.HasField(fd.name):
            yield from _sites(getattr(msg, fd.name), depth=depth + 1, max_depth=max_depth)


def message_class(desc: Descriptor) -> type[Message]:
    from google.protobuf import message_factory
    return message_factory.GetMessageClass(desc)
