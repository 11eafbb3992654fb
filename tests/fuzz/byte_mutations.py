"""Byte-level mutations of valid serialized requests, and of client streams as a whole.

The messages go out raw (identity serializers), so the server's deserializer sees what a
hostile peer could send: flipped bits, cut varints, lengths that lie, fields spliced in from
another request, and streams with messages dropped, repeated or reordered.
"""

from __future__ import annotations

from hypothesis import strategies as st

_INTERESTING = (b"\x00", b"\xff", b"\x7f", b"\x80", b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
                b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01", b"\x0a\xff\xff\xff\xff\x0f",
                b"\x12\x00", b"\x08\x80\x80\x80\x80\x80\x80\x80\x80\x01")


def _pick(draw, items: list):
    return items[draw(st.integers(0, len(items) - 1))]


def _mutate(draw, data: bytearray, pool: list[bytes]) -> None:
    n = len(data)
    op = draw(st.sampled_from(("flip", "set", "truncate", "insert", "delete", "splice", "dup",
                               "interesting")))
    pos = draw(st.integers(0, max(n - 1, 0)))
    if op == "flip" and n:
        data[pos] ^= 1 << draw(st.integers(0, 7))
    elif op == "set" and n:
        data[pos] = draw(st.integers(0, 255))
    elif op == "truncate":
        del data[draw(st.integers(0, n)):]
    elif op == "insert":
        data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
    elif op == "delete" and n:
        del data[pos: pos + draw(st.integers(1, 16))]
    elif op == "splice":
        other = _pick(draw, pool)
        a = draw(st.integers(0, len(other)))
        b = draw(st.integers(a, len(other)))
        data[pos:pos] = other[a:b]
    elif op == "dup" and n:
        end = draw(st.integers(pos, n))
        data[end:end] = data[pos:end]
    else:
        data[pos:pos] = draw(st.sampled_from(_INTERESTING))


def mutated_bytes(seeds: list[bytes], *, max_ops: int = 4) -> st.SearchStrategy[bytes]:
    """One of ``seeds`` with 1..max_ops mutations (splices take pieces of the other seeds)."""
    @st.composite
    def build(draw) -> bytes:
        data = bytearray(_pick(draw, seeds))
        for _ in range(draw(st.integers(1, max_ops))):
            _mutate(draw, data, seeds)
        return bytes(data)
    return build()


def mutated_streams(streams: list[list[bytes]], *, max_ops: int = 4) -> st.SearchStrategy[list[bytes]]:
    """A valid client stream with its messages mutated, dropped, repeated, reordered or added."""
    pool = [m for s in streams for m in s]

    @st.composite
    def build(draw) -> list[bytes]:
        msgs = [bytearray(m) for m in _pick(draw, streams)]
        for _ in range(draw(st.integers(1, max_ops))):
            op = draw(st.sampled_from(("bytes", "bytes", "bytes", "drop", "repeat", "swap", "add", "empty")))
            i = draw(st.integers(0, max(len(msgs) - 1, 0)))
            if op == "bytes" and msgs:
                _mutate(draw, msgs[i], pool)
            elif op == "drop" and msgs:
                del msgs[i]
            elif op == "repeat" and msgs:
                msgs.insert(i, bytearray(msgs[i]))
            elif op == "swap" and len(msgs) > 1:
                j = draw(st.integers(0, len(msgs) - 1))
                msgs[i], msgs[j] = msgs[j], msgs[i]
            elif op == "empty":
                msgs.insert(i, bytearray())
            else:
                msgs.insert(i, bytearray(_pick(draw, pool)))
        return [bytes(m) for m in msgs]
    return build()
