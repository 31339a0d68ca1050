"""The training dashboard: one Plotly figure fed by the metrics stream, live in any notebook.

    dash = Dashboard()                       # a metrics listener: finetune(cfg, listeners=[dash])
    Dashboard.replay("outputs/run/metrics.jsonl")          # the same view from a saved log
    overlay({"r=8": "a/metrics.jsonl", "r=16": "b/metrics.jsonl"})   # several runs on one plot
    dash.save_html("run.html")               # a static page that works offline

Panels: training loss (raw, and smoothed with TensorBoard's debiased EMA) with the held-out loss;
VRAM allocated / reserved / peak against the GPU's capacity; learning rate; grad norm; tokens/s.
A preference run (``train.method`` dpo / orpo, known from its start record or its first reward
figures) gets a third row: the rewards of the chosen and rejected replies and their margin
(held-out margin as markers), the share of pairs whose chosen reply is rewarded higher (train and
held out), and the replies' log-probabilities. The title line is the header: step/total, loss
(and a preference run's margin and accuracy), ETA, elapsed and peak memory.

How it reaches the screen (the fastprogress / HF NotebookProgressCallback way): one
``display(..., display_id=True)`` handle, updated at most every ``min_interval`` seconds (the
last update always lands), with each curve downsampled to at most ``max_points`` points. The
output is a MIME bundle with the figure both as ``application/vnd.plotly.v1+json`` (JupyterLab,
VS Code and saved notebooks render it without a network) and as ``text/html`` that loads
plotly.js from its CDN (Colab and any HTML viewer), so no widget manager is needed anywhere.
Outside Colab each redraw is two updates of the handle, a text-only one (the header) and then the
figure: JupyterLab's Plotly renderer ignores updates of an output it has drawn, and a change of
MIME type makes Lab build a fresh renderer (tests/browser checks the redraws in real Lab).
``mode="widget"`` is the opt-in upgrade: a ``plotly.graph_objects.FigureWidget`` updated in place
(needs ``anywidget``, plotly's widget base).
"""
from __future__ import annotations

import html
import json
import math
import time
from pathlib import Path

SERIES = ("loss", "loss_smooth", "eval_loss", "lr", "grad_norm", "tokens_per_s", "vram_alloc_gib",
          "vram_reserved_gib", "vram_peak_gib")
TRACES = {  # series -> (trace name, row, col)
    "loss": ("loss", 1, 1),
    "loss_smooth": ("loss (smoothed)", 1, 1),
    "eval_loss": ("eval loss", 1, 1),
    "vram_alloc_gib": ("VRAM allocated", 1, 3),
    "vram_reserved_gib": ("VRAM reserved", 1, 3),
    "vram_peak_gib": ("VRAM peak", 1, 3),
    "capacity": ("GPU capacity", 1, 3),
    "lr": ("learning rate", 2, 1),
    "grad_norm": ("grad norm", 2, 2),
    "tokens_per_s": ("tokens/s", 2, 3),
}
COLORS = {"loss": "rgba(76,114,176,0.35)", "loss_smooth": "#4C72B0", "eval_loss": "#C44E52",
          "vram_alloc_gib": "#55A868", "vram_reserved_gib": "#8172B3", "vram_peak_gib": "#DD8452",
          "capacity": "#333333", "lr": "#937860", "grad_norm": "#DA8BC3", "tokens_per_s": "#8C8C8C"}
# a preference run's third row: series -> (trace name, row, col)
PREFERENCE_TRACES = {
    "reward_chosen": ("reward chosen", 3, 1),
    "reward_rejected": ("reward rejected", 3, 1),
    "reward_margin": ("reward margin", 3, 1),
    "eval_reward_margin": ("eval reward margin", 3, 1),
    "reward_accuracy": ("preference accuracy", 3, 2),
    "eval_reward_accuracy": ("eval preference accuracy", 3, 2),
    "logp_chosen": ("log-prob chosen", 3, 3),
    "logp_rejected": ("log-prob rejected", 3, 3),
}
PREFERENCE_SERIES = tuple(PREFERENCE_TRACES)
PREFERENCE_METHODS = ("dpo", "orpo")
COLORS.update({"reward_chosen": "#55A868", "reward_rejected": "#C44E52", "reward_margin": "#4C72B0",
               "eval_reward_margin": "#4C72B0", "reward_accuracy": "#8172B3", "eval_reward_accuracy": "#DD8452",
               "logp_chosen": "#55A868", "logp_rejected": "#C44E52"})
PLOTLY_MIME = "application/vnd.plotly.v1+json"


def fmt_secs(s) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def smooth(values: list[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased at the start."""
    out, last, n = [], 0.0, 0
    for v in values:
        n += 1
        last = last * weight + (1 - weight) * v
        out.append(last / (1 - weight ** n) if weight > 0 else v)
    return out


def downsample(xs: list, ys: list, max_points: int) -> tuple[list, list]:
    """Every k-th point so at most ``max_points`` remain; the last point is always kept."""
    n = len(xs)
    if n <= max_points or max_points < 2:
        return list(xs), list(ys)
    stride = math.ceil((n - 1) / (max_points - 1))
    idx = list(range(0, n - 1, stride)) + [n - 1]
    return [xs[i] for i in idx], [ys[i] for i in idx]


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class Dashboard:
    """A metrics listener that draws the run; call it with each record (``dash(rec)``).

    min_interval: seconds between screen updates (records arriving faster are drawn together).
    max_points: points per curve on screen (the full series stays in ``self.series``).
    smoothing: EMA weight for the smoothed loss (0 = none). mode: "html" (a display handle) or
    "widget" (a FigureWidget). display: False to build the figure without showing it (tests,
    replay, export). capacity_gib: the GPU's memory, when the log does not say it. preference:
    draw the preference panels from the start (None: once the run shows it is a dpo / orpo run).
    """

    def __init__(self, title: str | None = None, min_interval: float = 1.0, max_points: int = 500,
                 smoothing: float = 0.6, mode: str = "html", display: bool = True,
                 capacity_gib: float | None = None, height: int = 520, clock=time.monotonic,
                 preference: bool | None = None):
        if mode not in ("html", "widget"):
            raise ValueError(f"Dashboard mode must be 'html' or 'widget', not {mode!r}")
        if mode == "widget" and display:
            import importlib.util

            if importlib.util.find_spec("anywidget") is None:
                raise ImportError("Dashboard(mode='widget') needs plotly's widget support: pip install anywidget "
                                  "(or use the default mode='html', which needs no widget manager)")
        self.title = title
        self.min_interval = float(min_interval)
        self.max_points = int(max_points)
        self.smoothing = float(smoothing)
        self.mode = mode
        self.display = display
        self.capacity_gib = capacity_gib
        self.height = height
        self.clock = clock
        self.series: dict[str, tuple[list, list]] = {k: ([], []) for k in SERIES if k != "loss_smooth"}
        self.series.update({k: ([], []) for k in PREFERENCE_SERIES})
        self.preference = bool(preference)
        self.state: dict = {"step": 0, "max_steps": None}
        self.renders = 0  # times the figure was redrawn (and shown, when displaying)
        self._last_render = None
        self._dirty = False
        self._finished = False
        self._handle = None
        self.figure = self._build_figure()

    # ------------------------------------------------------------------ records in
    def __call__(self, rec: dict) -> None:
        self.update(rec)

    def update(self, rec: dict) -> None:
        self._ingest(rec)
        event = rec.get("event")
        final = event in ("end", "interrupted") or self._finished
        if event in ("end", "interrupted"):
            self._finished = True
        now = self.clock()
        if final or self._last_render is None or now - self._last_render >= self.min_interval:
            self.render()
        else:
            self._dirty = True

    def flush(self) -> None:
        """Draw whatever arrived since the last update (call when the run is over)."""
        if self._dirty:
            self.render()

    close = flush

    def _ingest(self, rec: dict) -> None:
        event = rec.get("event")
        st = self.state
        if not self.preference and (rec.get("method") in PREFERENCE_METHODS
                                    or any(k in rec for k in PREFERENCE_SERIES)):
            self.preference = True  # a dpo / orpo run: the figure gets its preference row
            self.figure = self._build_figure()
        if rec.get("max_steps"):
            st["max_steps"] = rec["max_steps"]
        if event == "start":
            if rec.get("vram_total_gib"):
                self.capacity_gib = rec["vram_total_gib"]
            if rec.get("gpu"):
                st["gpu"] = rec["gpu"]
            if (rec.get("world_size") or 1) > 1:  # data parallel: losses are global, VRAM is rank 0's GPU
                st["world_size"] = rec["world_size"]
            resumed = rec.get("resumed_from")
            if resumed is not None:  # a resumed run: forget what came after its checkpoint
                for xs, ys in self.series.values():
                    while xs and xs[-1] > resumed:
                        xs.pop()
                        ys.pop()
                st["resumed_from"] = resumed
            st["step"] = rec.get("step", 0)
            st.pop("interrupted", None)
            return
        if event == "interrupted":
            st["interrupted"] = rec.get("step")
            return
        if event == "end":
            st["done"] = True
        step = rec.get("step")
        if step is None:
            return
        if event in ("train", "eval"):
            st["step"] = max(st.get("step") or 0, step) if event == "train" else st.get("step", 0)
        for key in ("loss", "eval_loss", "lr", "grad_norm", "tokens_per_s", "vram_alloc_gib", "vram_reserved_gib",
                    "vram_peak_gib"):
            v = rec.get(key)
            if event not in ("train", "eval", "end") or not _finite(v):
                continue
            if key == "eval_loss" and event != "eval":
                continue
            self._add_point(key, step, v)
        for key in PREFERENCE_SERIES:
            v = rec.get(key)
            if _finite(v) and event == ("eval" if key.startswith("eval_") else "train"):
                self._add_point(key, step, v)
        for key in ("eta_s", "elapsed_s"):
            if event == "train" and rec.get(key) is not None:
                st[key] = rec[key]
        if event == "end":
            st["eta_s"] = 0.0

    def _add_point(self, key: str, step, v) -> None:
        xs, ys = self.series[key]
        if xs and xs[-1] == step and key != "eval_loss":
            ys[-1] = v
        else:
            xs.append(step)
            ys.append(v)

    # ------------------------------------------------------------------ figure
    def _traces(self) -> dict:
        return {**TRACES, **PREFERENCE_TRACES} if self.preference else TRACES

    def _build_figure(self):
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        titles = ("loss", "GPU memory (GiB)", "learning rate", "grad norm", "tokens/s")
        specs = [[{"colspan": 2}, None, {}], [{}, {}, {}]]
        if self.preference:
            titles += ("rewards (chosen, rejected, margin)", "preference accuracy", "reply log-probs")
            specs.append([{}, {}, {}])
        fig = make_subplots(rows=len(specs), cols=3, specs=specs, subplot_titles=titles, horizontal_spacing=0.07,
                            vertical_spacing=0.16 if len(specs) == 2 else 0.1)
        for key, (name, row, col) in self._traces().items():
            style = dict(color=COLORS[key], width=1 if key == "loss" else 2)
            if key == "capacity":
                style["dash"] = "dash"
            markers = key in ("eval_loss", "eval_reward_margin", "eval_reward_accuracy")
            trace = go.Scatter(x=[], y=[], name=name, mode="lines+markers" if markers else "lines",
                               line=style, showlegend=key in ("loss", "loss_smooth", "eval_loss", "vram_alloc_gib",
                                                               "vram_reserved_gib", "vram_peak_gib", "capacity")
                               or key in PREFERENCE_TRACES)
            fig.add_trace(trace, row=row, col=col)
        height = self.height if not self.preference else round(self.height * 1.45)
        fig.update_layout(height=height, margin=dict(l=50, r=20, t=80, b=40), template="plotly_white",
                          legend=dict(orientation="h", yanchor="bottom", y=1.06, x=0, font=dict(size=11)),
                          title=dict(text="", x=0.01, y=0.98, font=dict(size=14)), uirevision="nbtune")
        fig.update_yaxes(exponentformat="e", row=2, col=1)
        fig.update_xaxes(title_text="step", row=len(specs))
        if self.preference:
            fig.update_yaxes(range=[-0.02, 1.02], row=3, col=2)
        return fig

    def trace(self, key: str):
        """The figure's trace for a series key (e.g. "loss_smooth", "eval_loss", "capacity", "reward_margin")."""
        name = self._traces()[key][0]
        return next(t for t in self.figure.data if t.name == name)

    def _curves(self) -> dict[str, tuple[list, list]]:
        curves = {k: downsample(*self.series[k], self.max_points) for k in self.series
                  if self.preference or k not in PREFERENCE_TRACES}
        xs, ys = self.series["loss"]
        curves["loss_smooth"] = downsample(xs, smooth(ys, self.smoothing), self.max_points)
        cap = self.capacity_gib
        top = self.state.get("max_steps") or (xs[-1] if xs else 1)
        curves["capacity"] = ([0, top], [cap, cap]) if cap else ([], [])
        return curves

    def header(self) -> str:
        st = self.state
        step, total = st.get("step") or 0, st.get("max_steps")
        parts = [f"step {step}/{total}" if total else f"step {step}"]
        if total:
            parts[0] += f" ({100 * step / total:.0f}%)"
        loss = self.series["loss"][1]
        if loss:
            parts.append(f"loss {loss[-1]:.4f}")
        ev = self.series["eval_loss"][1]
        if ev:
            parts.append(f"eval {ev[-1]:.4f}")
        margin, accuracy = self.series["reward_margin"][1], self.series["reward_accuracy"][1]
        if margin:
            parts.append(f"margin {margin[-1]:.3f}")
        if accuracy:
            held = self.series["eval_reward_accuracy"][1]
            parts.append(f"accuracy {100 * accuracy[-1]:.0f}%" + (f" (eval {100 * held[-1]:.0f}%)" if held else ""))
        if st.get("interrupted") is not None:
            parts.append(f"interrupted at step {st['interrupted']} (resume to continue)")
        elif st.get("done"):
            parts.append(f"done in {fmt_secs(st.get('elapsed_s'))}")
        else:
            parts.append(f"ETA {fmt_secs(st.get('eta_s'))}")
            if st.get("elapsed_s") is not None:
                parts.append(f"elapsed {fmt_secs(st.get('elapsed_s'))}")
        peaks = self.series["vram_peak_gib"][1]
        if peaks:
            cap = f" / {self.capacity_gib:.2f}" if self.capacity_gib else ""
            parts.append(f"peak VRAM {max(peaks):.2f}{cap} GiB" + (" (GPU 0)" if st.get("world_size") else ""))
        if st.get("world_size"):
            parts.append(f"data parallel x{st['world_size']}")
        text = " · ".join(parts)
        return f"{self.title} — {text}" if self.title else text

    def refresh(self) -> None:
        """Bring the figure up to date with the series (no display)."""
        curves = self._curves()
        with self.figure.batch_update():
            for key, (xs, ys) in curves.items():
                t = self.trace(key)
                t.x, t.y = xs, ys
            self.figure.layout.title.text = html.escape(self.header())
            no_gpu = not self.series["vram_reserved_gib"][0] and not self.capacity_gib
            self.figure.layout.annotations = [a for a in self.figure.layout.annotations if a.name != "nogpu"]
            if no_gpu:
                self.figure.add_annotation(text="no GPU: CPU run", name="nogpu", showarrow=False, xref="x2 domain",
                                           yref="y2 domain", x=0.5, y=0.5, font=dict(color="#888"))

    # ------------------------------------------------------------------ output
    def render(self) -> None:
        self.refresh()
        self.renders += 1
        self._last_render = self.clock()
        self._dirty = False
        if self.display:
            self._show()

    def _show(self) -> None:
        from IPython.display import display

        if self.mode == "widget":
            if self._handle is None:
                self._handle = _figure_widget(self.figure)
                display(self._handle)
            else:
                with self._handle.batch_update():
                    for src, dst in zip(self.figure.data, self._handle.data):
                        dst.x, dst.y = src.x, src.y
                    self._handle.layout.title.text = self.figure.layout.title.text
                    self._handle.layout.annotations = self.figure.layout.annotations
            return
        bundle = self.mimebundle()
        if self._handle is None:
            self._handle = display(bundle, raw=True, display_id=True)
            return
        if _redraw_needs_new_renderer():
            # JupyterLab (and Notebook 7) keep an output's renderer when an update has the same
            # preferred MIME type, and Plotly's renderer draws once and ignores later models
            # (plotly/plotly.py#3053): the figure would stay at its first frame. Lab builds a new
            # renderer when the MIME type changes, so pass through a text-only update first.
            self._handle.update({"text/plain": bundle["text/plain"]}, raw=True)
        self._handle.update(bundle, raw=True)

    def figure_dict(self) -> dict:
        return json.loads(self.figure.to_json())

    def html(self, include_plotlyjs="cdn", full_html: bool = False) -> str:
        return self.figure.to_html(include_plotlyjs=include_plotlyjs, full_html=full_html,
                                   config={"displaylogo": False, "responsive": True})

    def mimebundle(self) -> dict:
        fig = self.figure_dict()
        fig["config"] = {"displaylogo": False, "responsive": True}
        return {PLOTLY_MIME: fig, "text/html": self.html(), "text/plain": self.header()}

    def _repr_mimebundle_(self, include=None, exclude=None):
        if self._dirty or self.renders == 0:
            self.refresh()
        return self.mimebundle()

    def save_html(self, path, include_plotlyjs=True) -> Path:
        """A standalone HTML page of the current figure (plotly.js embedded: works offline)."""
        self.refresh()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.html(include_plotlyjs=include_plotlyjs, full_html=True), encoding="utf-8")
        return path

    # ------------------------------------------------------------------ logs
    @classmethod
    def replay(cls, log, display: bool = False, **kwargs) -> "Dashboard":
        """The dashboard of a finished (or running) run from its metrics.jsonl (or its records)."""
        dash = cls(display=display, min_interval=0.0, **kwargs)
        for rec in _records(log):
            dash._ingest(rec)
        dash.render()
        return dash


def _redraw_needs_new_renderer() -> bool:
    """False in Colab, which shows the ``text/html`` part and re-renders it on every update."""
    import sys

    return "google.colab" not in sys.modules


def _records(log) -> list[dict]:
    if isinstance(log, (str, Path)):
        path = Path(log)
        if path.is_dir():
            path = path / "metrics.jsonl"
        with open(path, encoding="utf-8") as f:  # the JSONL of nbtune.train.metrics, read without torch
            return [json.loads(line) for line in f if line.strip()]
    if hasattr(log, "log_path"):  # a FinetuneResult
        return _records(log.log_path)
    return list(log)


def _figure_widget(fig):
    try:
        import plotly.graph_objects as go

        return go.FigureWidget(fig)
    except ImportError as e:
        raise ImportError(f"Dashboard(mode='widget') needs plotly's widget support ({e}); "
                          "pip install anywidget, or use the default mode='html'") from None


def replay(log, **kwargs) -> Dashboard:
    """``Dashboard.replay``: the dashboard of a saved metrics.jsonl (a path, a run folder or a result)."""
    return Dashboard.replay(log, **kwargs)


def export_html(log, path, **kwargs) -> Path:
    """A standalone HTML dashboard of a saved run."""
    return Dashboard.replay(log, **kwargs).save_html(path)


def overlay(runs, smoothing: float = 0.6, max_points: int = 500, height: int = 420):
    """Several runs on one figure: smoothed training loss and held-out loss, one color per run.

    ``runs``: {label: log} or a list of logs (a metrics.jsonl path, a run folder, a result or a
    list of records); labels default to the run folders' names."""
    import plotly.graph_objects as go
    from plotly.colors import qualitative
    from plotly.subplots import make_subplots

    if not isinstance(runs, dict):
        runs = {_label(r, i): r for i, r in enumerate(runs)}
    fig = make_subplots(rows=1, cols=2, subplot_titles=("training loss (smoothed)", "held-out loss"),
                        horizontal_spacing=0.08)
    for i, (label, log) in enumerate(runs.items()):
        dash = Dashboard.replay(log, smoothing=smoothing, max_points=max_points)
        color = qualitative.Plotly[i % len(qualitative.Plotly)]
        xs, ys = dash._curves()["loss_smooth"]
        fig.add_trace(go.Scatter(x=xs, y=ys, name=label, legendgroup=label, line=dict(color=color, width=2)), 1, 1)
        ex, ey = dash.series["eval_loss"]
        fig.add_trace(go.Scatter(x=ex, y=ey, name=f"{label} (eval)", legendgroup=label, mode="lines+markers",
                                 line=dict(color=color, dash="dot"), showlegend=False), 1, 2)
    fig.update_layout(height=height, template="plotly_white", margin=dict(l=50, r=20, t=50, b=40))
    fig.update_xaxes(title_text="step")
    return fig


def _label(log, i: int) -> str:
    if isinstance(log, (str, Path)):
        p = Path(log)
        return (p if p.is_dir() else p.parent).name or f"run {i + 1}"
    if hasattr(log, "output_dir"):
        return Path(log.output_dir).name
    return f"run {i + 1}"
