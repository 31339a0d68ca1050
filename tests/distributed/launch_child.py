"""Run by test_notebook_launch.py in a fresh interpreter, which stands for a notebook kernel that has
not imported the training stack: two runs of a config through ``nbtune.finetune(cfg, gpus=2)``
(accelerate's notebook_launcher, nbtune.ui.launch) on 2 processes (CPU: gloo; cuda: one GPU each, NCCL), the second one interrupted (a SIGINT to this
process, as the notebook's stop button sends) after its first step. Writes what it saw as JSON.

    python launch_child.py CONFIG.json OUT.json [cpu|cuda]
"""
import json
import os
import signal
import sys
import threading


def launcher_alive() -> bool:
    return any(t.name == "nbtune-launcher" and t.is_alive() for t in threading.enumerate())


def main(config_path: str, out_path: str, device: str = "cpu") -> None:
    import nbtune
    from nbtune.ui.dashboard import Dashboard

    cfg = json.loads(open(config_path).read())
    seen = []
    dash = Dashboard(display=False, min_interval=0)
    result = nbtune.finetune(cfg, gpus=2, launch_device=device, dashboard=dash,
                             listeners=[lambda r: seen.append(dict(r, alive=launcher_alive()))])
    report = dict(records=seen, header=dash.header(), summary=result.summary(), steps=result.steps,
                  same_dashboard=result.dashboard is dash,
                  world_size=result.world_size, global_batch=result.global_batch,
                  replicas_identical=result.replicas_identical, adapter_dir=str(result.adapter_dir),
                  metrics_in_result=len(result.metrics),
                  distributed=next((r for r in result.metrics if r.get("event") == "distributed"), None),
                  training_stack_in_kernel=[m for m in ("bitsandbytes", "peft", "trl") if m in sys.modules])

    cfg["output"]["dir"] += "-interrupted"
    cfg["train"]["save_steps"] = None
    # room to stop in: the interrupt reaches the ranks a poll (0.5 s) and a logging step after step 1,
    # which on a loaded 2-core machine can be more than the first run's 4 steps
    if cfg["train"].get("max_steps"):
        cfg["train"]["max_steps"] *= 10
    else:
        cfg["train"]["epochs"] = 10 * (cfg["train"].get("epochs") or 1)

    def stop_at_first_step(rec):
        if rec.get("event") == "train" and rec.get("step") == 1:
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
