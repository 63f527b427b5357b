"""`unimodel healthcheck`: one service's readiness, for a container's HEALTHCHECK (deploy/Dockerfile) and
compose's `healthcheck` (compose/docker-compose.yml runs the same command).

Asks the service's gRPC health (grpc.health.v1, overall status "") on 127.0.0.1:UNIMODEL_GRPC_PORT, or, with
--http, GETs a URL (the gateway's /health/ready). Exit 0 when SERVING (HTTP 2xx), 1 otherwise, with one line
saying why; 2 for wrong options. No NATS, no etcd: it only asks the process in its own container.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from unimodel.core.settings import env_name

PROG = "unimodel healthcheck"
PORT_ENV = env_name("grpc_port")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Exit 0 when the service in this container is ready: its gRPC health answers SERVING "
        "(or --http URL answers 2xx); 1 when not, with the reason; 2 for wrong options.",
    )
    parser.add_argument("--grpc-port", type=int, default=None,
                        help=f"the service's gRPC port (default: env {PORT_ENV})")
    parser.add_argument("--host", default="127.0.0.1", help="address to ask (default 127.0.0.1)")
    parser.add_argument("--service", default="",
                        help='gRPC health service name (default "": readiness; "liveness": the process runs)')
    parser.add_argument("--http", default="", metavar="URL",
                        help="ask this URL instead (e.g. http://127.0.0.1:8000/health/ready): ready on 2xx")
    parser.add_argument("--timeout-s", type=float, default=3.0, help="give up after this long (default 3)")
    return parser


def check_http(url: str, timeout_s: float) -> str:
    """'' when the URL answers 2xx, else why not."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return "" if 200 <= response.status < 300 else f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return f"unreachable: {getattr(exc, 'reason', exc)}"


def check_grpc(address: str, service: str, timeout_s: float) -> str:
    """'' when the gRPC health of `service` at `address` is SERVING, else why not."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            code = exc.code()
            return f"unreachable: {code.name if code else 'error'} {exc.details() or ''}".rstrip()
    if reply.status == health_pb2.HealthCheckResponse.SERVING:
        return ""
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.http:
        target, problem = args.http, check_http(args.http, args.timeout_s)
    else:
        port = args.grpc_port
        if port is None:
            raw = os.environ.get(PORT_ENV, "")
            if not raw.isdigit() or int(raw) == 0:
                parser.error(f"give --grpc-port or set {PORT_ENV} to the service's fixed gRPC port (it is {raw!r})")
            port = int(raw)
        if not 0 < port < 65536:
            parser.error(f"the gRPC port must be 1-65535, not {port}")
        target = f"{args.host}:{port}"
        problem = check_grpc(target, args.service, args.timeout_s)
    if problem:
        print(f"{PROG}: {target}: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
