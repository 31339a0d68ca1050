"""Every notebook in notebooks/, executed top to bottom through nbclient and a real ipykernel on CPU.

Each notebook has a cell tagged ``parameters``; the test inserts a cell after it that makes the run
tiny (a few steps, rows and tokens on the embedded model), the papermill way. The kernel is a
``python3`` kernelspec written to a temporary JUPYTER_PATH that points at this interpreter, so the
notebooks run in the same environment as the tests. A notebook passes when no cell errors and the
outputs it exists to show (Plotly figures, the planner widget) are there.
"""
import json
import math
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
PLOTLY = "application/vnd.plotly.v1+json"
WIDGET = "application/vnd.jupyter.widget-view+json"
TIMEOUT = 240  # per cell, seconds
# Notebooks whose every cell is quick get a short per-cell timeout: nbclient can miss a cell's reply
# after widget messages and see it only when the wait times out (jupyter/nbclient#312), which would
# otherwise cost the whole TIMEOUT; a reply found at the timeout is taken as usual.
QUICK_TIMEOUT = 30


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """A python3 kernelspec for this interpreter in a private JUPYTER_PATH, and a quiet offline env."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (nbtune tests)", "language": "python",
    }))
    env = {"JUPYTER_PATH": str(root), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "MPLBACKEND": "Agg", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    os.environ.pop("NBTUNE_GPU", None)
    yield root
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def execute(name: str, tmp_path: Path, timeout: int = TIMEOUT, **params):
    """Run notebooks/<name> with ``params`` injected after its parameters cell; return the executed notebook."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{name}: needs exactly one cell tagged 'parameters'"
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()))
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(tagged[0] + 1, injected)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=timeout, allow_errors=True,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [(i, o.get("ename"), o.get("evalue")) for i, c in enumerate(nb.cells) if c.cell_type == "code"
              for o in c.get("outputs", []) if o.get("output_type") == "error"]
    errors += [(i, "stderr", o["text"][:300]) for i, c in enumerate(nb.cells) if c.cell_type == "code"
               for o in c.get("outputs", []) if o.get("output_type") == "stream" and o.get("name") == "stderr"
               and ("UsageError" in o["text"] or "Traceback" in o["text"])]
    assert not errors, f"{name}: cells raised {errors}"
    return nb


def outputs(nb, mime=None):
    """Every display/result output (optionally only those carrying ``mime``)."""
    outs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") in ("display_data", "execute_result")]
    return [o for o in outs if mime is None or mime in o.get("data", {})]


def text_of(nb) -> str:
    parts = []
    for c in nb.cells:
        for o in c.get("outputs", []) if c.cell_type == "code" else []:
            if o.get("output_type") == "stream":
                parts.append(o.get("text", ""))
            elif "text/plain" in o.get("data", {}):
                parts.append(o["data"]["text/plain"])
    return "\n".join(parts)


def test_notebooks_are_clean_and_valid():
    names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert names, "no notebooks"
    for name in names:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        assert nb.nbformat == 4
        for c in nb.cells:
            if c.cell_type == "code":
                assert not c.outputs and c.execution_count is None, f"{name} is saved with outputs"
        tags = [t for c in nb.cells for t in c.get("metadata", {}).get("tags", [])]
        assert tags.count("parameters") == 1, name
        src = "\n".join(c.source for c in nb.cells)
        assert "colab.research.google.com/github/nbtune/nbtune/blob/main/notebooks/" + name in src, name
        install = [c.source for c in nb.cells if c.cell_type == "code" and "pip install" in c.source]
        for s in install:  # Colab only, and never torch
            assert '"google.colab" in sys.modules' in s and "torch" not in s.split("pip install", 1)[1], name


def read_log(path: Path) -> list[dict]:
    """A run's metrics.jsonl, one record a line."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


TINY_RUN = dict(MAX_STEPS=2, MAX_ROWS=8, EVAL_ROWS=4, MAX_SEQ_LENGTH=128)


@pytest.mark.slow
def test_quickstart(kernel_env, tmp_path):
    nb = execute("01_quickstart.ipynb", tmp_path, OUTPUT_DIR=str(tmp_path / "qs"), **TINY_RUN)
    assert outputs(nb, PLOTLY), "no live dashboard figure"
    text = text_of(nb)
    assert "smollm2-135m-instruct" in text and "held-out loss:" in text and "steps: 2/2" in text
    assert (tmp_path / "qs" / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "qs" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_memory_planner(kernel_env, tmp_path):
    nb = execute("02_memory_planner.ipynb", tmp_path, timeout=QUICK_TIMEOUT)
    assert outputs(nb, PLOTLY), "no plotly figure"
    widgets = outputs(nb, WIDGET)
    assert widgets, "the PlannerWidget did not render a widget view"
    assert "%%finetune" in text_of(nb)
    # free Colab's two budgets: the host's RAM beside the GPU's, and the longest context by both
    text = text_of(nb)
    assert "host: " in text and "offloaded layer inputs" in text
    assert "longest context at batch 1 on free Colab, both budgets" in text


@pytest.mark.slow
def test_your_own_data(kernel_env, tmp_path):
    nb = execute("03_your_own_data.ipynb", tmp_path, MAX_STEPS=2, MAX_SEQ_LENGTH=128,
                 OUTPUT_DIR=str(tmp_path / "own"), DATA_DIR=str(tmp_path / "data"))
    text = text_of(nb)
    for fmt in ("messages format", "prompt_completion format", "qa format"):
        assert fmt in text, fmt
    assert "responses only:" in text and "steps: 2/2" in text
    assert "full (whole documents)" in text and "documents cut across micro-batches" in text  # packing
    assert outputs(nb, PLOTLY), "no dashboard"
    assert (tmp_path / "own" / "adapter" / "adapter_config.json").exists()


@pytest.mark.slow
def test_evaluate_chat_export(kernel_env, tmp_path):
    nb = execute("04_evaluate_chat_export.ipynb", tmp_path, GEN_ROWS=1, GEN_TOKENS=16, OUTPUT_DIR=str(tmp_path / "ev"), **TINY_RUN)
    assert len(outputs(nb, PLOTLY)) >= 2, "dashboard and the before/after figure"
    text = text_of(nb)
    assert "fine-tuned" in text and "PeftModel" in text
    assert (tmp_path / "ev" / "merged" / "config.json").exists()
    assert (tmp_path / "ev" / "export" / "adapter" / "adapter_config.json").exists()


@pytest.mark.slow
def test_dashboard_replay(kernel_env, tmp_path):
    nb = execute("05_dashboard_replay.ipynb", tmp_path, OUTPUT_DIR=str(tmp_path / "cmp"), RANKS=[2, 4], **TINY_RUN)
    assert len(outputs(nb, PLOTLY)) >= 2, "replayed dashboard and overlay"
    assert (tmp_path / "cmp" / "dashboard.html").exists()


@pytest.mark.slow
def test_workshop_kernels(kernel_env, tmp_path):
    nb = execute("06_workshop_kernels.ipynb", tmp_path)
    text = text_of(nb)
    assert "reference" in text and "triton" in text, "both paths demonstrated"
    assert outputs(nb, PLOTLY)


@pytest.mark.slow
def test_preferences_and_rewards(kernel_env, tmp_path):
    nb = execute("07_preferences_and_rewards.ipynb", tmp_path, MAX_STEPS=2, MAX_ROWS=4, EVAL_ROWS=4,
                 MAX_SEQ_LENGTH=384, OUTPUT_DIR=str(tmp_path / "pref"))
    assert len(outputs(nb, PLOTLY)) >= 2, "the live dashboard and the before/after figure"
    text = text_of(nb)
    assert "train pairs: 4" in text and "eval pairs: 4" in text  # the dry run
    assert "held-out: reward margin" in text and "'before':" in text and "'after':" in text
    assert "nll_loss" in text and "log_odds_ratio" in text  # the ORPO run
    assert (tmp_path / "pref" / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "pref-orpo" / "adapter" / "adapter_config.json").exists()
    dashboards = [o for o in outputs(nb, PLOTLY) if any("reward margin" == t.get("name")
                                                        for t in o["data"][PLOTLY].get("data", []))]
    assert dashboards, "the dashboard has no preference row"
    # GRPO on GSM8K prompts, CPU size: 8 prompts, 2 steps of 2 prompts x 2 completions of up to 16 tokens
    assert "train prompts: 8" in text and "eval prompts: 2" in text and "2 prompts x 2 generations" in text
    assert "train mean reward:" in text and "completion length (mean tokens):" in text
    grpo = read_log(tmp_path / "pref-grpo" / "metrics.jsonl")
    train = [r for r in grpo if r.get("event") == "train"]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        for key in ("reward", "rewards/correctness", "rewards/format", "reward_std", "completion_length"):
            assert math.isfinite(r[key]), (key, r)
        assert 0 <= r["rewards/correctness"] <= 1 and 0 <= r["rewards/format"] <= 1
        assert r["reward"] == pytest.approx(r["rewards/correctness"] + r["rewards/format"])
        assert 0 < r["completion_length"] <= 16
    held = [r for r in grpo if r.get("event") == "eval"]
    assert [r["step"] for r in held] == [0, 2] and all(math.isfinite(r["eval_reward"]) for r in held)
    assert (tmp_path / "pref-grpo" / "adapter" / "adapter_config.json").exists()
    traces = [t.get("name") for o in outputs(nb, PLOTLY) for t in o["data"][PLOTLY].get("data", [])]
    assert "mean reward" in traces, "the dashboard has no GRPO row"
    # the reward function of the user's, written to the working folder and named my_rewards:mentions_answer
    assert (tmp_path / "my_rewards.py").exists()
    (mine,) = [r for r in read_log(tmp_path / "pref-grpo-mine" / "metrics.jsonl") if r.get("event") == "train"]
    assert 0 <= mine["rewards/mentions_answer"] <= 0.5
    names = ("correctness", "format", "mentions_answer")
    assert mine["reward"] == pytest.approx(sum(mine[f"rewards/{n}"] for n in names))
    assert "'rewards/mentions_answer':" in text
