"""The MLflow UI, opened by `python -m raytune_qvl.ui`, in a real headless Chromium driven by
Selenium (Debian's chromium and chromedriver): after a sweep, the experiment shows the parent
run and its child runs with their learning rate and rank. Screenshots land in tests/artifacts/."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import ROOT, free_port, wait_for_http

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = ROOT / "tests" / "artifacts"


def _served(args: list[str], health: str, what: str) -> Iterator[str]:
    """`python -m raytune_qvl.ui ARGS --port P` until the test ends; yields its base URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "raytune_qvl.ui", *args, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    wait_for_http(url + health, proc, what)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture()
def ui_server(cer_sweep: Path):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip(
            "Chromium/chromedriver missing: `make test` installs Debian's chromium and chromium-driver when run as root"
        )
    yield from _served(["--tracking_uri", f"sqlite:///{cer_sweep / 'mlflow.db'}"], "/health", "the MLflow UI")


@pytest.fixture()
def browser(tmp_path: Path):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip(
            "Chromium/chromedriver missing: `make test` installs Debian's chromium and chromium-driver when run as root"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1600,1000",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _wait_for_text(driver, texts: list[str], timeout: float = 60) -> str:
    deadline = time.time() + timeout
    body = ""
    while time.time() < deadline:
        body = driver.find_element("tag name", "body").text
        if all(t in body for t in texts):
            return body
        time.sleep(0.5)
    raise AssertionError(f"{texts} not all on the page; it shows:\n{body[:3000]}")


def test_mlflow_ui_shows_the_sweep(cer_sweep: Path, ui_server: str, browser) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{cer_sweep / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cer")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("raytune_qvl.kind") == "sweep")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2
    ARTIFACTS.mkdir(exist_ok=True)

    # the experiment's runs: the sweep's parent run is listed
    browser.get(f"{ui_server}/#/experiments/{experiment.experiment_id}/runs")
    _wait_for_text(browser, [parent.info.run_name, "Training runs"])
    browser.save_screenshot(str(ARTIFACTS / "mlflow_ui_runs.png"))

    # the parent and its children side by side, with learning rate and rank
    ids = json.dumps([parent.info.run_id] + [c.info.run_id for c in children])
    browser.get(f"{ui_server}/#/compare-runs?runs={ids}&experiments={json.dumps([experiment.experiment_id])}")
    body = _wait_for_text(
        browser, [parent.info.run_name, *(c.info.run_name for c in children), "training.learning_rate", "lora.r"]
    )
    browser.save_screenshot(str(ARTIFACTS / "mlflow_ui_compare.png"))
    rows = {
        line.split(" ", 1)[0]: line
        for line in body.splitlines()
        if line.startswith(("training.learning_rate ", "lora.r "))
    }
    for child in children:
        assert str(child.data.params["lora.r"]) in rows["lora.r"]
        assert child.data.params["training.learning_rate"] in rows["training.learning_rate"]
    assert (ARTIFACTS / "mlflow_ui_compare.png").stat().st_size > 10_000


@pytest.fixture()
def optuna_server(cer_sweep: Path):
    """`python -m raytune_qvl.ui --optuna`, finding the latest sweep's study through MLflow."""
    args = ["--optuna", "--tracking_uri", f"sqlite:///{cer_sweep / 'mlflow.db'}"]
    yield from _served(args, "/api/studies", "Optuna Dashboard")


def test_optuna_dashboard_serves_the_latest_sweeps_study(cer_sweep: Path, optuna_server: str, browser) -> None:
    """The study the sweep's searcher wrote, with its trials, in the dashboard's API and page."""
    import urllib.request

    import optuna

    (db,) = cer_sweep.glob("**/optuna.db")
    expected = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(f"sqlite:///{db}")}
    assert expected and all(n >= 1 for n in expected.values())

    def get(path: str) -> dict:
        return json.loads(urllib.request.urlopen(f"{optuna_server}{path}", timeout=30).read())

    studies = {s["study_name"]: s["study_id"] for s in get("/api/studies")["study_summaries"]}
    assert set(studies) == set(expected)
    for name, study_id in studies.items():  # every trial the searcher told the study, as the dashboard reads it
        assert len(get(f"/api/studies/{study_id}")["trials"]) == expected[name]
    ARTIFACTS.mkdir(exist_ok=True)
    browser.get(f"{optuna_server}/dashboard")
    _wait_for_text(browser, list(expected))
    browser.save_screenshot(str(ARTIFACTS / "optuna_dashboard.png"))
    assert (ARTIFACTS / "optuna_dashboard.png").stat().st_size > 10_000
