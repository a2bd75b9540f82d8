"""`kubesim serve`: run the simulator until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from kubesim import upstream
from kubesim.server import KubeSim


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubesim", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the simulated API over HTTPS")
    serve.add_argument("--kubeconfig-out", required=True, help="where to write a kubeconfig")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=0, help="0 picks a free port")
    serve.add_argument("--latency-ms", type=float, default=0)
    serve.add_argument("--crd-established-delay", type=float, default=0.0, metavar="S")
    serve.add_argument(
        "--controllers",
        action="store_true",
        help="stand-in controllers: Deployments and Flux objects become Ready",
    )
    serve.add_argument("--controller-delay", type=float, default=0.2, metavar="S")
    serve.add_argument(
        "--alga-reference",
        metavar="DIR",
        help="upstream's rendered Alga appliance (../shared/alga): the stand-in "
        "Kustomizations apply it, with their patches",
    )
    serve.add_argument("--request-log", help="append every request as a JSON line")
    serve.add_argument("--k8s-version", default="1.33.2")
    serve.add_argument(
        "--refuse-seconds",
        type=float,
        default=0.0,
        help="refuse connections for the first S seconds",
    )
    serve.add_argument(
        "--readyz-unavailable-seconds",
        type=float,
        default=0.0,
        help="answer /readyz with 503 for the first S seconds",
    )
    serve.add_argument(
        "--fail-next", type=int, default=0, metavar="K", help="fail the next K API requests"
    )
    serve.add_argument("--fail-status", type=int, default=503, choices=[429, 500, 503])
    serve.add_argument(
        "--fail-path",
        default="^/api",
        metavar="REGEX",
        help="fail (or reset) only requests whose path matches (default: the API)",
    )
    serve.add_argument("--fail-verb", help="fail (or reset) only this verb (get, list, apply...)")
    serve.add_argument(
        "--fail-retry-after",
        type=int,
        metavar="S",
        help="send Retry-After: S with the failures (default: 1 with 429, none otherwise)",
    )
    serve.add_argument(
        "--reset-next",
        type=int,
        default=0,
        metavar="K",
        help="reset the connection of the next K matching requests",
    )
    args = parser.parse_args(argv)

    sim = KubeSim(
        kubeconfig_out=args.kubeconfig_out,
        port=args.port,
        host=args.host,
        latency_ms=args.latency_ms,
        crd_established_delay=args.crd_established_delay,
        controllers=args.controllers,
        controller_delay=args.controller_delay,
        request_log=args.request_log,
        k8s_version=args.k8s_version,
        refuse_seconds=args.refuse_seconds,
        readyz_unavailable_seconds=args.readyz_unavailable_seconds,
    )
    if args.alga_reference:
        sim.controllers.sources.update(upstream.reference_sources(Path(args.alga_reference)))
    if args.fail_next:
        retry_after = args.fail_retry_after
        if retry_after is None and args.fail_status == 429:
            retry_after = 1
        sim.faults.fail_next(
            args.fail_next, args.fail_status, args.fail_verb, args.fail_path, retry_after
        )
    if args.reset_next:
        sim.faults.reset_next(args.reset_next, args.fail_verb, args.fail_path)
    done = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: done.set())
    sim.start()
    print(f"ready {sim.url}", flush=True)
    done.wait()
    sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
