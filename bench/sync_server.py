"""The previous transport, for bench/load.py --server sync (not the product).

`seqr serve` runs on grpc.aio (server/app.py). This is the synchronous grpc server it replaced
(a 16-thread pool, unary handlers that block a thread until the request arrives), kept only
so the load benchmark can compare both transports on the same store in the same run. Same
store, manager, RouterService._route and auth as `seqr serve`.
It logs {"msg": "listening", "port": ...} and {"msg": "serving"} like `seqr serve`.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from threadpoolctl import threadpool_limits

from seqr_router.v1 import router_pb2
from seqr_server.app import key_provider, server_options
from seqr_server.auth import Authenticator
from seqr_server.config import KeySource, ServerConfig
from seqr_server.export import load_backend
from seqr_server.manager import LibraryManager
from seqr_server.metrics import Metrics
from seqr_server.router_service import RouterService
from seqr_server.status import to_status
from seqr_server.store import LibraryStore
from seqr_core.errors import SeqrError


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--workers", type=int, default=16)
    a = ap.parse_args()
    threadpool_limits(limits=1, user_api="blas")
    cfg = ServerConfig(listen="127.0.0.1:0", data_dir=a.data_dir)
    store = LibraryStore.open(cfg.data_dir, key_provider(KeySource(), cfg.data_dir), create=False)
    manager = LibraryManager(store, metrics=Metrics())
    manager.load()
    manager.warm()
    auth = Authenticator.open_server()
    inner = RouterService(manager=manager, limits=cfg.limits, metrics=Metrics(),
                          route_fn=load_backend("numpy").route)

    def route(request, context):
        try:
            return inner._route(request, auth.authenticate(context.invocation_metadata(), "Router/Route"))
        except SeqrError as e:
            context.abort_with_status(to_status(e))

    handler = grpc.method_handlers_generic_handler("seqr_router.v1.Router", {
        "Route": grpc.unary_unary_rpc_method_handler(
            route, request_deserializer=router_pb2.RouteRequest.FromString,
            response_serializer=router_pb2.RouteResponse.SerializeToString)})
    server = grpc.server(ThreadPoolExecutor(max_workers=a.workers), options=server_options(cfg),
                         maximum_concurrent_rpcs=256, handlers=(handler,))
    port = server.add_insecure_port(cfg.listen)
    server.start()
    print(json.dumps({"msg": "listening", "port": port}), file=sys.stderr, flush=True)
    print(json.dumps({"msg": "serving"}), file=sys.stderr, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(1).wait()
    manager.close()


if __name__ == "__main__":
    main()
