"""What every finished run reports: the fields shared by a run in this process
(:class:`nbtune.train.run.FinetuneResult`) and a data-parallel run seen from the notebook
(:class:`nbtune.ui.launch.LaunchResult`). Light on purpose: the notebook side of a launch must not
import the training stack."""
from __future__ import annotations

import dataclasses
import html
from pathlib import Path

from .config import Config


@dataclasses.dataclass
class RunOutcome:
    config: Config
    output_dir: Path
    adapter_dir: Path
    log_path: Path
    eval_loss_before: float | None
    eval_loss_after: float | None
    train_loss: float | None
    steps: int
    seconds: float

    # Subclasses add ``interrupted`` (a field of their own: its default differs) and ``summary()``.

    def __str__(self) -> str:
        return self.summary()

    def _repr_html_(self) -> str:
        rows = "".join(f"<div>{html.escape(line)}</div>" for line in self.summary().splitlines())
        color = "#9a6700" if self.interrupted else "#1a7f37"
        title = "nbtune run interrupted" if self.interrupted else "nbtune run done"
        return (f"<div style='font-family:system-ui,sans-serif;font-size:13px'>"
                f"<b style='color:{color}'>{title}</b>{rows}</div>")
