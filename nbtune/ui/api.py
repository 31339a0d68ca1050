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
             dashboard="auto", listeners=None, progress=None, gpus: int | None = None, launch_device: str = "cuda",
             _gpus_flag: str = "gpus=", **kwargs):
    """Run (or plan, or dry-run) a fine-tune; see :func:`nbtune.train.finetune` for the arguments.

    ``dashboard``: "auto" (the live dashboard in a notebook, progress lines elsewhere), True,
    False, "widget" (the FigureWidget mode) or a :class:`~nbtune.ui.dashboard.Dashboard`.
    The result of a run carries it as ``result.dashboard``.

    ``gpus``: train data-parallel on that many GPUs of this machine, the processes started by
    accelerate's ``notebook_launcher`` (see :mod:`nbtune.ui.launch`); the dashboard shows rank 0's
    metrics and the result is a :class:`~nbtune.ui.launch.LaunchResult`. With ``plan``/``dry_run``
    the report is for that many GPUs (global batch, steps). Under torchrun / accelerate launch leave
    it out: the launcher already made the processes. ``launch_device="cpu"`` starts the ``gpus``
    processes on the CPU instead (gloo): the same control flow without GPUs, for trying it out.
    """
    from ..quiet import apply as quiet_third_party

    quiet_third_party()
    if gpus is not None:
        from .launch import check_launch, report_for_gpus

        if plan or dry_run:
            return report_for_gpus(build_kwargs_config(config, kwargs), gpus, plan=plan, dry_run=dry_run,
                                   resume=resume, gpu=gpu)
        check_launch(gpus, flag=_gpus_flag, device=launch_device)  # before any dashboard is drawn
    if plan or dry_run:
        from ..train import finetune as run

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
    if gpus is not None and gpus > 1:
        from .launch import launch_finetune

        if progress:
            from ..train.progress import TerminalProgress

            listeners.append(TerminalProgress())

        def start():
            return launch_finetune(build_kwargs_config(config, kwargs), gpus, resume=resume, force=force, gpu=gpu,
                                   listeners=listeners, flag=_gpus_flag, device=launch_device)
    else:
        from ..train import finetune as run  # the training stack: never imported by a launching kernel

        def start():
            return run(config, resume=resume, force=force, gpu=gpu, listeners=listeners, progress=progress, **kwargs)
    try:
        result = start()
    finally:
        if dash is not None:
            dash.flush()
    result.dashboard = dash
    return result


def build_kwargs_config(config, kwargs: dict):
    """The Config of ``config`` with section overrides from keyword arguments (a launch takes no
    other keyword: the model is loaded in each rank process)."""
    from ..train.config import build_config

    unknown = [k for k in kwargs if k not in ("model", "data", "lora", "train", "output")]
    if unknown:
        raise TypeError(f"finetune(gpus=...) does not take {', '.join(unknown)}: the model is loaded in each GPU's "
                        "process from the config")
    return build_config(config, **kwargs)
