"""binder/ follows repo2docker's conventions and stays on the tested stack.

repo2docker (what mybinder builds with) reads binder/ instead of the repository root when it
exists: requirements.txt is installed with pip into the one environment that runs both the Jupyter
server and the kernel (Python >= 3.7 gets no separate kernel env), so the JupyterLab extensions of
ipywidgets and plotly are where Lab finds them; runtime.txt names the Python as ``python-X.Y``;
postBuild and start must be executable, run from the repository root, and start must end by
exec-ing its arguments (it wraps the server command).
"""
import os
import re
import subprocess
import sys
import urllib.parse
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = None

ROOT = Path(__file__).resolve().parents[2]
BINDER = ROOT / "binder"


def pins(path: Path) -> dict[str, str]:
    """``name==version`` lines of a requirements file, names normalised, local labels (+cpu) dropped."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", line.strip())
        if m:
            out[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2).split("+")[0]
    return out


def test_runtime_names_a_supported_python():
    text = (BINDER / "runtime.txt").read_text(encoding="utf-8").strip()
    m = re.fullmatch(r"python-(\d+)\.(\d+)", text)
    assert m, f"binder/runtime.txt must read python-X.Y, not {text!r}"
    if tomllib is not None:
        requires = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["requires-python"]
        low = tuple(int(x) for x in re.search(r">=\s*(\d+)\.(\d+)", requires).groups())
        assert (int(m.group(1)), int(m.group(2))) >= low, f"runtime.txt {text} is below requires-python {requires}"


def test_requirements_pin_the_tested_stack_and_the_jupyter_front_end():
    binder, ci = pins(BINDER / "requirements.txt"), pins(ROOT / "requirements" / "ci.txt")
    # the test runner's pins (the browser tests', the parallel runner's); mybinder brings its own Lab
    test_only = {"jupyterlab", "playwright", "pytest-xdist"}
    drift = {name: (version, binder.get(name)) for name, version in ci.items()
             if name not in test_only and binder.get(name) != version}
    assert not drift, f"binder/requirements.txt differs from requirements/ci.txt (ci, binder): {drift}"
    text = (BINDER / "requirements.txt").read_text(encoding="utf-8")
    assert "download.pytorch.org/whl/cpu" in text and "torch==" in text, "CPU-only torch from the PyTorch CPU index"
    names = {re.split(r"[<>=!~;\s\[]", line.strip(), maxsplit=1)[0].lower() for line in text.splitlines()
             if line.strip() and not line.lstrip().startswith(("#", "-"))}
    for needed in ("ipywidgets", "ipykernel", "plotly", "jupyterlab"):  # widget + plotly renderers in Lab
        assert needed in names, f"binder/requirements.txt lacks {needed}"


def test_postbuild_installs_this_checkout_and_prepulls_the_model():
    script = BINDER / "postBuild"
    assert os.access(script, os.X_OK), "binder/postBuild must be executable"
    text = script.read_text(encoding="utf-8")
    assert text.startswith("#!"), "binder/postBuild needs a shebang line"
    subprocess.run(["bash", "-n", str(script)], check=True)
    commands = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert any(re.search(r"pip install .*(-e )?\.$", c) for c in commands), "postBuild must install nbtune from ."
    assert "nbtune pull" in commands, "postBuild must bake the embedded model and data into the image"


def test_start_sets_the_cpu_environment_and_execs_its_arguments():
    script = BINDER / "start"
    assert os.access(script, os.X_OK), "binder/start must be executable"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM")}
    probe = "import os; print(os.environ['TOKENIZERS_PARALLELISM'], os.environ['OMP_NUM_THREADS'])"
    out = subprocess.run([str(script), sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=30, check=True).stdout.split()
    assert out[:2] == ["false", "2"], out
    # exec, not a child: repo2docker runs `start <server command>`, and the server must get the
    # container's signals. Exec'd, the command's parent is the shell that launched start.
    parent, shell = subprocess.run(["bash", "-c", '"$0" bash -c \'echo $PPID\'; echo $$', str(script)], cwd=ROOT,
                                   env=env, capture_output=True, text=True, timeout=30, check=True).stdout.split()
    assert parent == shell, "binder/start must end with exec \"$@\", not run the command as a child"


def test_launch_link_opens_an_existing_notebook():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"https://mybinder\.org/v2/gh/[^)\s]+", readme)
    assert links, "README has no mybinder launch link"
    for link in links:
        query = urllib.parse.parse_qs(urllib.parse.urlparse(link).query)
        for path in query.get("labpath", []) + query.get("urlpath", []):
            target = path.split("lab/tree/")[-1]
            assert (ROOT / target).is_file(), f"{link} opens {target}, which does not exist"
