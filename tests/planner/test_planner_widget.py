"""PlannerWidget driven through real ipywidgets objects: change a control -> plan and figure change."""
import json

import pytest

ipywidgets = pytest.importorskip("ipywidgets")
go = pytest.importorskip("plotly.graph_objects")

import nbtune  # noqa: E402
from nbtune.planner import TERMS, plan  # noqa: E402
from nbtune.ui.planner_widget import PlannerWidget  # noqa: E402


def bar_values(w):
    return {t.legendgroup: t.x[0] for t in w.figure.data}


def capacity_line(w):
    return w.figure.layout.shapes[0].x0


@pytest.fixture
def widget():
    return PlannerWidget(model="llama-3.1-8b", gpu="T4", seq_len=2048, batch_size=1)


def test_is_a_real_widget_with_core_controls(widget):
    assert isinstance(widget, ipywidgets.VBox)
    for control in (widget.model, widget.gpu, widget.lora_rank, widget.dtype, widget.checkpointing, widget.optimizer):
        assert isinstance(control, ipywidgets.Dropdown)
    assert isinstance(widget.seq_len, ipywidgets.BoundedIntText) and isinstance(widget.batch_size, ipywidgets.BoundedIntText)
    assert isinstance(widget.load_in_4bit, ipywidgets.Checkbox) and isinstance(widget.model_path, ipywidgets.Text)
    assert isinstance(widget.badge, ipywidgets.HTML) and isinstance(widget.config_button, ipywidgets.Button)
    assert isinstance(widget.config_text, ipywidgets.Textarea)
    # default figure: a plain Figure shown through a core Output widget (renders without custom widget managers)
    assert isinstance(widget.figure, go.Figure) and not isinstance(widget.figure, go.FigureWidget)
    assert isinstance(widget.figure_output, ipywidgets.Output)
    assert "application/vnd.jupyter.widget-view+json" in widget._repr_mimebundle_()
    assert nbtune.PlannerWidget is PlannerWidget


def test_initial_state_matches_the_planner(widget):
    expected = plan("llama-3.1-8b", gpu="T4", seq_len=2048, batch_size=1)
    assert widget.plan.peak_gib == pytest.approx(expected.peak_gib)
    assert len(widget.figure.data) == len(TERMS)
    assert sum(bar_values(widget).values()) == pytest.approx(expected.peak_gib)
    assert capacity_line(widget) == pytest.approx(14.748)
    assert "FITS" in widget.badge.value and "#1a7f37" in widget.badge.value
    assert "Largest batch size" in widget.advice.value


def test_changing_seq_len_changes_plan_and_figure(widget):
    before_peak, before_bars = widget.plan.peak_gib, bar_values(widget)
    widget.seq_len.value = 8192
    assert widget.plan.settings.seq_len == 8192
    assert widget.plan.peak_gib > before_peak
    after = bar_values(widget)
    assert after["activations"] > before_bars["activations"]
    assert after["base weights"] == before_bars["base weights"]
    assert "8192" in widget.figure.layout.title.text or f"{widget.plan.peak_gib:.2f}" in widget.figure.layout.title.text


def test_changing_batch_rank_and_checkpointing(widget):
    p0 = widget.plan.peak_gib
    widget.batch_size.value = 4
    p1 = widget.plan.peak_gib
    widget.lora_rank.value = 64
    p2 = widget.plan.peak_gib
    lora_bar = bar_values(widget)["LoRA parameters"]
    widget.checkpointing.value = "off"
    p3 = widget.plan.peak_gib
    assert p0 < p1 < p2 < p3
    assert lora_bar == pytest.approx(plan("llama-3.1-8b", lora_rank=64).breakdown["LoRA parameters"])
    assert "DOES NOT FIT" in widget.badge.value and "#cf222e" in widget.badge.value
    assert "gradient_checkpointing: off -&gt; offload" in widget.advice.value


def test_toggling_4bit_and_gpu(widget):
    nf4 = bar_values(widget)["base weights"]
    widget.load_in_4bit.value = False
    assert bar_values(widget)["base weights"] > 3 * nf4 and not widget.plan.fits
    widget.gpu.value = "A100 80GB"
    assert widget.plan.fits and capacity_line(widget) == pytest.approx(79.15)
    assert widget.plan.settings.dtype == "bfloat16"  # dtype auto on an sm80 GPU
    assert widget.figure.layout.xaxis.range[1] >= 79.15


def test_model_dropdown_and_free_text(widget, tmp_path):
    widget.model.value = "smollm2-135m"
    assert widget.plan.model.name == "smollm2-135m"
    ckpt = tmp_path / "my-model"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8,
        "num_attention_heads": 16, "vocab_size": 32000, "max_position_embeddings": 4096}))
    widget.model_path.value = str(ckpt)
    assert widget.plan.model.name == "my-model" and widget.plan.model.hidden_size == 1024
    widget.model_path.value = str(tmp_path / "missing")
    assert widget.plan is None and "does not exist" in widget.error and "cannot plan" in widget.badge.value
    widget.config_button.click()
    assert widget.config_text.value.startswith("# no config")
    widget.model_path.value = ""
    assert widget.plan is not None and widget.plan.model.name == "smollm2-135m"


def test_button_makes_a_finetune_cell_that_build_config_accepts(widget):
    from nbtune.train import build_config

    widget.seq_len.value = 4096
    widget.lora_rank.value = 32
    widget.checkpointing.value = "plain"
    assert widget.config_text.value == ""
    widget.config_button.click()
    text = widget.config_text.value
    assert text.startswith("%%finetune\n")
    cfg = build_config(text.split("\n", 1)[1])
    assert cfg.model.name == "meta-llama/Llama-3.1-8B-Instruct" and cfg.model.max_seq_length == 4096
    assert cfg.lora.r == 32 and cfg.train.gradient_checkpointing == "plain" and cfg.train.batch_size == 1


def test_figure_widget_mode_is_opt_in():
    pytest.importorskip("anywidget")
    w = PlannerWidget(figure="widget")
    assert isinstance(w.figure, go.FigureWidget) and w.figure_output is None
    before = w.figure.data[5].x[0]
    w.seq_len.value = 16384
    assert w.figure.data[5].x[0] > before


def test_renders_into_the_output_widget_inside_a_kernel(monkeypatch):
    """With an IPython shell present, the figure is displayed into the Output widget."""
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj, **kw: shown.append(obj))
    try:
        w = PlannerWidget(model="smollm2-135m")
        w.seq_len.value = 4096
        assert shown and shown[-2:] == [w.figure, w.host_figure]
    finally:
        InteractiveShell.clear_instance()
        del shell


def test_host_ram_figure_and_badge_on_a_platform():
    """A platform profile carries its RAM: the host figure draws the training and loading rows against
    it and the badge states both budgets; where the host cannot hold every layer input, "auto" offloads
    fewer and the figure shows the rest are not in host RAM."""
    from nbtune.planner.host_memory import HOST_TERMS

    w = PlannerWidget(model="llama-3.1-8b", gpu="colab-t4", seq_len=32768, batch_size=2)
    p = w.plan
    assert [t.legendgroup for t in w.host_figure.data] == list(HOST_TERMS)
    rows = {t.legendgroup: list(t.x) for t in w.host_figure.data}
    training = sum(x[0] for x in rows.values())
    loading = sum(x[1] for x in rows.values())
    assert max(training, loading) == pytest.approx(p.host_peak_gib)
    assert rows["model loading (transient)"][0] == 0 and rows["offloaded activations"][1] == 0
    assert w.host_figure.layout.shapes[0].x0 == pytest.approx(p.host_capacity_gib)
    assert 0 < p.offloaded_layers < p.model.num_layers and p.host_fits
    assert "host RAM" in w.badge.value and f"{p.host_capacity_gib:.2f} GiB" in w.badge.value
    w.gpu.value = "T4"  # a bare GPU: its host's RAM is unknown, no capacity line, and the badge says so
    assert not w.host_figure.layout.shapes and "not checked" in w.badge.value
    assert w.plan.offloaded_layers == w.plan.model.num_layers


def test_a_gated_model_is_said_in_the_widget_and_in_the_cell_it_writes(widget):
    """The default model (Llama 3.1) is gated on the hub: the widget's notes say so, and the cell it
    writes carries the licence step under model.name (a comment: the cell still parses)."""
    from nbtune.train import build_config

    assert "is gated on the hub" in widget.details.value
    widget.config_button.click()
    text = widget.config_text.value
    name_line, comment = text.split("\n")[2:4]
    assert name_line == "  name: meta-llama/Llama-3.1-8B-Instruct"
    assert comment.startswith("  # meta-llama/Llama-3.1-8B-Instruct is gated on the hub: accept its licence")
    for needle in ("huggingface-cli login", "HF_TOKEN", "ungated copy", "unsloth/"):
        assert needle in text, text
    assert build_config(text.split("\n", 1)[1]).model.name == "meta-llama/Llama-3.1-8B-Instruct"
    widget.model.value = "qwen2.5-7b"  # not gated: no note, no comment
    widget.config_button.click()
    assert "gated" not in widget.config_text.value and "gated" not in widget.details.value
    widget.model_path.value = "meta-llama/Llama-3.1-8B"  # a gated hub id typed in, not the catalog's own
    widget.config_button.click()
    assert "  # meta-llama/Llama-3.1-8B is gated on the hub" in widget.config_text.value
