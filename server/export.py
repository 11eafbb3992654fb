"""Scorer backends and the ONNX exporter hook, so the service runs (and says why) without ONNX.

* Backend ``numpy``: ``seqr_core.route``. Backend ``onnx``: ``seqr_server.onnx_backend.OnnxBackend``
  (same contract; told about every new library snapshot through ``prepare``).
* Exporter: ``seqr_core.onnx_export.export_scorer(index, form=..., tokens=...) -> bytes`` serves
  LibraryAdmin.ExportScorer; without it (no onnx installed) the RPC answers UNIMPLEMENTED.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from seqr_core import LibraryIndex
from seqr_core import route as numpy_route
from seqr_core.errors import FailedPreconditionError, InvalidArgumentError, SeqrError

BACKENDS = ("numpy", "onnx")


class UnimplementedError(SeqrError):
    code = "UNIMPLEMENTED"


@dataclass(frozen=True)
class Backend:
    name: str
    route: Callable                                  # (index, inputs, options) -> Decision
    prepare: Callable[[LibraryIndex], object] | None = None   # a new snapshot exists
    close: Callable[[], None] | None = None


def exporter() -> Callable | None:
    try:
        mod = importlib.import_module("seqr_core.onnx_export")
    except ImportError:          # onnx not installed in this environment
        return None
    return getattr(mod, "export_scorer", None)


def load_backend(name: str) -> Backend:
    if name == "numpy":
        return Backend("numpy", numpy_route)
    if name == "onnx":
        try:
            mod = importlib.import_module("seqr_server.onnx_backend")
        except ImportError as e:
            raise FailedPreconditionError(f"the onnx backend is not available here ({e}); "
                                          "use --backend numpy", field="backend", actual=name) from None
        b = mod.OnnxBackend()
        return Backend("onnx", b.route, prepare=b.prepare, close=b.close)
    raise InvalidArgumentError("unknown backend", field="backend", limit=BACKENDS, actual=name)
