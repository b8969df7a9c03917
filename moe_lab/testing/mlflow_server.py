"""A real `mlflow server` for tests: sqlite store and proxied artifacts under one directory, on a
free loopback port, one worker, stopped (its whole process group) when the block ends."""

from __future__ import annotations

import subprocess
from contextlib import contextmanager
from pathlib import Path

from moe_lab.testing.distributed import child_env, free_port
from moe_lab.tracking.server import start_server, stop_server, wait_until_healthy


@contextmanager
def mlflow_server(root: Path, port: int | None = None):
    """Yields the server's URL; the same root (and port) serves the same runs again."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(root / f"server-{port}.log", "ab")
    process = start_server(f"sqlite:///{root / 'server.db'}", port, child_env(), host="127.0.0.1",
                           artifacts_destination=root / "artifacts", stdout=log,
                           stderr=subprocess.STDOUT)
    try:
        if not wait_until_healthy(url, process):
            log.flush()
            tail = Path(log.name).read_text(errors="replace")[-3000:]
            raise RuntimeError(f"mlflow server on {url} did not start: {tail}")
        yield url
    finally:
        stop_server(process)
        log.close()
