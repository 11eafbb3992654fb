"""The Router on grpc.aio, for bench/load.py --server aio-executor|aio-inline (not the product).

Same store, manager and RouterService._route as `seqr serve`; only the transport differs:
  executor  the handler awaits the route on a 16-thread pool (numpy releases the GIL in BLAS)
  inline    the handler routes on the event loop thread itself
It logs {"msg": "listening", "port": ...} and {"msg": "serving"} like `seqr serve`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from seqr_router.v1 import router_pb2_grpc
from seqr_server.app import key_provider, server_options
from seqr_server.auth import OPEN, Authenticator
from seqr_server.config import KeySource, ServerConfig
from seqr_server.export import load_backend
from seqr_server.manager import LibraryManager
from seqr_server.metrics import Metrics
from seqr_server.router_service import RouterService
from seqr_server.rpc import Guard
from seqr_server.store import LibraryStore


class AioRouter(router_pb2_grpc.RouterServicer):
    def __init__(self, inner: RouterService, mode: str):
        self.inner, self.mode = inner, mode
        self.pool = ThreadPoolExecutor(max_workers=16)

    async def Route(self, request, context):
        if self.mode == "inline":
            return self.inner._route(request, OPEN)
        return await asyncio.get_running_loop().run_in_executor(self.pool, self.inner._route, request, OPEN)


async def amain(a) -> None:
    cfg = ServerConfig(listen="127.0.0.1:0", data_dir=a.data_dir)
    store = LibraryStore.open(cfg.data_dir, key_provider(KeySource(), cfg.data_dir), create=False)
    metrics = Metrics()
    manager = LibraryManager(store, metrics=metrics)
    manager.load()
    manager.warm()
    inner = RouterService(manager=manager, limits=cfg.limits, guard=Guard(Authenticator.open_server(), metrics),
                          metrics=metrics, route_fn=load_backend("numpy").route)
    server = grpc.aio.server(options=server_options(cfg))
    router_pb2_grpc.add_RouterServicer_to_server(AioRouter(inner, a.mode), server)
    port = server.add_insecure_port(cfg.listen)
    await server.start()
    print(json.dumps({"msg": "listening", "port": port}), file=sys.stderr, flush=True)
    print(json.dumps({"msg": "serving"}), file=sys.stderr, flush=True)
    await server.wait_for_termination()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mode", choices=("executor", "inline"), default="executor")
    ap.add_argument("--data-dir", type=Path, required=True)
    asyncio.run(amain(ap.parse_args()))


if __name__ == "__main__":
    main()
