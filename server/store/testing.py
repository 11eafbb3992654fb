"""Helpers for testing the store (and code built on it): byte searches and envelope surgery.

Kept in the package so the service's own tests can reuse them; nothing here is used at runtime.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .envelope import parse_header

__all__ = ["HeaderLayout", "find_needles", "header_layout", "iter_files"]


def iter_files(*roots: Path) -> Iterator[Path]:
    """Every regular file under ``roots`` (temp files included)."""
    for root in roots:
        if root.is_file():
            yield root
            continue
        for dirpath, _, names in os.walk(root):
            for name in names:
                path = Path(dirpath) / name
                if path.is_file():
                    yield path


def find_needles(needles: Iterable[bytes], *roots: Path) -> list[tuple[Path, bytes]]:
    """Which of ``needles`` occur in which file under ``roots``; empty means none leaked."""
    needles = [n for n in needles if n]
    hits = []
    for path in iter_files(*roots):
        data = path.read_bytes()
        hits.extend((path, needle) for needle in needles if needle in data)
    return hits


@dataclass(frozen=True)
class HeaderLayout:
    """Byte ranges of an envelope's fields, for precise tampering in tests."""

    magic: slice
    format_version: slice
    flags: slice
    version: slice
    key_id_len: slice
    key_id: slice
    wrapped_len: slice
    wrapped: slice
    nonce_len: slice
    nonce: slice
    body: slice


def header_layout(blob: bytes) -> HeaderLayout:
    header, body_offset = parse_header(blob, what="blob under test")
    key_id_end = 15 + len(header.key_id)
    wrapped_end = key_id_end + 2 + len(header.wrapped_key)
    return HeaderLayout(
        magic=slice(0, 4),
        format_version=slice(4, 5),
        flags=slice(5, 6),
        version=slice(6, 14),
        key_id_len=slice(14, 15),
        key_id=slice(15, key_id_end),
        wrapped_len=slice(key_id_end, key_id_end + 2),
        wrapped=slice(key_id_end + 2, wrapped_end),
        nonce_len=slice(wrapped_end, wrapped_end + 1),
        nonce=slice(wrapped_end + 1, body_offset),
        body=slice(body_offset, len(blob)),
    )
