"""A real JupyterLab server in a sandbox, and the few page actions the browser tests need.

``LabServer`` starts ``python -m jupyterlab`` (this interpreter, so this environment's nbtune,
ipywidgets and plotly lab extensions) on 127.0.0.1, a free port and a random token, with its own
config, settings, workspace and runtime folders under a temporary directory, and a ``python3``
kernelspec that points at this interpreter. Settings written there: no news / update checks (no
network, no toast over the screenshots) and notebook windowing off, so every cell is in the DOM
and prompts and outputs can be read wherever the notebook is scrolled to.

Page helpers drive the notebook the way a user does: the *Run* menu's *Run All Cells*, then wait
until no cell is queued or running.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser")
INSTALL_HINT = ("the browser tests need Debian's chromium and Playwright for Python: "
                "`apt-get install -y chromium` (as root; `make test` does this itself when run as root) "
                "and `pip install -e .[test]`; or point NBTUNE_CHROMIUM at a Chromium binary")


def find_chromium() -> str | None:
    """NBTUNE_CHROMIUM, else chromium / chromium-browser on PATH."""
    explicit = os.environ.get("NBTUNE_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_notebook(src: Path, dst_dir: Path, **params) -> Path:
    """Copy a notebook; with ``params``, insert a cell setting them right after its ``parameters``
    cell (the papermill convention the notebook tests use too)."""
    nb = json.loads(Path(src).read_text(encoding="utf-8"))
    if params:
        tagged = [i for i, c in enumerate(nb["cells"]) if "parameters" in c.get("metadata", {}).get("tags", [])]
        if len(tagged) != 1:
            raise ValueError(f"{src}: needs exactly one cell tagged 'parameters', found {len(tagged)}")
        nb["cells"].insert(tagged[0] + 1, {
            "id": "injected-parameters", "cell_type": "code", "execution_count": None, "outputs": [],
            "metadata": {"tags": ["injected-parameters"]},
            "source": "\n".join(f"{k} = {v!r}" for k, v in params.items()),
        })
    dst = Path(dst_dir) / Path(src).name
    dst.write_text(json.dumps(nb, indent=1), encoding="utf-8")
    return dst


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


class LabServer:
    """``with LabServer(root, home) as lab: lab.url("lab/tree/x.ipynb")``; stopped (process group,
    kernels included) on exit."""

    def __init__(self, root_dir: Path, home: Path, log_path: Path, start_timeout: float = 60.0):
        self.root_dir = Path(root_dir)
        self.home = Path(home)
        self.log_path = Path(log_path)
        self.start_timeout = start_timeout
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.proc: subprocess.Popen | None = None
        self._log = None

    def environment(self) -> dict:
        h = self.home
        spec = h / "path" / "kernels" / "python3" / "kernel.json"
        _write_json(spec, {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                           "display_name": "Python 3 (ipykernel)", "language": "python"})
        settings = h / "settings"
        _write_json(settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings",
                    {"fetchNews": "false", "checkForUpdates": False})
        _write_json(settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings",
                    {"windowingMode": "none"})
        env = dict(os.environ)
        env.update({
            "JUPYTER_PATH": str(h / "path"), "JUPYTER_CONFIG_DIR": str(h / "config"),
            "JUPYTER_RUNTIME_DIR": str(h / "runtime"), "JUPYTERLAB_SETTINGS_DIR": str(settings),
            "JUPYTERLAB_WORKSPACES_DIR": str(h / "workspaces"), "JUPYTER_PLATFORM_DIRS": "1",
            "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg",
        })
        env.pop("NBTUNE_GPU", None)
        return env

    def start(self) -> "LabServer":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w", encoding="utf-8")
        cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",
               "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
               f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root_dir}",
               "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
        self.proc = subprocess.Popen(cmd, env=self.environment(), cwd=self.root_dir, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with code {self.proc.returncode} before serving; "
                                   f"log:\n{self.log_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url("api/status"), timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"JupyterLab did not answer /api/status within {self.start_timeout:.0f} s; "
                                   f"log:\n{self.log_text()[-3000:]}")
            time.sleep(0.25)

    def url(self, path: str) -> str:
        sep = "&" if "?" in path else "?"
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}{sep}token={self.token}"

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """SIGTERM to the server's process group (it shuts its kernels down), SIGKILL after 15 s."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False


# ---------------------------------------------------------------------------------------- pages
TRACEBACK = "Traceback (most recent call last)"  # in every IPython error output
PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"  # the notebook in front
STDERR = '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'  # errors render so too
CODE_PROMPTS = f"document.querySelectorAll('{PANEL} .jp-CodeCell .jp-InputPrompt')"


def open_notebook(page, lab: LabServer, name: str, timeout_ms: int = 60_000) -> None:
    """Open ``name`` in Lab and wait until its kernel is idle (started and ready)."""
    workspace = re.sub(r"[^A-Za-z0-9_-]", "-", Path(name).stem)  # its own workspace, nothing restored
    page.goto(lab.url(f"lab/workspaces/{workspace}/tree/{name}?reset"))
    page.wait_for_function(  # the notebook's kernel is named (a session has a kernel) and idle
        f"""() => {{
            const kernel = document.querySelector('{PANEL} .jp-Toolbar-kernelName');
            const state = document.querySelector('{PANEL} .jp-Notebook-ExecutionIndicator');
            return {CODE_PROMPTS}.length > 0 && kernel && kernel.textContent.trim() !== ''
                && !kernel.textContent.includes('No Kernel') && state && state.dataset.status === 'idle';
        }}""", timeout=timeout_ms, polling=200)


def run_all(page) -> None:
    """Run → Run All Cells, from the menu bar."""
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()


def wait_for_run(page, timeout_ms: int) -> list[str]:
    """Wait until every code cell has run (numbered prompt) or one failed (a traceback, after which
    Lab runs nothing more and clears the queue); return the code cells' prompts."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        _wait_for_prompts(page, timeout_ms)
    except PlaywrightTimeout:
        prompts = page.evaluate(f"() => [...{CODE_PROMPTS}].map(p => p.textContent.trim())")
        raise AssertionError(f"the notebook did not finish within {timeout_ms / 1000:.0f} s; "
                             f"code cell prompts: {prompts}") from None
    return page.evaluate(f"() => [...{CODE_PROMPTS}].map(p => p.textContent.trim())")


def _wait_for_prompts(page, timeout_ms: int) -> None:
    page.wait_for_function(
        f"""() => {{
            const prompts = [...{CODE_PROMPTS}].map(p => p.textContent.trim());
            if (prompts.some(p => p.includes('*'))) return false;
            const errs = document.querySelectorAll('{PANEL} {STDERR}');
            if ([...errs].some(e => e.textContent.includes('{TRACEBACK}'))) return true;
            return prompts.length > 0 && prompts.every(p => /^\\[\\d+\\]:$/.test(p));
        }}""",
        timeout=timeout_ms, polling=250)


def error_outputs(page) -> list[str]:
    """The tracebacks shown in the notebook (Lab renders error outputs as stderr text)."""
    texts = page.locator(f"{PANEL} {STDERR}").all_text_contents()
    return [t[:2000] for t in texts if TRACEBACK in t]
