"""Channel options that work on one host and behind a headless Kubernetes Service.

Behind a headless Service, use target ``dns:///seqr-router.<ns>.svc.cluster.local:50051``:
the DNS resolver returns every pod and ``round_robin`` spreads calls over them (the default
``pick_first`` would pin all traffic to one pod). The server caps connection age, so clients
re-resolve and pick up new pods. Route/DescribeLibrary are retried on UNAVAILABLE (they are
reads); admin calls are never retried automatically.
"""

from __future__ import annotations

import json

import grpc

ROUTER_SERVICE = "seqr_router.v1.Router"

SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{
        "name": [{"service": ROUTER_SERVICE}],
        "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.05s", "maxBackoff": "1s",
                        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
    }],
}


def channel_options(*, max_message_bytes: int = 64 << 20, round_robin: bool = True) -> list[tuple[str, object]]:
    config = dict(SERVICE_CONFIG)
    if not round_robin:
        config.pop("loadBalancingConfig")
    return [("grpc.service_config", json.dumps(config)),
            ("grpc.enable_retries", 1),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # Keepalive: notice dead pods within ~40 s; the server permits pings every 10 s.
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0)]


def make_channel(target: str, credentials: grpc.ChannelCredentials | None = None, *,
                 options: list[tuple[str, object]] | None = None) -> grpc.Channel:
    opts = options if options is not None else channel_options()
    if credentials is None:
        return grpc.insecure_channel(target, options=opts)
    return grpc.secure_channel(target, credentials, options=opts)


def tls_credentials(*, ca_file: str | None = None, cert_file: str | None = None,
                    key_file: str | None = None) -> grpc.ChannelCredentials:
    """TLS (server verified with ``ca_file`` or the system roots), mTLS with cert+key."""
    def read(p):
        return open(p, "rb").read() if p else None
    return grpc.ssl_channel_credentials(root_certificates=read(ca_file), private_key=read(key_file),
                                        certificate_chain=read(cert_file))
