"""A real browser on what people look at: the MLflow compare-runs page of a 3-run sweep, served by
`moe-lab ui` over the default store, and the `moe-lab compare` HTML report.

Debian's chromium (/usr/bin/chromium, installed by scripts/ci.d/chromium.sh) driven by Playwright
for Python; requests that leave loopback are blocked (and counted).
Run: pytest tests/tracking/test_browser.py
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import pytest

from moe_lab.testing import run_cli
from moe_lab.testing.distributed import REPO, child_env, free_port

from .conftest import fake_expert_load, fake_step_metrics, make_sink

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LRS = {"lr-1e-3": 1e-3, "lr-3e-3": 3e-3, "lr-1e-2": 1e-2}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A sweep parent and 3 children (optimizer.lr varied) in the default store of a directory."""
    from moe_lab.tracking import store

    root = tmp_path_factory.mktemp("sweep")
    uri = store.default_uri(root)
    client = store.MlflowClient(uri)
    experiment = store.experiment_id(client, uri, "lr_study")
    parent = client.create_run(experiment, run_name="lr_sweep",
                               tags={"sweep_id": "lr1"}).info.run_id
    children = []
    for index, (name, lr) in enumerate(LRS.items()):
        sink = make_sink(root / "runs" / name, f"tracking.uri={uri}",
                         "tracking.experiment=lr_study", f"tracking.parent_run_id={parent}",
                         "tracking.sweep_id=lr1", f"tracking.run_name={name}",
                         f"optimizer.lr={lr}", "training.max_steps=20",
                         "tracking.expert_load_interval=10")
        sink.start(0)
        for step in range(1, 21):
            sink.log(step, fake_step_metrics(step, lr))
            sink.log_expert_load(step, fake_expert_load(index))
            if step % 5 == 0:
                sink.log(step, {"valid/loss": fake_step_metrics(step, lr)["loss"] + 0.05},
                         split="valid")
        sink.close()
        children.append(sink.run_id)
    client.set_terminated(parent)
    return SimpleNamespace(root=root, uri=uri, parent=parent, experiment=experiment,
                           children=children)


@pytest.fixture(scope="module")
def ui_url(sweep):
    """`moe-lab ui` started in the sweep's directory (so over its default store)."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "moe_lab", "ui", "--port", str(port)],
                               cwd=sweep.root, env=child_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout],
                     daemon=True).start()
    seen = []
    try:
        while True:
            line = lines.get(timeout=180)
            seen.append(line)
            if line.startswith("MLflow UI: "):
                url = line.split()[2]
                break
        assert url == f"http://127.0.0.1:{port}"
        yield url
    except queue.Empty:
        pytest.fail(f"moe-lab ui printed no URL: {''.join(seen)[-2000:]}")
    finally:
        os.killpg(process.pid, signal.SIGINT)  # like Ctrl-C: moe-lab ui stops its server
        process.wait(timeout=60)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} missing: run scripts/ci.d/chromium.sh"
    blocked: list[str] = []

    def only_loopback(route):
        url = urllib.parse.urlparse(route.request.url)
        if url.scheme in ("file", "data", "blob") or url.hostname in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM,
            headless=True, args=FLAGS, viewport={"width": 1400, "height": 1000})
        context.set_default_timeout(120_000)
        context.route("**/*", only_loopback)
        context.blocked = blocked
        yield context
        context.close()


def test_mlflow_compare_page_shows_each_run_and_the_varied_param(sweep, ui_url, browser):
    page = browser.new_page()
    runs = json.dumps(sweep.children)
    page.goto(f"{ui_url}/#/compare-runs?runs={runs}&experiments={json.dumps([sweep.experiment])}")
    page.get_by_text("Comparing 3 Runs from 1 Experiment").wait_for()
    details = page.locator("body")
    for name, lr in LRS.items():
        page.get_by_text(name, exact=True).first.wait_for()
    row = page.locator("tr", has_text="optimizer.lr").first
    row.wait_for()
    cells = row.inner_text().split()
    assert cells[0] == "optimizer.lr" and sorted(map(float, cells[1:])) == sorted(LRS.values())
    assert "lr_study" in details.inner_text()
    page.close()


def test_compare_report_shows_curves_and_one_row_per_run(sweep, browser, tmp_path):
    out = tmp_path / "report"
    result = run_cli(["compare", sweep.parent, "--out", str(out)], cwd=sweep.root)
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout.strip().splitlines()
    assert table[0].startswith("| run | optimizer.lr | status | steps | final loss |")
    assert sorted(line.split("|")[1].strip() for line in table[2:]) == sorted(LRS)
    assert f"report: {out / 'report.html'}" in result.stderr
    for png in ("loss.png", "valid_loss.png", "moe_load_max_over_mean.png", "expert_load.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    page = browser.new_page()
    page.goto((out / "report.html").as_uri())
    assert page.title() == "moe-lab compare: sweep lr_sweep"
    for section in ("curve-metric", "curve-valid", "curve-imbalance", "expert-load"):
        image = page.locator(f"#{section} img")
        width = image.evaluate("img => img.complete ? img.naturalWidth : 0")
        assert width > 300, section  # the PNG decoded: an image, not a broken icon
    rows = page.locator("#final-values tr.run-row")
    assert rows.count() == 3
    assert sorted(rows.nth(i).locator("td").first.inner_text() for i in range(3)) == sorted(LRS)
    assert sorted(float(rows.nth(i).locator("td").nth(1).inner_text()) for i in range(3)) == \
        sorted(LRS.values())
    page.close()


def test_nothing_left_loopback(browser):
    """Runs last in this module: the MLflow UI and the report asked for nothing off-machine
    (or it was blocked and is listed here)."""
    assert browser.blocked == []


def test_compare_of_an_unknown_target_is_one_line(sweep):
    result = run_cli(["compare", "no_such_sweep"], cwd=sweep.root)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "moe-lab: error: no_such_sweep: no experiment, parent run id or parent run name of that "
        "name in the store"]
    assert not (REPO / "compare").exists() and not (sweep.root / "compare").exists()


def test_a_sweep_is_found_by_parent_id_parent_name_or_experiment(sweep):
    from moe_lab.tracking import store
    from moe_lab.tracking.compare import NothingToCompare, find_runs

    client = store.MlflowClient(sweep.uri)
    for target in (sweep.parent, "lr_sweep", "lr_study", sweep.experiment):
        title, experiment, runs = find_runs(client, target)
        assert sorted(r.info.run_id for r in runs) == sorted(sweep.children), target
        assert experiment == sweep.experiment
    with pytest.raises(NothingToCompare, match="has no child runs"):
        find_runs(client, sweep.children[0])
