"""LibraryAdmin servicer: parse the request, hand it to the manager, describe the result."""

from __future__ import annotations

import functools
import hashlib

from seqr_core import BaseModelSignature, Calibrator, ModuleSpec, SharedARecipe
from seqr_core.errors import InvalidArgumentError, LimitExceededError, PermissionDeniedError
from seqr_core.routing import check_inputs
from seqr_router.v1 import admin_pb2, router_pb2

from . import library_objects as lo
from . import wire
from .adapter_updates import upload_precheck
from .config import Limits
from .export import UnimplementedError, exporter
from .info import adapter_info, library_info, library_summary, list_adapters_response
from .manager import LibraryManager
from .rpc import Call

EXPORT_CHUNK = 1 << 20


class AdminService:
    def __init__(self, *, manager: LibraryManager, limits: Limits):
        self.manager, self.limits = manager, limits

    def CreateLibrary(self, request, call: Call):
        if not call.principal.may_see_library(request.name):
            raise PermissionDeniedError("library name outside the caller's ACL", field="name")
        state = self.manager.create_library(_library_spec(request, self.limits), principal=call.principal)
        return library_info(state, call.principal)

    def ListLibraries(self, request, call: Call):
        return admin_pb2.ListLibrariesResponse(libraries=[library_summary(s, call.principal)
                                                          for s in self.manager.list(call.principal)])

    async def PutAdapter(self, requests, call: Call):
        first = await anext(requests, None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidArgumentError("the first message must be the header", field="header")
        h, principal = first.header, call.principal
        # Fail before the bytes; in the pool, as a replica may look the library up in its store.
        await call.run(upload_precheck, self.manager, h, principal)
        total = _check_announced(h, self.limits)
        buf = bytearray()
        async for req in requests:
            if req.WhichOneof("part") != "chunk":
                raise InvalidArgumentError("only one header per upload", field="header")
            buf += req.chunk.data
            if len(buf) > total:
                raise InvalidArgumentError("more bytes than the header announced", field="files",
                                           limit=total, actual=len(buf))
        files = await call.run(_split_files, h, buf)
        state, entry = await call.run(functools.partial(self.manager.put_adapter, allow_general=h.allow_general,
                                                        replace=h.replace),
                                      h.library, h.name, files, dict(h.meta), principal)
        return admin_pb2.PutAdapterResponse(adapter=adapter_info(state, entry), library_version=state.version)

    def DeleteAdapter(self, request, call: Call):
        state, entry = self.manager.delete_adapter(request.library, request.name, call.principal)
        return admin_pb2.DeleteAdapterResponse(name=entry.name, adapter_id=entry.adapter_id,
                                               library_version=state.version)

    def ListAdapters(self, request, call: Call):
        return list_adapters_response(self.manager.get(request.library, call.principal), call.principal)

    async def Calibrate(self, requests, call: Call):
        first = await anext(requests, None)
        if first is None:
            raise InvalidArgumentError("no sequences in the stream", field="sequences", limit=">=1", actual=0)
        principal = call.principal
        state = self.manager.get(first.library, principal)
        index = state.index
        cal = Calibrator(index, second_order=lo.moment_bytes(state.spec) <= self.limits.max_moment_bytes)

        def update(n: int, req) -> None:
            if req.library and req.library != state.name:
                raise InvalidArgumentError("one library per Calibrate stream", field=f"sequences[{n}].library",
                                           limit=state.name, actual=req.library)
            if n >= self.limits.max_calibration_sequences:
                raise LimitExceededError("too many sequences", field="sequences",
                                         limit=self.limits.max_calibration_sequences, actual=n + 1)
            inputs = wire.decode_inputs(req.tensors, req.inputs, limits=self.limits)
            cal.update(check_inputs(index, inputs))

        await call.run(update, 0, first)
        n = 1
        async for req in requests:
            await call.run(update, n, req)
            n += 1
        fresh = cal.finish()
        for name in list(fresh.adapters):       # never fit stats for adapters the caller cannot see
            if not principal.may_use_adapter(name):
                fresh = fresh.without(name)
        pool = cal.pool() if principal.unrestricted else None   # the pool serves every adapter
        state, names = await call.run(functools.partial(self.manager.store_calibration, pool=pool),
                                      state.name, index, fresh, principal)
        return admin_pb2.CalibrateResponse(sequences=fresh.sequences, adapters=names, library_version=state.version,
                                           pooled_moments_updated=pool is not None and bool(pool.modules))

    def ExportScorer(self, request, call: Call) -> list:
        export = exporter()
        if export is None:
            raise UnimplementedError("this server was built without the ONNX exporter "
                                     "(seqr_core.onnx_export)", field="library")
        state = self.manager.get(request.library, call.principal)
        if not call.principal.unrestricted:   # the graph holds every adapter's routing index
            raise PermissionDeniedError("exporting a scorer needs access to every adapter (adapters: ['*'])",
                                        field="authorization")
        form = wire.input_form(request.form or router_pb2.ACTIVATIONS, field="form")
        with self.manager.audit.mutation(principal=call.principal, action="ExportScorer", library=state.name):
            data = export(state.index, form=form, tokens=int(request.tokens) or None)
        return [admin_pb2.ExportScorerChunk(data=data[off: off + EXPORT_CHUNK],
                                            library_version=state.version if off == 0 else 0)
                for off in range(0, max(len(data), 1), EXPORT_CHUNK)]


def _library_spec(req: admin_pb2.CreateLibraryRequest, limits: Limits) -> lo.LibrarySpec:
    if not req.signature.modules:
        raise InvalidArgumentError("a signature needs at least one module", field="signature.modules")
    lo.check_signature_shape(req.signature.modules, limits=limits)   # before anything is allocated
    sig = BaseModelSignature(base_model=req.signature.base_model, modules=tuple(
        ModuleSpec(m.name, int(m.d_in), int(m.d_out)) for m in req.signature.modules))
    which = req.WhichOneof("shared_a")
    recipe, shared = None, {}
    if which == "recipe":
        recipe = SharedARecipe(seed=int(req.recipe.seed), scheme=req.recipe.scheme or "peft_kaiming_uniform",
                               rng=req.recipe.rng or "numpy.PCG64")
        shared = lo.recipe_shared_a(sig, recipe, rank=int(req.shared_a_rank), modules=list(req.shared_a_modules),
                                    limits=limits)
    elif which == "uploaded":
        for m, t in req.uploaded.modules.items():
            sig.spec(m, field=f"uploaded.modules[{m}]")
            shared[m] = wire.decode_tensor(t, field=f"uploaded.modules[{m}]", limits=limits)
        lo.check_uploaded_shared_a(shared, limits=limits)
    return lo.LibrarySpec(name=req.name, signature=sig, shared_a=shared, recipe=recipe, meta=dict(req.meta),
                          shared_a_only=req.shared_a_only)


def _check_announced(h: admin_pb2.PutAdapterHeader, limits: Limits) -> int:
    """Validate the header's file list before any chunk is read; returns the announced total."""
    if not h.files:
        raise InvalidArgumentError("no files announced", field="header.files", limit=">=1", actual=0)
    if len(h.files) > limits.max_upload_files:
        raise LimitExceededError("too many files", field="header.files", limit=limits.max_upload_files,
                                 actual=len(h.files))
    names = [f.name for f in h.files]
    if len(set(names)) != len(names):
        raise InvalidArgumentError("file announced twice", field="header.files", actual=names)
    for f in h.files:
        if f.size < 0 or len(f.sha256) != 64:
            raise InvalidArgumentError("each file needs size >= 0 and a 64-hex sha256",
                                       field=f"files[{f.name}]", actual=(f.size, f.sha256))
    total = sum(f.size for f in h.files)
    if total > limits.max_upload_bytes:
        raise LimitExceededError("adapter upload too large", field="header.files",
                                 limit=limits.max_upload_bytes, actual=total)
    return total


def _split_files(h: admin_pb2.PutAdapterHeader, buf: bytearray) -> dict[str, bytes]:
    """The announced files out of the received bytes; checks each size and sha256."""
    files, pos = {}, 0
    for f in h.files:
        data = bytes(buf[pos: pos + f.size])
        if len(data) != f.size:
            raise InvalidArgumentError("upload ended early (truncated)", field=f"files[{f.name}].size",
                                       limit=f.size, actual=len(data))
        if hashlib.sha256(data).hexdigest() != f.sha256.lower():
            raise InvalidArgumentError("sha256 mismatch", field=f"files[{f.name}].sha256", limit=f.sha256)
        files[f.name] = data
        pos += f.size
    return files
