"""Run by test_notebook_launch.py in a fresh interpreter, which stands for a notebook kernel that has
not imported the training stack: two runs of a config through ``nbtune.finetune(cfg, gpus=2)``
(accelerate's notebook_launcher, nbtune.ui.launch) on 2 processes (CPU: gloo; cuda: one GPU each, NCCL), the second one interrupted (a SIGINT to this
process, as the notebook's stop button sends) after its first step. Writes what it saw as JSON.

    python launch_child.py CONFIG.json OUT.json [cpu|cuda]

Nothing here depends on how fast the ranks or this process run: the ranks are forked from this
process (accelerate's notebook_launcher), so they inherit ``hold_rank_0_after_step_1``, which keeps
rank 0 (and with it rank 1, at the next collective) at step 1 until this process has answered that
step's record: in the first run by touching a file (so the first record is seen while the ranks
still run), in the second by the notebook's stop file (so the stop lands at a known step).
"""
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

WAIT_S = 300  # a safety net for a broken run: the hold ends as soon as its file appears


def launcher_alive() -> bool:
    return any(t.name == "nbtune-launcher" and t.is_alive() for t in threading.enumerate())


def is_step_1(rec: dict) -> bool:
    return rec.get("event") == "train" and rec.get("step") == 1


def wait_for(path: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0 waited {WAIT_S} s for {path}: the notebook side never answered step 1")
        time.sleep(0.01)


def hold_rank_0_after_step_1(release: dict) -> None:
    """Rank 0's feed writer, once it has written step 1's record, waits for the file that
    ``release["file"]`` names (a path, or a name in the launch folder) before the run goes on."""
    from nbtune.ui.launch import FeedWriter

    write = FeedWriter.__call__

    def held(self, rec):
        write(self, rec)
        if is_step_1(rec):
            wait_for(self.folder / release["file"])

    FeedWriter.__call__ = held


def main(config_path: str, out_path: str, device: str = "cpu") -> None:
    # a notebook kernel turns SIGINT into KeyboardInterrupt; a process started from a background job
    # of a non-interactive shell (CI) inherits SIGINT ignored and would never see the stop button
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import nbtune
    from nbtune.ui.dashboard import Dashboard
    from nbtune.ui.launch import STOP

    cfg = json.loads(open(config_path).read())
    seen = []
    release = {"file": Path(out_path + ".step-1-seen")}  # absolute: folder / file is the file
    hold_rank_0_after_step_1(release)

    def record(rec):
        seen.append(dict(rec, alive=launcher_alive()))
        if is_step_1(rec):
            release["file"].touch()

    dash = Dashboard(display=False, min_interval=0)
    result = nbtune.finetune(cfg, gpus=2, launch_device=device, dashboard=dash, listeners=[record])
    report = dict(records=seen, header=dash.header(), summary=result.summary(), steps=result.steps,
                  same_dashboard=result.dashboard is dash,
                  world_size=result.world_size, global_batch=result.global_batch,
                  replicas_identical=result.replicas_identical, adapter_dir=str(result.adapter_dir),
                  metrics_in_result=len(result.metrics),
                  distributed=next((r for r in result.metrics if r.get("event") == "distributed"), None),
                  training_stack_in_kernel=[m for m in ("bitsandbytes", "peft", "trl") if m in sys.modules])

    cfg["output"]["dir"] += "-interrupted"
    cfg["train"]["save_steps"] = None
    # room to stop in: rank 0 holds at step 1 until the stop file is there, sees it with its next
    # record (step 2's) and the ranks agree on the stop at the end of the step after that
    if cfg["train"].get("max_steps"):
        cfg["train"]["max_steps"] *= 10
    else:
        cfg["train"]["epochs"] = 10 * (cfg["train"].get("epochs") or 1)
    release["file"] = STOP  # in the launch folder: the notebook's interrupt puts it there

    def stop_at_first_step(rec):
        if is_step_1(rec):
            os.kill(os.getpid(), signal.SIGINT)

    stopped = nbtune.finetune(cfg, gpus=2, launch_device=device, dashboard=False, progress=False,
                              listeners=[stop_at_first_step])
    report["interrupted"] = dict(interrupted=stopped.interrupted, steps=stopped.steps,
                                 checkpoint=str(stopped.checkpoint) if stopped.checkpoint else None,
                                 max_steps=stopped.metrics[0].get("max_steps") if stopped.metrics else None)
    with open(out_path, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
