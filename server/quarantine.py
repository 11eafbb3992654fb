"""Quarantine: a damaged stored adapter is set aside instead of taking its library down.

Loading a library reads each adapter through :func:`guarded`. When the stored bytes are
unusable - they fail authentication (a flipped bit, a truncated or swapped blob), a blob is
missing, or the decrypted files no longer parse - the adapter becomes a :class:`Damage` record:
it is never routed, callers who may see it see it as damaged, callers who may not see it learn
nothing, and deleting it works (deletion never reads the blobs). Errors that say the *service*
cannot read right now (UNAVAILABLE: I/O errors, a closed store) or is misconfigured
(FAILED_PRECONDITION: a missing key) are not damage and still fail the load.

What stays fatal for a whole library: its meta and shared A (nothing can be routed without
them). A damaged calibration object is quarantined too: the library routes uncalibrated, with
the ``frobenius`` fallback every response already reports, until the next Calibrate replaces it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping, TypeVar

from seqr_core.errors import (InvalidArgumentError, IntegrityError, LimitExceededError, NotFoundError,
                              SeqrError)

log = logging.getLogger("seqr.quarantine")

T = TypeVar("T")

# What stored data that can never load again raises: tampering or loss (DATA_LOSS), or bytes
# that authenticate but no longer parse or fit the library (they were valid when stored).
DAMAGE_ERRORS = (IntegrityError, InvalidArgumentError, LimitExceededError, NotFoundError)
_MAX_REASON = 300


@dataclass(frozen=True)
class Damage:
    """Why a stored object is quarantined: its error's status code and a short reason."""

    code: str
    reason: str

    @classmethod
    def of(cls, err: SeqrError) -> "Damage":
        text = f"{err.code}: {err}"
        return cls(code=err.code, reason=text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "...")


@dataclass(frozen=True)
class LibraryDamage:
    """A library's quarantined parts: adapters by name and library objects by role."""

    adapters: Mapping[str, Damage] = field(default_factory=lambda: MappingProxyType({}))
    objects: Mapping[str, Damage] = field(default_factory=lambda: MappingProxyType({}))

    def __bool__(self) -> bool:
        return bool(self.adapters or self.objects)

    def with_adapter(self, name: str, damage: Damage) -> "LibraryDamage":
        return LibraryDamage(MappingProxyType({**self.adapters, name: damage}), self.objects)

    def without_adapter(self, name: str) -> "LibraryDamage":
        return LibraryDamage(MappingProxyType({n: d for n, d in self.adapters.items() if n != name}),
                             self.objects)

    def without_object(self, role: str) -> "LibraryDamage":
        return LibraryDamage(self.adapters,
                             MappingProxyType({r: d for r, d in self.objects.items() if r != role}))


def guarded(load: Callable[[], T], *, library: str, what: str,
            transient: tuple[type[Exception], ...] = ()) -> T | Damage:
    """``load()``, or the Damage that quarantines ``what`` when its stored data is unusable.

    The one place that decides what counts as damage; every read of one stored adapter or
    object after startup goes through it too (see LibraryManager.scrub).
    """
    try:
        return load()
    except transient:       # the caller retries (a follower whose store moved on mid-read)
        raise
    except DAMAGE_ERRORS as err:
        damage = Damage.of(err)
        # The log is the operator's: it names the object, which callers may not be shown.
        log.error("quarantined damaged stored data", extra={"library": library, "object": what,
                                                            "code": damage.code, "error": damage.reason})
        return damage
