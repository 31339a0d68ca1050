"""The dashboard on real Plotly figures: trace values after N updates, throttling through one
display handle, downsampling, replay of a log, overlays, static HTML."""
import json

import pytest

from nbtune.ui.dashboard import PLOTLY_MIME, Dashboard, downsample, export_html, overlay, smooth


def records(n=10, capacity=14.748, start=0, max_steps=10, with_end=True):
    out = [] if start else [{"event": "eval", "step": 0, "max_steps": 0, "eval_loss": 3.0}]
    out.append({"event": "start", "step": start, "max_steps": max_steps, "gpu": "Tesla T4", "vram_total_gib": capacity,
                **({"resumed_from": start} if start else {})})
    for s in range(start + 1, start + n + 1):
        out.append({"event": "train", "step": s, "max_steps": max_steps, "loss": 3.0 - 0.1 * s, "lr": 2e-4 * s / 10,
                    "grad_norm": 1.0 / s, "tokens_per_s": 1000.0 + s, "tokens": 512 * s,
                    "vram_alloc_gib": 5.0 + 0.01 * s, "vram_reserved_gib": 6.0 + 0.01 * s, "vram_peak_gib": 7.0 + 0.02 * s,
                    "elapsed_s": 2.0 * s, "eta_s": 2.0 * (max_steps - s)})
        if s % 5 == 0:
            out.append({"event": "eval", "step": s, "max_steps": max_steps, "eval_loss": 3.0 - 0.09 * s})
    if with_end:
        out.append({"event": "end", "step": start + n, "max_steps": max_steps})
    return out


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_traces_hold_the_values_after_n_updates():
    dash = Dashboard(display=False, min_interval=0)
    for rec in records(10):
        dash(rec)
    steps = list(range(1, 11))
    assert list(dash.trace("loss").x) == steps
    assert list(dash.trace("loss").y) == pytest.approx([3.0 - 0.1 * s for s in steps])
    assert list(dash.trace("loss_smooth").y) == pytest.approx(smooth([3.0 - 0.1 * s for s in steps], 0.6))
    assert dash.trace("loss_smooth").y[0] == pytest.approx(2.9)  # debiased: starts at the first value
    assert list(dash.trace("eval_loss").x) == [0, 5, 10]
    assert list(dash.trace("eval_loss").y) == pytest.approx([3.0, 2.55, 2.1])
    assert list(dash.trace("lr").y) == pytest.approx([2e-4 * s / 10 for s in steps])
    assert list(dash.trace("grad_norm").y) == pytest.approx([1.0 / s for s in steps])
    assert list(dash.trace("tokens_per_s").y) == pytest.approx([1000.0 + s for s in steps])
    assert list(dash.trace("vram_reserved_gib").y) == pytest.approx([6.0 + 0.01 * s for s in steps])
    assert list(dash.trace("capacity").y) == [14.748, 14.748] and list(dash.trace("capacity").x) == [0, 10]
    header = dash.figure.layout.title.text
    assert "step 10/10 (100%)" in header and "loss 2.0000" in header and "peak VRAM 7.20 / 14.75 GiB" in header
    assert "done in 0:20" in header


def test_header_mid_run_shows_eta_and_elapsed():
    dash = Dashboard(display=False, min_interval=0)
    for rec in records(4, max_steps=60, with_end=False):
        dash(rec)
    assert "step 4/60 (7%)" in dash.header() and "ETA 1:52" in dash.header() and "elapsed 0:08" in dash.header()


def test_cpu_run_says_no_gpu():
    dash = Dashboard(display=False, min_interval=0)
    dash({"event": "start", "step": 0, "max_steps": 2})
    dash({"event": "train", "step": 1, "max_steps": 2, "loss": 1.0})
    assert any(a.text == "no GPU: CPU run" for a in dash.figure.layout.annotations)
    assert list(dash.trace("capacity").x) == []


def test_updates_are_throttled_through_one_display_handle():
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    InteractiveShell.instance()
    clock = Clock()
    dash = Dashboard(min_interval=1.0, clock=clock)
    recs = records(10)
    with capture_output() as cap:
        for rec in recs:  # 16 records, 0.25 s apart: 4 s in all
            dash(rec)
            clock.t += 0.25
    # each redraw after the first is a text-only update, then the figure (a new renderer in Lab)
    texts = [o for o in cap.outputs if PLOTLY_MIME not in o.data]
    shown = [o for o in cap.outputs if PLOTLY_MIME in o.data]
    assert [PLOTLY_MIME in o.data for o in cap.outputs] == [True] + [False, True] * len(texts)
    assert all(set(o.data) == {"text/plain"} for o in texts)
    # the first record is shown at once, then at most one update per second, and the final one
    assert 4 <= len(shown) <= 7, len(shown)
    assert dash.renders == len(shown)
    assert all(PLOTLY_MIME in o.data and "text/html" in o.data for o in shown)
    first, *updates = cap.outputs
    assert not first.update and all(u.update for u in updates)  # one handle, updated in place
    assert len({o.transient["display_id"] for o in cap.outputs}) == 1
    final = shown[-1].data[PLOTLY_MIME]
    loss = next(t for t in final["data"] if t["name"] == "loss")
    assert loss["x"] == list(range(1, 11))  # the last update carries every record


def test_flush_draws_records_held_back_by_the_throttle():
    clock = Clock()
    dash = Dashboard(display=False, min_interval=1.0, clock=clock)
    for rec in records(10, with_end=False):
        dash(rec)
    assert list(dash.trace("loss").x) == [] or len(dash.trace("loss").x) < 10
    dash.flush()
    assert list(dash.trace("loss").x) == list(range(1, 11))


def test_long_curves_are_downsampled_but_kept_whole():
    dash = Dashboard(display=False, min_interval=0, max_points=100)
    for rec in records(5000, max_steps=5000):
        dash._ingest(rec)
    dash.render()
    xs = list(dash.trace("loss").x)
    assert len(xs) <= 100 and xs[0] == 1 and xs[-1] == 5000 and xs == sorted(xs)
    assert len(dash.series["loss"][0]) == 5000
    assert downsample(list(range(10)), list(range(10)), 4) == ([0, 3, 6, 9], [0, 3, 6, 9])


def test_replay_equals_live_and_a_resumed_log_reads_as_one_run(tmp_path):
    log = tmp_path / "metrics.jsonl"
    first = records(6, max_steps=10, with_end=False) + [{"event": "interrupted", "step": 6, "max_steps": 10}]
    # a log that was not truncated: steps 5-6 come again after the resume from step 4
    resumed = records(6, start=4, max_steps=10)[0:]
    log.write_text("".join(json.dumps(r) + "\n" for r in first + resumed))
    live = Dashboard(display=False, min_interval=0)
    for r in first + resumed:
        live(r)
    replayed = Dashboard.replay(log)
    assert replayed.figure_dict()["data"] == live.figure_dict()["data"]
    assert list(replayed.trace("loss").x) == list(range(1, 11))
    straight = Dashboard.replay(records(10))
    assert list(straight.trace("loss").x) == list(replayed.trace("loss").x)


def test_overlay_and_static_html(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d, recs in ((a, records(10)), (b, records(8, max_steps=8))):
        d.mkdir()
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    fig = overlay([a, b])
    names = [t.name for t in fig.data]
    assert names == ["a", "a (eval)", "b", "b (eval)"]
    assert list(fig.data[2].x) == list(range(1, 9))
    page = export_html(a, tmp_path / "run.html")
    text = page.read_text()
    assert "<html>" in text[:100] and "Plotly.newPlot" in text and len(text) > 1_000_000  # plotly.js inlined
    assert "loss 2.0000" in text and "(100%)" in text


def test_widget_mode_is_opt_in_and_says_what_it_needs():
    import importlib.util

    if importlib.util.find_spec("anywidget") is None:
        with pytest.raises(ImportError, match="anywidget"):
            Dashboard(mode="widget")
        pytest.skip("anywidget is not installed: the FigureWidget path is not exercised")
    dash = Dashboard(mode="widget", min_interval=0)
    for rec in records(3):
        dash(rec)
    assert list(dash._handle.data[0].y) == pytest.approx([2.9, 2.8, 2.7])
    # the widget is updated from the curves; it shows what the figure object holds
    assert [(list(t.x), list(t.y)) for t in dash._handle.data] == [(list(t.x), list(t.y)) for t in dash.figure.data]
    assert dash._handle.layout.title.text == dash.figure.layout.title.text
    assert dash._handle.layout.annotations == dash.figure.layout.annotations


def test_a_real_kernel_keeps_one_output_with_the_final_figure(tmp_path):
    """Through ipykernel (nbclient): one display output, updated in place, saved with both the
    Plotly MIME type (JupyterLab / VS Code) and HTML (Colab, exported HTML)."""
    import nbformat
    from nbclient import NotebookClient

    recs = records(10)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "from nbtune.ui.api import in_notebook\n"
        "from nbtune.ui.dashboard import Dashboard\n"
        f"recs = {recs!r}\n"
        "dash = Dashboard(min_interval=0)\n"
        "for r in recs:\n    dash(r)\n"
        "print(in_notebook(), dash.renders)")]
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = nb.cells[0].outputs
    displays = [o for o in outputs if o.output_type == "display_data"]
    assert len(displays) == 1
    data = displays[0].data
    assert "text/html" in data and PLOTLY_MIME in data
    loss = next(t for t in data[PLOTLY_MIME]["data"] if t["name"] == "loss")
    assert loss["x"] == list(range(1, 11))
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert printed.startswith("True ")
    nbformat.validate(nb)


@pytest.mark.parametrize("capacity", [14.748, None], ids=["vram", "no-vram"])
def test_a_redraw_is_what_plotly_writes_for_the_figure(capacity):
    """The redraw's figure dict and HTML are made without Plotly's object model and with the CDN
    script tag made once: they equal Plotly's own JSON and ``to_html`` of the up-to-date figure."""
    from nbtune.ui.dashboard import CONFIG, _plotlyjs_splice

    assert _plotlyjs_splice() is not None  # the cached script tag is in use, not Plotly's per-call path
    dash = Dashboard(display=False, min_interval=0)
    recs = records(12, max_steps=20, with_end=False)
    if capacity is None:  # a CPU run: no VRAM figures, the memory panel says so
        recs = [{k: v for k, v in r.items() if not k.startswith("vram") and k != "gpu"} for r in recs]
    for rec in recs:
        dash(rec)
    bundle = dash.mimebundle()
    fig = bundle[PLOTLY_MIME]
    assert fig.pop("config") == CONFIG
    plotly_json = json.loads(dash.figure.to_json())
    assert fig == plotly_json and json.dumps(fig) == json.dumps(plotly_json)  # same values, same key order
    assert any(a.get("name") == "nogpu" for a in fig["layout"]["annotations"]) == (capacity is None)
    for full_html in (False, True):
        assert dash.html(full_html=full_html, div_id="d") == dash.figure.to_html(
            include_plotlyjs="cdn", full_html=full_html, config=CONFIG, div_id="d")
    html = bundle["text/html"]
    # the CDN script tag (with an integrity hash in recent Plotly releases, without one in 5.20)
    assert 'src="https://cdn.plot.ly/plotly-' in html and "Plotly.newPlot" in html and '"loss 1.8000' not in html
    assert dash.figure_dict() == plotly_json and dash.figure_dict() is not dash.figure_dict()


def test_the_figure_object_follows_the_draws_when_read():
    clock = Clock()
    dash = Dashboard(display=False, min_interval=1.0, clock=clock)
    recs = records(6, with_end=False)  # eval at step 0, start, train 1..
    for rec in recs[:4]:
        dash(rec)
    assert dash.renders == 1 and list(dash.trace("loss").x) == []  # drawn at the first record, the rest wait
    clock.t = 5.0
    dash(recs[4])
    assert list(dash.trace("loss").x) == [1, 2, 3]
    assert "step 3/10" in dash.figure.layout.title.text


def preference_records(n=6):
    """A dpo run's records as the metrics stream writes them (the held-out pairs at steps 0 and n)."""
    def held_out(step, margin, accuracy):
        return {"event": "eval", "step": step, "max_steps": n, "eval_loss": 0.69 - margin / 2,
                "eval_reward_margin": margin, "eval_reward_accuracy": accuracy, "eval_reward_chosen": margin / 2,
                "eval_reward_rejected": -margin / 2}

    out = [held_out(0, 0.0, 0.0), {"event": "start", "step": 0, "max_steps": n, "method": "dpo"}]
    for s in range(1, n + 1):
        out.append({"event": "train", "step": s, "max_steps": n, "loss": 0.69 - 0.05 * s, "lr": 1e-4,
                    "reward_chosen": 0.01 * s, "reward_rejected": -0.02 * s, "reward_margin": 0.03 * s,
                    "reward_accuracy": min(1.0, 0.4 + 0.1 * s), "logp_chosen": -50.0 + s, "logp_rejected": -52.0 - s,
                    "elapsed_s": s, "eta_s": n - s})
    out += [held_out(n, 0.2, 0.75), {"event": "end", "step": n, "max_steps": n}]
    return out


def test_a_preference_run_gets_its_rewards_accuracy_and_log_prob_panels():
    plain = Dashboard(display=False, min_interval=0)
    for rec in records(3):
        plain(rec)
    assert not plain.preference and "reward margin" not in {t.name for t in plain.figure.data}
    dash = Dashboard(display=False, min_interval=0)
    for rec in preference_records():
        dash(rec)
    assert dash.preference
    steps = [1, 2, 3, 4, 5, 6]
    assert list(dash.trace("reward_margin").x) == steps
    assert list(dash.trace("reward_margin").y) == pytest.approx([0.03 * s for s in steps])
    assert list(dash.trace("reward_chosen").y) == pytest.approx([0.01 * s for s in steps])
    assert list(dash.trace("reward_rejected").y) == pytest.approx([-0.02 * s for s in steps])
    assert list(dash.trace("reward_accuracy").y) == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    assert list(dash.trace("eval_reward_accuracy").x) == [0, 6]
    assert list(dash.trace("eval_reward_accuracy").y) == pytest.approx([0.0, 0.75])
    assert list(dash.trace("eval_reward_margin").y) == pytest.approx([0.0, 0.2])
    assert list(dash.trace("logp_rejected").y) == pytest.approx([-52.0 - s for s in steps])
    titles = [a.text for a in dash.figure.layout.annotations]
    assert "preference accuracy" in titles and "reply log-probs" in titles
    header = dash.header()
    assert "margin 0.180" in header and "accuracy 100% (eval 75%)" in header
    # the same figure from the saved log
    assert Dashboard.replay(preference_records()).figure_dict()["data"] == dash.figure_dict()["data"]
    # and from a start record alone (the method says it before any reward is logged)
    early = Dashboard(display=False, min_interval=0)
    early({"event": "start", "step": 0, "max_steps": 6, "method": "orpo"})
    assert early.preference and early.trace("reward_margin").x == ()


def grpo_records(n=4):
    """A grpo run's records as the metrics stream writes them: two reward functions, held-out prompts at 0 and n."""
    def held_out(step, reward):
        return {"event": "eval", "step": step, "max_steps": n, "eval_loss": 0.0, "eval_reward": reward,
                "eval_completion_length": 100.0}

    out = [{"event": "start", "step": 0, "max_steps": n, "method": "grpo"}, held_out(0, 0.25)]
    for s in range(1, n + 1):
        out.append({"event": "train", "step": s, "max_steps": n, "loss": 0.0, "lr": 1e-5, "reward": 0.2 * s,
                    "rewards/correctness": 0.1 * s, "rewards/format": 0.1 * s, "completion_length": 200.0 - 10 * s,
                    "kl": 0.001 * s, "elapsed_s": s, "eta_s": n - s})
    out += [held_out(n, 0.75), {"event": "end", "step": n, "max_steps": n}]
    return out


def test_a_grpo_run_gets_its_reward_completion_length_and_kl_panels():
    dash = Dashboard(display=False, min_interval=0)
    for rec in grpo_records():
        dash(rec)
    assert dash.grpo and not dash.preference and dash.reward_names == ["correctness", "format"]
    steps = [1, 2, 3, 4]
    assert list(dash.trace("reward").y) == pytest.approx([0.2 * s for s in steps])
    assert list(dash.trace("rewards/correctness").x) == steps
    assert list(dash.trace("rewards/format").y) == pytest.approx([0.1 * s for s in steps])
    assert list(dash.trace("eval_reward").x) == [0, 4] and list(dash.trace("eval_reward").y) == [0.25, 0.75]
    assert list(dash.trace("completion_length").y) == [190.0, 180.0, 170.0, 160.0]
    assert list(dash.trace("kl").y) == pytest.approx([0.001 * s for s in steps])
    titles = [a.text for a in dash.figure.layout.annotations]
    assert "completion length (tokens)" in titles and "KL to reference" in titles
    names = {t.name for t in dash.figure.data}
    assert {"reward correctness", "reward format", "mean reward"} <= names and "reward margin" not in names
    assert "reward 0.800 (eval 0.750)" in dash.header()
    # what the dashboard draws is what Plotly writes for its figure; the saved log gives the same figure
    assert dash.figure_dict() == json.loads(dash.figure.to_json())
    assert Dashboard.replay(grpo_records()).figure_dict()["data"] == dash.figure_dict()["data"]
