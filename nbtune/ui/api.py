"""``nbtune.finetune(...)``: the Python door, and the one function the magic and the CLI call too.

It adds only the view: in a notebook kernel the :class:`~nbtune.ui.dashboard.Dashboard`, elsewhere
the terminal progress lines; the run itself is :func:`nbtune.train.finetune`, whatever the door.
"""
from __future__ import annotations


def in_notebook() -> bool:
    """True inside a Jupyter / Colab / VS Code kernel (not a terminal IPython or plain Python)."""
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover
        return False
    ip = get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None


def finetune(config=None, *, plan: bool = False, dry_run: bool = False, resume=False, force: bool = False, gpu=None,
             dashboard="auto", listeners=None, progress=None, **kwargs):
    """Run (or plan, or dry-run) a fine-tune; see :func:`nbtune.train.finetune` for the arguments.

    ``dashboard``: "auto" (the live dashboard in a notebook, progress lines elsewhere), True,
    False, "widget" (the FigureWidget mode) or a :class:`~nbtune.ui.dashboard.Dashboard`.
    The result of a run carries it as ``result.dashboard``.
    """
    from ..train import finetune as run

    if plan or dry_run:
        return run(config, plan=plan, dry_run=dry_run, resume=resume, gpu=gpu, **kwargs)
    listeners = list(listeners or [])
    dash = None
    if dashboard == "auto":
        dashboard = in_notebook()
    if dashboard is not False and dashboard is not None:
        from .dashboard import Dashboard

        dash = dashboard if isinstance(dashboard, Dashboard) else Dashboard(mode="widget" if dashboard == "widget" else "html")
        listeners.append(dash)
    if progress is None:
        progress = dash is None
    try:
        result = run(config, resume=resume, force=force, gpu=gpu, listeners=listeners, progress=progress, **kwargs)
    finally:
        if dash is not None:
            dash.flush()
    result.dashboard = dash
    return result
