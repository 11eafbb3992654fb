"""PutAdapter's checks before the upload's bytes are read, and what an in-place replace changes.

A replace (``PutAdapterHeader.replace``) stores a new version of an existing adapter under the
same name and id. What the caller may replace is exactly what it may see: a hidden adapter
answers with the NOT_FOUND an absent one gets (as DeleteAdapter does). A quarantined (damaged)
adapter the caller can see may be replaced, which repairs it in place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from seqr_core.errors import PermissionDeniedError

from . import library_objects as lo
from .auth import Principal
from .quotas import OWNER, Usage
from .store import AdapterRecord

if TYPE_CHECKING:       # manager imports this module
    from .manager import LibraryManager, LibraryState


def upload_precheck(manager: "LibraryManager", header, principal: Principal) -> None:
    """Refuse an upload from its header alone: unknown library, ACL, replace target, quota."""
    state = manager.get_for_write(header.library, principal, field="header.library")
    nbytes = sum(f.size for f in header.files)
    if header.replace:
        old = replaced_record(state, header.name, principal)
        adding = replacement_usage(old, principal, nbytes)
        manager.check_quota(principal, adapters=adding.adapters, nbytes=adding.bytes)
        return
    if not principal.may_use_adapter(header.name):
        raise PermissionDeniedError("adapter name outside the caller's ACL", field="header.name")
    manager.check_quota(principal, adapters=1, nbytes=nbytes)


def replaced_record(state: "LibraryState", name: str, principal: Principal) -> AdapterRecord:
    """The stored adapter a replace will supersede; NotFoundError (the absent one's) when the
    caller may not see it or it does not exist."""
    if name not in state.damage.adapters or not principal.may_use_adapter(name):
        state.entry(name, principal, field="header.name")
    return state.records[name]


def replacement_usage(old: AdapterRecord, principal: Principal, nbytes: int) -> Usage:
    """What a replace adds to the caller's quota account: the size difference when it owns the
    old version, otherwise a whole adapter (the new version becomes its own)."""
    if old.meta.get(OWNER) == principal.name:
        return Usage(bytes=max(0, nbytes - old.size_bytes))
    return Usage(adapters=1, bytes=nbytes)


def calibration_objects(state: "LibraryState", name: str) -> dict[str, bytes]:
    """Library objects to rewrite in the replace's commit: the calibration without the old
    version's statistics (they describe its factors), so a restart cannot bring them back."""
    cal = state.index.calibration
    if cal is None or cal.get(name) is None:
        return {}
    ids = {e.name: e.adapter_id for e in state.index.adapters}
    return {lo.CALIBRATION: lo.encode_calibration(cal.without(name), ids)}
