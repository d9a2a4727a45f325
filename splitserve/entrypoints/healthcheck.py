"""`python -m splitserve.entrypoints.healthcheck grpc HOST:PORT | http URL`: exit 0 when the service is up.

For container health checks: `grpc` asks the standard gRPC health service (overall status,
service ""), `http` expects a 200. Anything else, a refusal or a timeout exits 1 with the
reason on stderr.
"""

from __future__ import annotations

import argparse
import sys
import urllib.request


def check_grpc(address: str, timeout_s: float) -> str | None:
    """None when the server answers SERVING; else why not."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            return f"{address}: {exc.code().name} {exc.details()}"
    if resp.status != health_pb2.HealthCheckResponse.SERVING:
        return f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)}"
    return None


def check_http(url: str, timeout_s: float) -> str | None:
    """None on a 200; else why not."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return None if resp.status == 200 else f"{url}: HTTP {resp.status}"
    except OSError as exc:
        return f"{url}: {exc}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m splitserve.entrypoints.healthcheck")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait")
    sub = parser.add_subparsers(dest="kind", required=True)
    sub.add_parser("grpc", help="gRPC health service").add_argument("target", metavar="HOST:PORT")
    sub.add_parser("http", help="an HTTP endpoint that answers 200").add_argument(
        "target", metavar="URL"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check = check_grpc if args.kind == "grpc" else check_http
    problem = check(args.target, args.timeout)
    if problem is not None:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
