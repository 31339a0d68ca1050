"""Fixtures for the real-browser tests: headless Chromium (Debian's package) driven by Playwright,
and one JupyterLab server per module (tests/browser/lab.py).

Playwright's own browser downloads are not used (they come from a CDN the CI machine cannot
reach): Playwright launches the system Chromium through ``executable_path``. Where Chromium or
Playwright is missing the tests are skipped with the install command, except under ``CI=true``,
where they fail: CI must run them (``make test`` installs chromium when run as root).

Screenshots, the server log and the browser console go to ``test-artifacts/browser/`` at the
repository root (or ``$NBTUNE_TEST_ARTIFACTS``); the path is printed at the end of the run.
"""
import os
from pathlib import Path

import pytest

from .lab import INSTALL_HINT, LabServer, find_chromium

ARTIFACTS = Path(os.environ.get("NBTUNE_TEST_ARTIFACTS")
                 or Path(__file__).resolve().parents[2] / "test-artifacts") / "browser"
_written: list[Path] = []


def _unavailable(reason: str):
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason}; {INSTALL_HINT}", pytrace=False)
    pytest.skip(f"{reason}; {INSTALL_HINT}")


@pytest.fixture(scope="session")
def artifacts():
    """The folder for screenshots and logs; ``artifacts.save(name)`` gives a path to write to."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    class Artifacts:
        root = ARTIFACTS

        @staticmethod
        def save(name: str) -> Path:
            path = ARTIFACTS / name
            _written.append(path)
            return path

    return Artifacts


@pytest.fixture(scope="session")
def chromium():
    """A headless Chromium browser (Playwright over the system binary)."""
    path = find_chromium()
    if path is None:
        _unavailable("no Chromium binary (chromium / chromium-browser on PATH, or NBTUNE_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("Playwright for Python is not installed")
    pw = sync_playwright().start()
    try:
        browser = pw.chromium.launch(executable_path=path, headless=True,
                                     args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
    except Exception:
        pw.stop()
        raise
    yield browser
    browser.close()
    pw.stop()


@pytest.fixture(scope="module")
def lab_root(tmp_path_factory):
    """The folder JupyterLab serves (the notebooks under test are copied in)."""
    return tmp_path_factory.mktemp("lab-root")


@pytest.fixture(scope="module")
def lab(lab_root, tmp_path_factory, artifacts, chromium, smollm2_dir):
    """A JupyterLab server for this module, stopped (with its kernels) when the module is done.
    The embedded model (``smollm2_dir``) and GSM8K are pulled first: no notebook waits on a download."""
    from nbtune.assets.datasets import pull_dataset

    pull_dataset("gsm8k")
    server = LabServer(lab_root, tmp_path_factory.mktemp("lab-home"), artifacts.save("jupyterlab.log"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def page(chromium, artifacts, request):
    """A fresh browser page (1400x1000); its console messages are saved next to the screenshots."""
    context = chromium.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    console: list[str] = []
    pg.on("console", lambda m: console.append(f"[{m.type}] {m.text}"))
    pg.on("pageerror", lambda e: console.append(f"[pageerror] {e}"))
    yield pg
    artifacts.save(f"{request.node.name}.console.txt").write_text("\n".join(console), encoding="utf-8")
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        try:
            pg.screenshot(path=artifacts.save(f"{request.node.name}.FAILED.png"))
        except Exception as e:  # the page may be gone; the failure itself is what matters
            print(f"no failure screenshot: {e}")
    context.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the item, so the page fixture knows whether the test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def pytest_terminal_summary(terminalreporter):
    if _written:
        terminalreporter.write_line(f"browser test artifacts (screenshots, logs): {ARTIFACTS}")
