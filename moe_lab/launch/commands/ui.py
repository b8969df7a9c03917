"""`moe-lab ui [--port 5000] [--uri STORE]`: the MLflow UI over the default store, on loopback."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "ui", help="start the MLflow UI on 127.0.0.1 over the tracking store",
        description="Start `mlflow server` on 127.0.0.1 (one worker, background jobs off,\n"
                    "telemetry off) over the default store (sqlite:///<cwd>/mlruns.db,\n"
                    "artifacts in <cwd>/mlartifacts) and print its URL. Ctrl-C stops it.",
        epilog="examples:\n  moe-lab ui\n"
               "  moe-lab ui --port 5001 --uri sqlite:////shared/mlruns.db",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default 5000)")
    parser.add_argument("--uri", help="tracking store (default: sqlite:///<cwd>/mlruns.db)")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from moe_lab.launch.cli import UserError
    from moe_lab.tracking.server import start_server, stop_server, wait_until_healthy
    from moe_lab.tracking.store import is_server, resolve_uri

    uri = resolve_uri(args.uri)
    if is_server(uri):
        raise UserError(f"--uri: {uri} is already a server; open it in a browser")
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).parent.is_dir():
        raise UserError(f"--uri: the directory of {uri} does not exist")
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port: must be 1-65535, got {args.port}")
    _check_port_free(args.port)
    url = f"http://127.0.0.1:{args.port}"
    print(f"starting the MLflow UI over {uri} ...", flush=True)
    # `kill` (SIGTERM) stops the server too, like Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    process = start_server(uri, args.port, dict(os.environ))
    try:
        if not wait_until_healthy(url, process):
            raise UserError(f"mlflow server did not start on {url} (exit code {process.poll()})")
        print(f"MLflow UI: {url}  (Ctrl-C stops it)", flush=True)
        return process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_server(process)


def _check_port_free(port: int) -> None:
    import socket

    from moe_lab.launch.cli import UserError

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise UserError(f"--port: 127.0.0.1:{port} is in use; choose another port") from None
