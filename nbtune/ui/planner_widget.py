"""``PlannerWidget``: pick a model, GPU and settings; see the memory plan and get the matching cell.

    import nbtune
    nbtune.PlannerWidget()            # last expression of a cell, or display(...)

Controls are core ipywidgets only (Dropdown, Text, BoundedIntText, Checkbox, Button, Textarea,
HTML, Output), which render in Colab's default widget manager, JupyterLab, Jupyter Notebook 7
and VS Code without any extension. Every change re-plans (pure Python, well under a millisecond)
and redraws:

- a badge (HTML widget): fits / too tight / does not fit, with the spare or missing GiB, for both
  budgets: the GPU's memory and the host's RAM;
- a Plotly stacked bar of the breakdown against the GPU's total memory, and a second figure
  (``host_figure``) of the host's RAM: the training row (process, dataset, offloaded layer inputs,
  pool rounding, paged optimizer) and the loading row (process, the loading transient) against the
  host's RAM (a platform profile such as ``colab-t4``; a bare GPU's host RAM is unknown: no line);
- the planner's suggestion (largest batch / seq_len that fit, or the smallest change that fits);
- "make %%finetune config" fills a Textarea with the matching cell.

The figure. Default (``figure="auto"``/``"static"``): a plain ``plotly.graph_objects.Figure``
redrawn into an ``ipywidgets.Output``. That works everywhere core widgets work: the Output widget
is core, and plotly picks the right renderer per front end (Colab's renderer in Colab, the
plotly mimetype in JupyterLab and VS Code). ``figure="widget"`` uses ``go.FigureWidget``
instead (updated in place, no redraw flicker), but since plotly 6 FigureWidget is an anywidget
custom widget: Colab shows it only after ``google.colab.output.enable_custom_widget_manager()``
and it needs the ``anywidget`` package, so it is an opt-in. ``self.figure`` is the figure object
in both cases: one bar trace per breakdown term (``legendgroup`` = the term, ``name`` = its label),
updated in place, which is what tests inspect; ``self.host_figure`` likewise, one trace per host term.
"""
from __future__ import annotations

import html

import ipywidgets as W
import plotly.graph_objects as go

from ..planner import PlannerError, catalog_names, gpu_names, plan
from ..planner.host_memory import HOST_TERMS, TRAINING_TERMS
from ..planner.memory import TERMS
from ..planner.plan import COLORS, HOST_COLORS

HOST_ROWS = ["training", "loading"]

RANKS = [4, 8, 16, 32, 64, 128, 256]
_STYLE = {"description_width": "initial"}


class PlannerWidget(W.VBox):
    """The planner as a notebook widget; ``.plan`` is the current :class:`nbtune.planner.Plan`
    (None while the inputs cannot be planned: ``.error`` says why)."""

    def __init__(self, model: str = "llama-3.1-8b", gpu: str = "T4", seq_len: int = 2048, batch_size: int = 2,
                 lora_rank: int = 16, dtype: str = "auto", load_in_4bit: bool = True,
                 gradient_checkpointing: str = "auto", optimizer: str = "adamw_8bit", figure: str = "auto"):
        names = catalog_names()
        custom = model not in names
        self.model = W.Dropdown(options=names, value=names[0] if custom else model, description="model",
                                style=_STYLE)
        self.model_path = W.Text(value=model if custom else "", placeholder="or a local path / hub id (Enter)",
                                 continuous_update=False, layout=W.Layout(width="280px"))
        self.gpu = W.Dropdown(options=gpu_names() + ["auto"], value=gpu, description="GPU", style=_STYLE)
        self.seq_len = W.BoundedIntText(value=seq_len, min=16, max=1_048_576, step=256, description="seq_len",
                                        style=_STYLE, layout=W.Layout(width="170px"))
        self.batch_size = W.BoundedIntText(value=batch_size, min=1, max=4096, step=1, description="batch",
                                           style=_STYLE, layout=W.Layout(width="130px"))
        self.lora_rank = W.Dropdown(options=sorted(set(RANKS + [lora_rank])), value=lora_rank, description="LoRA r",
                                    style=_STYLE, layout=W.Layout(width="140px"))
        self.dtype = W.Dropdown(options=["auto", "float16", "bfloat16", "float32"], value=dtype, description="dtype",
                                style=_STYLE, layout=W.Layout(width="170px"))
        self.load_in_4bit = W.Checkbox(value=load_in_4bit, description="4-bit NF4 base", indent=False,
                                       layout=W.Layout(width="130px"))
        # "auto" on one GPU is offloaded; the cell it makes keeps "auto", so a --gpus N run picks for itself
        self.checkpointing = W.Dropdown(options=[("auto (offloaded on 1 GPU, as host RAM allows)", "auto"),
                                                 ("offloaded (nbtune)", "offload"),
                                                 ("plain", "plain"), ("off", "off")],
                                        value=gradient_checkpointing, description="checkpointing", style=_STYLE)
        self.optimizer = W.Dropdown(options=[("AdamW 8-bit", "adamw_8bit"), ("AdamW fp32", "adamw"),
                                             ("paged AdamW 8-bit", "paged_adamw_8bit"), ("SGD", "sgd")],
                                    value=optimizer, description="optimizer", style=_STYLE)
        self.badge = W.HTML()
        self.details = W.HTML()
        self.advice = W.HTML()
        self.config_button = W.Button(description="make %%finetune config", icon="file-code-o",
                                      layout=W.Layout(width="220px"))
        self.config_text = W.Textarea(value="", placeholder="the %%finetune cell appears here",
                                      layout=W.Layout(width="100%", height="220px"))
        self.figure_mode = "widget" if figure == "widget" else "static"
        self.figure = self._make_figure()
        self.host_figure = self._make_host_figure()
        self.figure_output = W.Output() if self.figure_mode == "static" else None
        self.plan = None
        self.error: str | None = None

        controls = [self.model, self.model_path, self.gpu, self.seq_len, self.batch_size, self.lora_rank, self.dtype,
                    self.load_in_4bit, self.checkpointing, self.optimizer]
        for control in controls:
            control.observe(self._on_change, names="value")
        self.config_button.on_click(self._on_config)
        figures = [self.figure, self.host_figure] if self.figure_mode == "widget" else [self.figure_output]
        super().__init__([
            W.HBox([self.model, self.model_path, self.gpu]),
            W.HBox([self.seq_len, self.batch_size, self.lora_rank, self.dtype, self.load_in_4bit]),
            W.HBox([self.checkpointing, self.optimizer]),
            self.badge, *figures, self.advice, self.details,
            W.HBox([self.config_button]), self.config_text,
        ])
        self.add_class("nbtune-planner")  # a stable hook for styling and for the browser tests
        self.update()

    # ------------------------------------------------------------------ planning
    def current_inputs(self) -> dict:
        """The keyword arguments for ``nbtune.plan`` that the controls hold."""
        return dict(model=self.model_path.value.strip() or self.model.value, gpu=self.gpu.value,
                    seq_len=int(self.seq_len.value), batch_size=int(self.batch_size.value),
                    lora_rank=int(self.lora_rank.value), dtype=self.dtype.value, load_in_4bit=self.load_in_4bit.value,
                    gradient_checkpointing=self.checkpointing.value, optimizer=self.optimizer.value)

    def update(self):
        """Re-plan from the controls and redraw the badge, figure and advice."""
        try:
            self.plan = plan(**self.current_inputs())
            self.error = None
        except PlannerError as e:
            self.plan, self.error = None, str(e)
        self._render()

    def _on_change(self, change):
        self.update()

    def _on_config(self, button=None):
        if self.plan is None:
            self.config_text.value = f"# no config: {self.error}"
            return
        self.config_text.value = self.plan.to_yaml(magic=True)

    # ------------------------------------------------------------------ drawing
    def _make_figure(self):
        cls = go.FigureWidget if self.figure_mode == "widget" else go.Figure
        fig = cls()
        for term in TERMS:
            fig.add_trace(go.Bar(name=term, legendgroup=term, y=["GPU memory"], x=[0.0], orientation="h",
                                 marker_color=COLORS[term], hovertemplate=f"{term}: %{{x:.2f}} GiB<extra></extra>"))
        # the legend sits at the bottom of the figure (yref "container"), so however many rows it
        # wraps to it never covers the axis title: the margin grows to fit it
        fig.update_layout(barmode="stack", height=300, margin=dict(l=10, r=10, t=40, b=10), xaxis_title="GiB",
                          legend=dict(orientation="h", yref="container", yanchor="bottom", y=0, x=0),
                          template="plotly_white")
        return fig

    def _make_host_figure(self):
        cls = go.FigureWidget if self.figure_mode == "widget" else go.Figure
        fig = cls()
        for term in HOST_TERMS:
            fig.add_trace(go.Bar(name=term, legendgroup=term, y=HOST_ROWS, x=[0.0, 0.0], orientation="h",
                                 marker_color=HOST_COLORS[term], hovertemplate=f"{term}: %{{x:.2f}} GiB<extra></extra>"))
        fig.update_layout(barmode="stack", height=240, margin=dict(l=10, r=10, t=40, b=10), xaxis_title="GiB",
                          legend=dict(orientation="h", yref="container", yanchor="bottom", y=0, x=0),
                          template="plotly_white")
        return fig

    def _render_host(self, p):
        """The host-RAM figure: per process (x world size) training and loading rows, the host's RAM line."""
        fig = self.host_figure
        world = p.world_size
        with fig.batch_update() if self.figure_mode == "widget" else _nullcontext():
            for trace, (term, gib) in zip(fig.data, p.host_breakdown.items()):
                training = gib if term == "process baseline" or term in TRAINING_TERMS else 0.0
                loading = gib if term in ("process baseline", "model loading (transient)") else 0.0
                trace.x = [world * training, world * loading]
                label = p.host_term_label(term)
                trace.name = label
                trace.hovertemplate = f"{html.escape(label)}: %{{x:.2f}} GiB<extra></extra>"
            fig.layout.shapes = ()
            cap = p.host_capacity_gib
            if cap is not None:
                fig.add_shape(type="line", x0=cap, x1=cap, y0=-0.5, y1=1.5, line=dict(color="black", width=2))
                fig.add_shape(type="line", x0=cap - p.host_required_margin_gib, x1=cap - p.host_required_margin_gib,
                              y0=-0.5, y1=1.5, line=dict(color="black", width=1, dash="dot"))
            procs = f", {world} processes" if world > 1 else ""
            of = f" of {cap:.2f} GiB" if cap is not None else " (host RAM unknown)"
            fig.update_layout(
                title=dict(text=f"host RAM{procs}: {p.host_peak_gib:.2f} GiB{of} ({p.gpu.name})", font=dict(size=14)),
                xaxis=dict(range=[0, max(cap or 0.0, p.host_peak_gib) * 1.05]))

    def _render(self):
        p = self.plan
        if p is None:
            self.badge.value = _badge("#6e7781", "cannot plan") + f" <span>{html.escape(self.error or '')}</span>"
            self.advice.value = ""
            self.details.value = ""
            self._show_figure()
            return
        short = p.margin_gib < 0 or (p.host_margin_gib is not None and p.host_margin_gib < 0)
        color = "#1a7f37" if p.fits else ("#cf222e" if short else "#9a6700")
        cap = p.host_capacity_gib
        host = (f"host RAM <b>{p.host_peak_gib:.2f} GiB</b> of {cap:.2f} GiB" if cap is not None else
                f"host RAM {p.host_peak_gib:.2f} GiB (not checked: the host's RAM is unknown for "
                f"{html.escape(p.gpu.name)}; pick a platform such as colab-t4)")
        self.badge.value = (_badge(color, p.verdict()) + f" <span style='margin-left:8px'>peak "
                            f"<b>{p.peak_gib:.2f} GiB</b> of {p.capacity_gib:.2f} GiB on {html.escape(p.gpu.name)}; "
                            f"{host}</span>")
        labels = {t: p.term_label(t) for t in TERMS}
        with self.figure.batch_update() if self.figure_mode == "widget" else _nullcontext():
            for trace, (term, gib) in zip(self.figure.data, p.breakdown.items()):
                trace.x = [gib]
                trace.name = labels[term]
                trace.hovertemplate = f"{html.escape(labels[term])}: %{{x:.2f}} GiB<extra></extra>"
            top = max(p.capacity_gib, p.peak_gib) * 1.05
            self.figure.layout.shapes = ()
            self.figure.add_shape(type="line", x0=p.capacity_gib, x1=p.capacity_gib, y0=-0.5, y1=0.5,
                                  line=dict(color="black", width=2))
            self.figure.add_shape(type="line", x0=p.capacity_gib - p.required_margin_gib,
                                  x1=p.capacity_gib - p.required_margin_gib, y0=-0.5, y1=0.5,
                                  line=dict(color="black", width=1, dash="dot"))
            self.figure.update_layout(
                title=dict(text=f"{p.model.name}: {p.peak_gib:.2f} GiB of {p.capacity_gib:.2f} GiB ({p.gpu.name})",
                           font=dict(size=14)),
                xaxis=dict(range=[0, top]))
        self._render_host(p)
        try:
            self.advice.value = f"<div style='color:#57606a'>{html.escape(p.suggest().message)}</div>"
        except PlannerError as e:
            self.advice.value = f"<div style='color:#57606a'>{html.escape(str(e))}</div>"
        notes = "".join(f"<div style='color:#9a6700'>note: {html.escape(n)}</div>" for n in p.notes)
        tps = p.tokens_per_s
        self.details.value = (f"<div style='color:#57606a;font-size:12px'>{html.escape(p.settings_line())}"
                              + (f" &middot; ~{tps:,.0f} tokens/s (rough roofline)" if tps else "")
                              + f" &middot; coefficients: {html.escape(p.coefficients.source)}</div>{notes}")
        self._show_figure()

    def _show_figure(self):
        if self.figure_output is None:
            return
        try:
            from IPython import get_ipython
        except ImportError:  # pragma: no cover
            return
        if get_ipython() is None:  # not in a kernel (tests, scripts): the figure object is still current
            return
        from IPython.display import clear_output, display

        with self.figure_output:
            clear_output(wait=True)
            display(self.figure)
            display(self.host_figure)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _badge(color: str, text: str) -> str:
    return (f"<span style='background:{color};color:white;border-radius:4px;padding:2px 8px;"
            f"font-weight:600'>{html.escape(text)}</span>")
