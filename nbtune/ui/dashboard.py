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
held out), and the replies' log-probabilities. A GRPO run (``train.method: grpo``) gets a third
row too: the mean reward per reward function and summed (held-out mean as markers), the
completions' mean length, and the KL to the reference. The title line is the header: step/total,
loss (and a preference run's margin and accuracy, a GRPO run's mean reward), ETA, elapsed and peak
memory.

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

A redraw runs inside the trainer's logging, between two steps, so it is kept cheap: the figure's
dict is made from a shell taken from Plotly once (template, axes, styles) plus the curves, not
through Plotly's validating object model, and the ``text/html`` part reuses the plotly.js script
tag made once per process (Plotly's ``include_plotlyjs="cdn"`` re-reads and hashes the 4.6 MB
plotly.js on every call). ``self.figure``, the Plotly object, is brought up to date when read.
"""
from __future__ import annotations

import copy
import functools
import html
import json
import math
import time
from pathlib import Path

from ..methods import PREFERENCE_METHODS

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
COLORS.update({"reward_chosen": "#55A868", "reward_rejected": "#C44E52", "reward_margin": "#4C72B0",
               "eval_reward_margin": "#4C72B0", "reward_accuracy": "#8172B3", "eval_reward_accuracy": "#DD8452",
               "logp_chosen": "#55A868", "logp_rejected": "#C44E52"})
# a GRPO run's third row (and one "rewards/<name>" series per reward function, on the first panel)
GRPO_TRACES = {
    "reward": ("mean reward", 3, 1),
    "eval_reward": ("eval mean reward", 3, 1),
    "completion_length": ("completion length", 3, 2),
    "kl": ("KL to reference", 3, 3),
}
GRPO_SERIES = tuple(GRPO_TRACES)
GRPO_METHODS = ("grpo",)
REWARD_PREFIX = "rewards/"
REWARD_COLORS = ("#55A868", "#8172B3", "#DD8452", "#DA8BC3", "#937860", "#8C8C8C")
COLORS.update({"reward": "#4C72B0", "eval_reward": "#C44E52", "completion_length": "#55A868", "kl": "#8172B3"})
PLOTLY_MIME = "application/vnd.plotly.v1+json"
CONFIG = {"displaylogo": False, "responsive": True}
NO_GPU = dict(text="no GPU: CPU run", name="nogpu", showarrow=False, xref="x2 domain", yref="y2 domain", x=0.5, y=0.5,
              font=dict(color="#888"))


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
        self.series.update({k: ([], []) for k in PREFERENCE_SERIES + GRPO_SERIES})
        self.preference = bool(preference)
        self.grpo = False  # a GRPO run: its reward row, with one curve per reward function in reward_names
        self.reward_names: list[str] = []
        self.state: dict = {"step": 0, "max_steps": None}
        self.renders = 0  # times the figure was redrawn (and shown, when displaying)
        self._last_render = None
        self._dirty = False
        self._finished = False
        self._handle = None
        self._new_figure()

    def _new_figure(self) -> None:
        """(Re)build the Plotly figure and its JSON shell, e.g. once a run shows it is a preference run."""
        self._figure = self._build_figure()
        self._shell = json.loads(self._figure.to_json())  # the figure as Plotly writes it, curves empty
        self._drawn = None  # what the last draw showed: curves, title, no_gpu
        self._dict = None  # the figure dict of the last draw
        self._figure_stale = False

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
            self._new_figure()
        new_rewards = [k[len(REWARD_PREFIX):] for k in rec if k.startswith(REWARD_PREFIX)
                       and k[len(REWARD_PREFIX):] not in self.reward_names]
        if new_rewards or (not self.grpo and (rec.get("method") in GRPO_METHODS or "completion_length" in rec)):
            self.grpo = True  # a GRPO run: the figure gets its reward row (a curve per reward function)
            self.reward_names += new_rewards
            self.series.update({REWARD_PREFIX + n: ([], []) for n in new_rewards})
            self._new_figure()
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
        for key in PREFERENCE_SERIES + GRPO_SERIES + tuple(REWARD_PREFIX + n for n in self.reward_names):
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
        if self.grpo:
            rewards = {REWARD_PREFIX + n: (f"reward {n}", 3, 1) for n in self.reward_names}
            return {**TRACES, **GRPO_TRACES, **rewards}
        return {**TRACES, **PREFERENCE_TRACES} if self.preference else TRACES

    def _color(self, key: str) -> str:
        if key.startswith(REWARD_PREFIX):
            return REWARD_COLORS[self.reward_names.index(key[len(REWARD_PREFIX):]) % len(REWARD_COLORS)]
        return COLORS[key]

    def _build_figure(self):
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        titles = ("loss", "GPU memory (GiB)", "learning rate", "grad norm", "tokens/s")
        specs = [[{"colspan": 2}, None, {}], [{}, {}, {}]]
        if self.grpo:
            titles += ("rewards (mean per function, summed)", "completion length (tokens)", "KL to reference")
            specs.append([{}, {}, {}])
        elif self.preference:
            titles += ("rewards (chosen, rejected, margin)", "preference accuracy", "reply log-probs")
            specs.append([{}, {}, {}])
        fig = make_subplots(rows=len(specs), cols=3, specs=specs, subplot_titles=titles, horizontal_spacing=0.07,
                            vertical_spacing=0.16 if len(specs) == 2 else 0.1)
        for key, (name, row, col) in self._traces().items():
            style = dict(color=self._color(key), width=1 if key == "loss" else 2)
            if key == "capacity":
                style["dash"] = "dash"
            markers = key in ("eval_loss", "eval_reward_margin", "eval_reward_accuracy", "eval_reward")
            trace = go.Scatter(x=[], y=[], name=name, mode="lines+markers" if markers else "lines",
                               line=style, showlegend=key in ("loss", "loss_smooth", "eval_loss", "vram_alloc_gib",
                                                               "vram_reserved_gib", "vram_peak_gib", "capacity")
                               or key in PREFERENCE_TRACES or key in GRPO_TRACES or key.startswith(REWARD_PREFIX))
            fig.add_trace(trace, row=row, col=col)
        height = self.height if len(specs) == 2 else round(self.height * 1.45)
        fig.update_layout(height=height, margin=dict(l=50, r=20, t=80, b=40), template="plotly_white",
                          legend=dict(orientation="h", yanchor="bottom", y=1.06, x=0, font=dict(size=11)),
                          title=dict(text="", x=0.01, y=0.98, font=dict(size=14)), uirevision="nbtune")
        fig.update_yaxes(exponentformat="e", row=2, col=1)
        fig.update_xaxes(title_text="step", row=len(specs))
        if self.preference and not self.grpo:
            fig.update_yaxes(range=[-0.02, 1.02], row=3, col=2)
        return fig

    @property
    def figure(self):
        """The Plotly figure of the last draw (brought up to date here, not at every redraw)."""
        if self._figure_stale:
            self._sync_figure()
        return self._figure

    def trace(self, key: str):
        """The figure's trace for a series key (e.g. "loss_smooth", "eval_loss", "capacity", "reward_margin")."""
        name = self._traces()[key][0]
        return next(t for t in self.figure.data if t.name == name)

    def _curves(self) -> dict[str, tuple[list, list]]:
        traces = self._traces()
        curves = {k: downsample(*self.series[k], self.max_points) for k in self.series if k in traces}
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
        reward = self.series["reward"][1]
        if reward:
            held = self.series["eval_reward"][1]
            parts.append(f"reward {reward[-1]:.3f}" + (f" (eval {held[-1]:.3f})" if held else ""))
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

    def _draw(self) -> dict:
        """The figure dict of the series now: the shell's traces with the curves, the header as the
        title and, without a GPU, a note on the memory panel. Equal to what Plotly writes for
        ``self.figure`` brought up to date (tests/finetune/test_dashboard.py checks it)."""
        curves = self._curves()
        title = html.escape(self.header())
        no_gpu = not self.series["vram_reserved_gib"][0] and not self.capacity_gib
        shell = self._shell
        data = [dict(t, x=curves[key][0], y=curves[key][1]) for t, key in zip(shell["data"], self._traces())]
        layout = dict(shell["layout"], title=dict(shell["layout"]["title"], text=title))
        if no_gpu:
            layout["annotations"] = shell["layout"]["annotations"] + [_no_gpu_annotation()]
        self._drawn = (curves, title, no_gpu)
        self._dict = {"data": data, "layout": layout}
        self._figure_stale = True
        return self._dict

    def _sync_figure(self) -> None:
        curves, title, no_gpu = self._drawn
        fig = self._figure
        with fig.batch_update():
            for t, key in zip(fig.data, self._traces()):
                t.x, t.y = curves[key]
            fig.layout.title.text = title
            fig.layout.annotations = [a for a in fig.layout.annotations if a.name != "nogpu"]
            if no_gpu:
                fig.add_annotation(**NO_GPU)
        self._figure_stale = False

    def refresh(self) -> None:
        """Bring the figure up to date with the series (no display)."""
        self._draw()
        self._sync_figure()

    # ------------------------------------------------------------------ output
    def render(self) -> None:
        self._draw()
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
            else:  # the widget straight from the curves (one validation, not two)
                curves, title, _ = self._drawn
                with self._handle.batch_update():
                    for dst, key in zip(self._handle.data, self._traces()):
                        dst.x, dst.y = curves[key]
                    self._handle.layout.title.text = title
                    self._handle.layout.annotations = self._dict["layout"]["annotations"]
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

    def _current(self) -> dict:
        return self._dict if self._dict is not None else self._draw()

    def figure_dict(self) -> dict:
        """The figure of the last draw as a dict of JSON values (a copy of its own)."""
        return copy.deepcopy(self._current())

    def html(self, include_plotlyjs="cdn", full_html: bool = False, div_id: str | None = None) -> str:
        """The figure of the last draw as Plotly's ``to_html`` writes it (``div_id``: the plot's
        element id, a fresh one by default)."""
        return figure_html(self._current(), include_plotlyjs=include_plotlyjs, full_html=full_html, div_id=div_id)

    def mimebundle(self) -> dict:
        """The display bundle of the last draw; its figure dict shares the constant parts (template,
        styles) between bundles: read it, do not change it."""
        fig = dict(self._current(), config=dict(CONFIG))
        return {PLOTLY_MIME: fig, "text/html": self.html(), "text/plain": self.header()}

    def _repr_mimebundle_(self, include=None, exclude=None):
        if self._dirty or self.renders == 0:
            self._draw()
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


@functools.lru_cache(maxsize=1)
def _no_gpu_annotation() -> dict:
    import plotly.graph_objects as go

    return go.layout.Annotation(**NO_GPU).to_plotly_json()


def figure_html(fig: dict, include_plotlyjs="cdn", full_html: bool = False, div_id: str | None = None) -> str:
    """Plotly's ``to_html`` of a figure dict (with the dashboard's config), the CDN script tag made
    once per process: the same text as Plotly's, without re-reading and hashing plotly.js."""
    import uuid

    from plotly.io import to_html

    div_id = div_id or str(uuid.uuid4())
    splice = _plotlyjs_splice() if include_plotlyjs == "cdn" else None
    if splice is None:
        return to_html(fig, config=dict(CONFIG), include_plotlyjs=include_plotlyjs, full_html=full_html,
                       validate=False, div_id=div_id)
    bare = to_html(fig, config=dict(CONFIG), include_plotlyjs=False, full_html=full_html, validate=False,
                   div_id=div_id)
    return _insert_loader(bare, *splice)


def _insert_loader(bare: str, offset: int, loader: str) -> str:
    """``bare`` (Plotly's HTML without plotly.js) with ``loader`` put ``offset`` characters after
    the end of the figure's outer ``<div>`` tag (the first of the text: ``<div style=...>`` in recent Plotly
    releases, a bare ``<div>`` in 5.20), where Plotly puts its script tag."""
    at = bare.index(">", bare.index("<div")) + 1 + offset
    return bare[:at] + loader + bare[at:]


@functools.lru_cache(maxsize=1)
def _plotlyjs_splice() -> tuple[int, str] | None:
    """Where and what Plotly's ``include_plotlyjs="cdn"`` adds to the HTML without plotly.js:
    (offset, script tags), found once by rendering probe figures both ways; None when inserting
    them does not give back Plotly's own text for every probe (then each call asks Plotly)."""
    from plotly.io import to_html

    def both(fig, full_html):
        return [to_html(fig, include_plotlyjs=mode, full_html=full_html, validate=False, div_id="probe")
                for mode in ("cdn", False)]

    with_js, bare = both({"data": [], "layout": {}}, False)
    if "<div" not in bare:
        return None
    start = bare.index(">", bare.index("<div")) + 1
    at = start
    while at < len(bare) and with_js[at] == bare[at]:
        at += 1
    loader = with_js[at:at + len(with_js) - len(bare)]
    splice = (at - start, loader)
    probes = [({"data": [], "layout": {}}, False), ({"data": [{"type": "scatter", "x": [1], "y": [2]}],
                                                     "layout": {"height": 520, "width": 700}}, True)]
    for fig, full_html in probes:
        with_js, bare = both(fig, full_html)
        if _insert_loader(bare, *splice) != with_js:
            return None
    return splice


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
