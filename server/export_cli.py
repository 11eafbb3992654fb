"""``seqr export onnx OUT`` and ``seqr export triton DIR``: the scorer for hosts that run it.

Both write the library's routing index — derived from the adapters' weights — as PLAINTEXT
files: that is what a host's own runtime needs, and why the service itself only ever keeps the
scorer encrypted or in memory. So both refuse unless ``--i-understand-plaintext`` is given,
and say why. Files are written 0600, via a temp file and rename (never half a model).

Two sources: offline, from the store (``--data-dir``; the server must be stopped), or with
``--target HOST:PORT`` from a running server through the ExportScorer RPC (the server builds the
graph with its defaults: only ``--form`` and ``--tokens`` apply; the caller needs an admin token
whose adapter ACL is "*").

Mounting (``seqr_cli`` owns ``seqr``; the server package never imports the client)::

    from seqr_server.export_cli import add_export_parser
    add_export_parser(subparsers, load_library=lambda args: <LibraryIndex of args.library>,
                      remote_export=lambda args: <ONNX bytes from args.target>)

``args.func(args)`` then returns the exit code. The handlers ``export_onnx(data, source, args)``
and ``export_triton(data, source, args)`` take the model bytes and a description of their source.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, TextIO

from seqr_core.errors import SeqrError
from seqr_core.normalise import Normalisation
from seqr_core.qr_index import LibraryIndex

ACK_FLAG = "--i-understand-plaintext"
REFUSAL = (
    "refusing to export: the scorer holds this library's routing index (R factors and A·R "
    "products derived from every adapter's weights) as PLAINTEXT in the output file. The "
    "service keeps it only encrypted at rest or in memory; a file on disk is outside that "
    "protection. If the destination is trusted (a host's model store), re-run with "
    f"{ACK_FLAG}.")
_TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16",
                 "bool": "TYPE_BOOL", "int64": "TYPE_INT64"}


def _norm(text: str) -> Normalisation:
    """'frobenius', 'none', 'activation', 'zscore/adapter/log' (Normalisation.label syntax)."""
    parts = text.split("/")
    if len(parts) > 3:
        raise argparse.ArgumentTypeError(f"bad normalisation {text!r}")
    try:
        return Normalisation(*parts)
    except SeqrError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _form_pair(text: str) -> tuple[str, str]:
    module, sep, form = text.rpartition("=")
    if not sep or not module:
        raise argparse.ArgumentTypeError("expected MODULE=FORM")
    return module, form


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--library", required=True, help="library to export")
    p.add_argument(ACK_FLAG, dest="ack_plaintext", action="store_true",
                   help="acknowledge that the output holds the routing index in plaintext")
    p.add_argument("--module", dest="modules", action="append", metavar="MODULE",
                   help="export this module (repeat; default: every module with adapters)")
    p.add_argument("--form", default="activations", choices=("activations", "projected", "moments"),
                   help="input form of every module not named by --module-form")
    p.add_argument("--module-form", action="append", type=_form_pair, default=[], metavar="MODULE=FORM",
                   help="input form of one module (repeat)")
    p.add_argument("--normalisation", type=_norm, default=None,
                   help="none | frobenius | activation | zscore/<adapter_module|adapter>/<e|sqrt|log> "
                        "(default: activation once calibrated, frobenius before, as routing does)")
    p.add_argument("--top-k", type=int, default=1, help="adapters in the ranked output")
    p.add_argument("--tokens", type=int, default=0, help="static token count (0: dynamic)")
    p.add_argument("--input-dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="dtype of the graph's inputs")
    p.add_argument("--no-per-token", dest="per_token", action="store_false", default=None,
                   help="sequence outputs only (smaller, faster graph)")
    p.add_argument("--exclude-unscorable", action="store_true",
                   help="export adapters that cannot be scored (uncalibrated, own A with projected "
                        "input) as NaN instead of failing")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    _remote_flags(p)


# Options the ExportScorer RPC does not carry, with their defaults (what the server uses).
OFFLINE_ONLY = {"modules": None, "module_form": [], "normalisation": None, "top_k": 1, "per_token": None,
                "input_dtype": "float32", "exclude_unscorable": False, "opset": 18}


def _remote_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("from a running server (instead of --data-dir)")
    g.add_argument("--target", metavar="HOST:PORT",
                   help="export through this server's ExportScorer RPC while it runs; only --form and "
                        "--tokens apply (SEQR_TARGET is not read here: without --target the export is offline)")
    g.add_argument("--token", default=os.environ.get("SEQR_TOKEN"),
                   help="admin bearer token whose adapter ACL is '*' [SEQR_TOKEN]")
    g.add_argument("--tls-ca", default=os.environ.get("SEQR_TLS_CA"), help="[SEQR_TLS_CA]")
    g.add_argument("--tls-client-cert", default=os.environ.get("SEQR_CLIENT_CERT"), help="[SEQR_CLIENT_CERT]")
    g.add_argument("--tls-client-key", default=os.environ.get("SEQR_CLIENT_KEY"), help="[SEQR_CLIENT_KEY]")
    g.add_argument("--timeout", type=float, default=300.0, help="deadline of the export call, seconds")


Loader = Callable[[argparse.Namespace], LibraryIndex]
Fetcher = Callable[[argparse.Namespace], bytes]


def add_export_parser(subparsers, *, load_library: Loader | None = None, remote_export: Fetcher | None = None,
                      store_flags: Callable[[argparse.ArgumentParser], None] | None = None):
    """Add ``export {onnx,triton}`` to a ``seqr`` sub-command set; returns the ``export`` parser.
    ``store_flags(parser)`` adds the offline store's flags to each of them."""
    export = subparsers.add_parser("export", help="write the scorer for external hosts (plaintext!)",
                                   description=__doc__.split("\n\n")[1] + " " + __doc__.split("\n\n")[2])
    kinds = export.add_subparsers(dest="export_kind", required=True)
    onnx_p = kinds.add_parser("onnx", help="one ONNX model file")
    onnx_p.add_argument("out", type=Path, metavar="OUT")
    _common(onnx_p)
    tri = kinds.add_parser("triton", help="a Triton model repository (onnxruntime backend)")
    tri.add_argument("dir", type=Path, metavar="DIR")
    _common(tri)
    tri.add_argument("--model-name", default="seqr_scorer", help="the model's folder and name in Triton")
    tri.add_argument("--max-batch-size", type=int, default=8, help="Triton max_batch_size (dynamic batching)")
    tri.add_argument("--max-queue-delay-us", type=int, default=100, help="Triton dynamic batching queue delay")
    tri.add_argument("--instance-kind", default="gpu", choices=("gpu", "cpu", "auto"),
                     help="Triton instance_group kind")
    for p, handler in ((onnx_p, export_onnx), (tri, export_triton)):
        if store_flags is not None:
            store_flags(p)
        p.set_defaults(func=lambda args, h=handler: run(args, h, load_library, remote_export))
    return export


def run(args, handler, load_library, remote_export=None, *, err: TextIO | None = None) -> int:
    """Refuse before anything is loaded unless acknowledged; then build (or fetch) and write."""
    err = err or sys.stderr
    if not args.ack_plaintext:
        print(REFUSAL, file=err)
        return 2
    if getattr(args, "target", None):
        return _run_remote(args, handler, remote_export, err)
    if load_library is None:
        print("export: no library loader is wired into this CLI", file=err)
        return 1
    try:
        index = load_library(args)
        return handler(_model(index, args), f"library {index.name} v{index.version}", args, err=err)
    except SeqrError as e:
        print(f"export failed: {e}", file=err)
        return 1


def _run_remote(args, handler, remote_export, err: TextIO) -> int:
    if remote_export is None:
        print("export --target needs the client (install the 'client' extra)", file=err)
        return 2
    given = [k for k, default in OFFLINE_ONLY.items() if getattr(args, k, default) != default]
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        print(f"export --target: {flags} not available through the ExportScorer RPC (the server exports "
              "with its defaults); export offline with --data-dir while the server is stopped", file=err)
        return 2
    return handler(remote_export(args), f"library {args.library} from {args.target}", args, err=err)


def _model(index: LibraryIndex, args) -> bytes:
    from seqr_core.onnx_export import export_scorer
    return export_scorer(index, modules=args.modules, form=args.form, forms=dict(args.module_form),
                         normalisation=args.normalisation, top_k=args.top_k, per_token=args.per_token,
                         tokens=args.tokens or None, input_dtype=args.input_dtype,
                         on_unscorable="exclude" if args.exclude_unscorable else "error",
                         opset=args.opset)


def _write_private(path: Path, data: bytes, *, force: bool) -> None:
    """0600 file via temp + fsync + rename: readers see no file or the whole model."""
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists (use --force to overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_onnx(data: bytes, source: str, args, *, err: TextIO | None = None) -> int:
    err = err or sys.stderr
    try:
        _write_private(args.out, data, force=args.force)
    except FileExistsError as e:
        print(f"export failed: {e}", file=err)
        return 1
    print(f"wrote {args.out} ({len(data)} bytes, {source}); PLAINTEXT routing index, mode 0600", file=err)
    return 0


def triton_config(model: bytes, *, name: str, max_batch_size: int, max_queue_delay_us: int,
                  instance_kind: str) -> str:
    """config.pbtxt for Triton's onnxruntime backend, from the model's own metadata/IO."""
    import onnx
    from seqr_core.onnx_export import scorer_metadata
    m = onnx.load_from_string(model)
    md = scorer_metadata({p.key: p.value for p in m.metadata_props})

    def io(vi) -> str:
        elem = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name
        dims = [d.dim_value if d.dim_value else -1 for d in vi.type.tensor_type.shape.dim][1:]
        return (f'  {{ name: "{vi.name}" data_type: {_TRITON_TYPES[elem]} '
                f"dims: [ {', '.join(map(str, dims))} ] }}")
    kind = {"gpu": "KIND_GPU", "cpu": "KIND_CPU", "auto": "KIND_AUTO"}[instance_kind]
    note = json.dumps({"library": md.get("seqr.library"), "version": md.get("seqr.version"),
                       "normalisation": md.get("seqr.normalisation", {}).get("label")})
    return "\n".join([
        f'# seqr-router scorer {note}',
        "# All requests batched together must have the same token count (Triton batches equal shapes).",
        f'name: "{name}"', 'backend: "onnxruntime"', f"max_batch_size: {max_batch_size}",
        "input [", ",\n".join(io(v) for v in m.graph.input), "]",
        "output [", ",\n".join(io(v) for v in m.graph.output), "]",
        f"dynamic_batching {{ max_queue_delay_microseconds: {max_queue_delay_us} }}",
        f"instance_group [ {{ count: 1 kind: {kind} }} ]", ""])


def export_triton(data: bytes, source: str, args, *, err: TextIO | None = None) -> int:
    """DIR/<model-name>/config.pbtxt and DIR/<model-name>/1/model.onnx."""
    err = err or sys.stderr
    if args.max_batch_size < 1:
        print("export failed: --max-batch-size must be >= 1 (dynamic batching needs a batch axis)", file=err)
        return 1
    root = args.dir / args.model_name
    config = triton_config(data, name=args.model_name, max_batch_size=args.max_batch_size,
                           max_queue_delay_us=args.max_queue_delay_us, instance_kind=args.instance_kind)
    try:
        _write_private(root / "1" / "model.onnx", data, force=args.force)
        _write_private(root / "config.pbtxt", config.encode(), force=args.force)
    except FileExistsError as e:
        print(f"export failed: {e}", file=err)
        return 1
    print(f"wrote Triton model repository {root} ({source}); model.onnx is a PLAINTEXT routing index, "
          "mode 0600", file=err)
    return 0
