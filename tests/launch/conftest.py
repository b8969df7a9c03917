"""A fresh clone of the repository, shared by the README and tutorial tests (the second finds the
built-in corpus already prepared by the first)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ..conftest import REPO


@pytest.fixture(scope="session")
def clone(tmp_path_factory) -> Path:
    if not (REPO / ".venv" / "bin" / "python").exists():
        pytest.fail("no .venv: run scripts/setup.sh (scripts/test.sh does) before the tests")
    path = tmp_path_factory.mktemp("first_run") / "moe-lab"
    subprocess.run(["git", "clone", "-q", str(REPO), str(path)], check=True)
    return path
