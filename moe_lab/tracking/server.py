"""An `mlflow server` process with settings that suit one machine (`moe-lab ui`, tests).

One worker (with the default 4, each keep-alive request waited ~40 ms here) and the background
job runner off; telemetry off; bound to loopback unless asked otherwise.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from moe_lab.tracking.store import artifact_root

# Set in the server's environment, whatever the caller's environment says.
SERVER_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
              "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def server_command(backend_uri: str, port: int, host: str = "127.0.0.1",
                   artifacts_destination: Path | None = None) -> list[str]:
    """A sqlite store's artifacts stay beside it (mlartifacts/, where moe-lab's runs put them);
    artifacts_destination instead makes the server proxy artifact uploads (a team server)."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
           "--host", host, "--port", str(port), "--workers", "1"]
    if artifacts_destination is not None:
        cmd += ["--artifacts-destination", str(artifacts_destination)]
    elif artifact_root(backend_uri) is not None:
        cmd += ["--default-artifact-root", str(artifact_root(backend_uri))]
    return cmd


def server_env(environ: dict[str, str]) -> dict[str, str]:
    return {**environ, **SERVER_ENV}


def start_server(backend_uri: str, port: int, environ: dict[str, str], host: str = "127.0.0.1",
                 artifacts_destination: Path | None = None, **popen) -> subprocess.Popen:
    """In its own process group: `mlflow server` runs uvicorn as a child, which stop() ends too."""
    return subprocess.Popen(server_command(backend_uri, port, host, artifacts_destination),
                            env=server_env(environ), start_new_session=True, **popen)


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL to what is left of it."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def wait_until_healthy(url: str, process: subprocess.Popen, timeout: float = 120.0) -> bool:
    """True once GET url/health answers; False if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                if reply.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.25)
    return False
