"""The notebooks in a real browser: JupyterLab on localhost, headless Chromium, Playwright.

What nbclient cannot see (tests/notebooks/ checks the outputs' JSON): that the front end turns
those outputs into something a user sees and can use. Each test opens a copy of a notebook in
Lab, runs it from the *Run* menu, and reads the page:

- 02_memory_planner: the planner widget's controls render (core ipywidgets, through Lab's widget
  manager) with its Plotly figures, GPU memory and host RAM (plotly's Lab mime renderer, inside an
  Output widget); the badge and the GPU figure's title show the plan of the controls' values; changing the GPU dropdown and the
  seq_len box in the page re-plans in the kernel and redraws both; the config button fills the
  text area. The notebook's own stacked-bar figure renders too.
- 01_quickstart (tiny CPU run on the embedded model): the live training dashboard renders and is
  redrawn in place while training (every header it showed is recorded by a MutationObserver),
  ending on the finished run's header.

Screenshots: test-artifacts/browser/ (see conftest.py).
"""
import re
from pathlib import Path

import pytest

from nbtune.ui.planner_widget import PlannerWidget

from .lab import copy_notebook, error_outputs, open_notebook, run_all, wait_for_run

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(300)]

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
NUMBERED = re.compile(r"^\[\d+\]:$")


def run_notebook(page, lab, name: str, timeout_ms: int, before_run: str | None = None) -> None:
    """Open, Run All, wait; fail with the notebook's tracebacks if a cell raised. ``before_run``:
    JavaScript evaluated in the page once the notebook is open, before it runs."""
    open_notebook(page, lab, name)
    if before_run:
        page.evaluate(before_run)
    run_all(page)
    prompts = wait_for_run(page, timeout_ms)
    errors = error_outputs(page)
    assert not errors, f"{name}: a cell raised in JupyterLab:\n" + "\n---\n".join(errors)
    assert prompts and all(NUMBERED.match(p) for p in prompts), f"{name}: not every cell ran: {prompts}"


def control(widget, label: str):
    """The input element of the planner control whose label reads ``label``."""
    box = widget.locator(".widget-inline-hbox").filter(
        has=widget.page.locator("label.widget-label", has_text=re.compile(rf"^{re.escape(label)}$")))
    return box.locator("select, input").first


def shown(widget) -> dict:
    """What the planner widget shows: badge text and the GPU figure's title."""
    return {"badge": widget.locator(".widget-html").first.inner_text(),
            "title": widget.locator(".widget-output .js-plotly-plot .gtitle").first.text_content()}


def wait_shown(widget, expected) -> dict:
    """Wait until the page shows the plan of ``expected`` (a PlannerWidget on the test's side that
    holds the same control values), then return what it shows."""
    p = expected.plan
    title = f"{p.model.name}: {p.peak_gib:.2f} GiB of {p.capacity_gib:.2f} GiB ({p.gpu.name})"
    widget.locator(".widget-output .js-plotly-plot .gtitle", has_text=title).wait_for(timeout=30_000)
    widget.locator(".widget-html", has_text=p.verdict()).first.wait_for(timeout=30_000)
    return shown(widget)


def test_planner_widget_renders_and_reacts(lab, lab_root, page, artifacts):
    name = "02_memory_planner.ipynb"
    copy_notebook(NOTEBOOKS / name, lab_root)
    run_notebook(page, lab, name, timeout_ms=120_000)

    widget = page.locator(".nbtune-planner")
    assert widget.count() == 1, "the planner widget did not render (ipywidgets manager missing?)"
    widget.scroll_into_view_if_needed()
    labels = widget.locator("label.widget-label").all_inner_texts()
    for want in ("model", "GPU", "seq_len", "batch", "LoRA r", "dtype", "checkpointing", "optimizer"):
        assert want in labels, f"planner control {want!r} missing; labels shown: {labels}"
    figures = widget.locator(".widget-output .js-plotly-plot")
    assert figures.count() == 2, "the planner's two Plotly figures (GPU memory, host RAM) did not render"
    figure = figures.first  # the GPU memory breakdown
    assert figure.locator(".main-svg").first.is_visible()
    assert figure.locator("g.trace.bars").count() >= 5, "the breakdown bars are missing"
    assert figures.nth(1).locator(".main-svg").first.is_visible(), "the host RAM figure is not shown"

    # The notebook's own figure (the defaults vs. no 4-bit / no checkpointing) rendered too.
    assert page.locator(".jp-Notebook .js-plotly-plot").count() - figures.count() >= 1, \
        "the notebook's stacked-bar figure did not render"

    # The page shows the plan of the values its controls show (the notebook's last cell set seq_len
    # from code: the synced value must be in the box).
    mirror = PlannerWidget(model=control(widget, "model").input_value(), gpu=control(widget, "GPU").input_value(),
                           seq_len=int(control(widget, "seq_len").input_value()),
                           batch_size=int(control(widget, "batch").input_value()))
    before = wait_shown(widget, mirror)
    widget.screenshot(path=artifacts.save("planner-after-run-all.png"))
    page.screenshot(path=artifacts.save("planner-page.png"))

    # A user picks another GPU: the kernel re-plans and the badge and figure redraw.
    gpu = "A100 80GB" if mirror.gpu.value != "A100 80GB" else "T4"
    control(widget, "GPU").select_option(label=gpu)
    mirror.gpu.value = gpu
    after_gpu = wait_shown(widget, mirror)
    assert after_gpu["title"] != before["title"] and gpu in after_gpu["badge"], (before, after_gpu)

    # ... and types a longer context (Enter commits a BoundedIntText).
    seq = int(control(widget, "seq_len").input_value()) * 8
    box = control(widget, "seq_len")
    box.fill(str(seq))
    box.press("Enter")
    mirror.seq_len.value = seq
    after_seq = wait_shown(widget, mirror)
    assert after_seq["title"] != after_gpu["title"], (after_gpu, after_seq)

    # The config button writes the matching %%finetune cell into the text area (which holds the
    # notebook's earlier config, for the shorter context, until the click lands).
    area = widget.locator(".widget-textarea textarea")
    assert f"max_seq_length: {seq}" not in area.input_value()
    widget.get_by_role("button", name="make %%finetune config").click()
    page.wait_for_function("([el, want]) => el.value.includes(want)",
                           arg=[area.element_handle(), f"max_seq_length: {seq}"], timeout=30_000)
    text = area.input_value()
    assert text == mirror.plan.to_yaml(magic=True), text
    widget.screenshot(path=artifacts.save("planner-after-controls.png"))


# A MutationObserver that records every header the training dashboard shows ("step i/n ..."),
# so the test sees the redraws that happen while the run goes on, however fast.
RECORD_DASHBOARD_HEADERS = """() => {
    window.__nbtuneHeaders = [];
    const record = () => {
        for (const t of document.querySelectorAll('.jp-Notebook .js-plotly-plot .gtitle')) {
            const text = t.textContent.trim();
            const seen = window.__nbtuneHeaders;
            if (/^step \\d+/.test(text) && seen[seen.length - 1] !== text) seen.push(text);
        }
    };
    new MutationObserver(record).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def test_quickstart_live_dashboard(lab, lab_root, page, artifacts):
    name = "01_quickstart.ipynb"
    steps = 3
    copy_notebook(NOTEBOOKS / name, lab_root, MAX_STEPS=steps, MAX_ROWS=8, EVAL_ROWS=4, MAX_SEQ_LENGTH=128,
                  OUTPUT_DIR=str(lab_root / "quickstart-run"))
    run_notebook(page, lab, name, timeout_ms=240_000, before_run=RECORD_DASHBOARD_HEADERS)

    dashboard = page.locator(".jp-Notebook .js-plotly-plot").filter(has_text="tokens/s")
    assert dashboard.count() == 1, "the live dashboard figure did not render"
    dashboard.scroll_into_view_if_needed()
    header = dashboard.locator(".gtitle").text_content()
    assert header.startswith(f"step {steps}/{steps}") and "done in" in header, header
    for panel in ("loss", "GPU memory (GiB)", "learning rate", "grad norm", "tokens/s"):
        assert dashboard.locator(".annotation-text", has_text=panel).count() >= 1, f"panel {panel!r} missing"
    lines = [d for d in dashboard.locator("g.trace.scatter path.js-line").evaluate_all(
        "els => els.map(e => e.getAttribute('d') || '')") if d.count("L") >= 1]
    assert lines, "no curve was drawn on the dashboard"
    headers = page.evaluate("window.__nbtuneHeaders")
    assert len(headers) >= 2 and headers[-1] == header, f"the dashboard was not redrawn in place: {headers}"
    dashboard.screenshot(path=artifacts.save("quickstart-dashboard.png"))
