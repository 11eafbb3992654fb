"""What bounding caller strings costs, and what it saves (issue 9, item 3).

1. Cost per request: ``check_request`` on a Route with 60 modules (30 shared tensors, moments
   form, as in bench/load.py), against protobuf parsing and ``wire.decode_inputs`` of the same
   request (median of ``--repeat`` runs of ``--n`` calls each).
2. Amplification: a real server (create_server on 127.0.0.1:0, max message 128 MB) receives a
   Route with a 60 MB module name and a DescribeLibrary with an 8 MB library name; reports the
   seconds to the status, the status bytes and the bytes the server logged (JSON format, as
   `seqr serve` logs).

    .venv/bin/python bench/request_bounds_bench.py [--n 20000] [--repeat 5] [--skip-server]

Prints a markdown table.
"""

from __future__ import annotations

import argparse
import io
import logging
import statistics
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from seqr_router.v1 import router_pb2, router_pb2_grpc, tensor_pb2
from seqr_server import wire
from seqr_server.config import Limits, ServerConfig

LAYERS, RANK = 30, 8


def route_request(library: str = "bench") -> router_pb2.RouteRequest:
    req = router_pb2.RouteRequest(library=library)
    g = np.eye(RANK, dtype="<f4")
    for layer in range(LAYERS):
        name = f"model.layers.{layer}.self_attn.q_proj"
        req.tensors[name].CopyFrom(tensor_pb2.Tensor(dtype=tensor_pb2.F32, shape=[RANK, RANK], data=g.tobytes()))
        for m in ("q_proj", "v_proj"):
            req.inputs.add(module=f"model.layers.{layer}.self_attn.{m}", form=router_pb2.MOMENTS, tensor=name)
    return req


def per_call_us(fn, n: int, repeat: int) -> float:
    fn()
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(runs)


def cost(n: int, repeat: int) -> list[tuple[str, str]]:
    from seqr_server.request_bounds import check_request
    lim = Limits()
    req = route_request()
    raw = req.SerializeToString()
    check = per_call_us(lambda: check_request(req, limits=lim), n, repeat)
    parse = per_call_us(lambda: router_pb2.RouteRequest.FromString(raw), n // 4, repeat)
    decode = per_call_us(lambda: wire.decode_inputs(req.tensors, req.inputs, limits=lim), n // 4, repeat)
    return [("Route request", f"{len(req.inputs)} modules, {len(req.tensors)} tensors, {len(raw)} B"),
            ("check_request per request", f"{check:.1f} µs"),
            ("protobuf parse of the same request", f"{parse:.1f} µs"),
            ("wire.decode_inputs of the same request", f"{decode:.1f} µs")]


def amplification() -> list[tuple[str, str]]:
    from seqr_server.app import create_server
    from seqr_server.logs import JsonFormatter
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ServerConfig(listen="127.0.0.1:0", data_dir=Path(tmp) / "data", metrics_port=None, demo=True,
                           limits=Limits(max_message_bytes=128 << 20))
        _, h = create_server(cfg)
        h.start()
        h.wait_ready(120)
        opts = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        try:
            with grpc.insecure_channel(h.target, options=opts) as ch:
                stub = router_pb2_grpc.RouterStub(ch)
                big_module = route_request("demo")
                big_module.inputs[1].module = "m" * (60 << 20)
                cases = [("Route, 60 MB module name", lambda: stub.Route(big_module, timeout=300)),
                         ("DescribeLibrary, 8 MB library name", lambda: stub.DescribeLibrary(
                             router_pb2.DescribeLibraryRequest(library="L" * (8 << 20)), timeout=300))]
                for label, call in cases:
                    buf.seek(0)
                    buf.truncate(0)
                    t0 = time.perf_counter()
                    try:
                        call()
                        code, status = "OK", 0
                    except grpc.RpcError as e:
                        code = e.code().name
                        status = len(e.details() or "") + sum(len(k) + len(v) for k, v in e.trailing_metadata() or ())
                    rows.append((label, f"{code} in {time.perf_counter() - t0:.2f} s; status {status:,} B; "
                                        f"server log {len(buf.getvalue()):,} B"))
        finally:
            h.stop(grace=1.0)
            root.removeHandler(handler)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--skip-server", action="store_true", help="only the per-request cost")
    ap.add_argument("--skip-cost", action="store_true", help="only the server (runs on older versions too)")
    a = ap.parse_args()
    rows = ([] if a.skip_cost else cost(a.n, a.repeat)) + ([] if a.skip_server else amplification())
    print("| measure | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
