"""Peer: ``nbtune.finetune`` as a user runs it in a notebook: the metrics stream written, the
dashboard listening, and the benchmark's clock as one more listener.

    python benchmarks/peers/trainer_nbtune.py --model DIR --data rows.jsonl --batch 2 --seq 2048 \\
        --dtype bfloat16 [--packing] --warmup 2 --steps 5 --out DIR

The config is what a user writes (trainer_common.py states the shared settings); everything else
is nbtune's default: ``load_in_4bit`` (on a GPU), ``gradient_checkpointing: auto``, the fused
kernels, the planner's pre-flight check. ``responses_only: false``: every peer trains on every
token (TRL's default for these rows, and what packing needs).

The dashboard is nbtune's :class:`~nbtune.ui.dashboard.Dashboard` in its notebook mode: each
redraw (at most one a second) builds the figure's MIME bundle and serializes it to JSON, which is
what a notebook kernel does before sending it to the browser; only the sending is left out. Where
plotly is not installed the run goes on with the terminal progress lines (the door without a
notebook) and its line says ``dashboard: off``.
Prints one JSON line (trainer_common.py).

``--method dpo`` (the DPO rows): ``train.method: dpo`` with ``beta`` 0.1 on the preference rows
(``data.format: preference``, ``data.packing: false``), ``model.max_seq_length`` = --seq; the
reference is the model with its adapter switched off and its log-probs are computed each step
(nbtune.train.preference).

``--method grpo`` (the GRPO rows): ``train.method: grpo`` on the prompt rows (``data.format:
prompt``), ``train.batch_size`` = --batch x 4 (nbtune's batch counts completions, as TRL's does:
--batch prompts, 4 completions each), ``model.max_seq_length`` = --seq and a ``grpo`` section with
``num_generations`` 4, ``max_completion_length`` --seq / 2, ``temperature`` 1.0, ``beta`` 0.0,
``rewards: [correctness]`` (the built-in GSM8K final-number match) and ``use_vllm: false`` (the
model's own generate, as for the other peers, whatever is installed). The sampling's time and
completion tokens per step are the ones nbtune's metrics records carry (``generation_s``,
``generation_tokens``: nbtune/train/grpo.py times its generation), summarized by
trainer_common.summarize_generation.

Every row's line carries the planner's prediction for its exact config, taken before training
(``nbtune.finetune(cfg, plan=True)``, what ``nbtune plan`` shows: this GPU, a T4 on a CPU):
``plan_peak_gib`` (torch's reserved peak plus the CUDA context), ``plan_reserved_gib`` (the part to
compare with the measured ``peak_reserved_gib``), ``plan_terms`` (its terms, GiB: for GRPO the
``generation`` term, the sampling's KV cache and logits beyond training's activations), the GPU,
checkpointing mode and offloaded layers it planned for, ``plan_host_peak_gib`` and
``plan_host_terms`` (host RAM); and the process's resident memory as measured (:class:`HostMemory`:
the baseline after CUDA's start, the loading and training peaks of the memory the process owns,
pinned buffers) -- so every row is a point of the planner's GPU and host calibration.
``triton_compiles_each``: the Triton kernels
compiled in each step.

``NBTUNE_BENCH_PROFILE=FIRST:LAST`` (steps) also profiles those steps with torch.profiler (host and
GPU) and writes the table of operators by host time and by GPU time to
``$OUT/trainer-profile-<row>.txt``: where a trainer step spends what the bare loop does not.
``NBTUNE_BENCH_CONFIG='{"train": {"gradient_checkpointing": "plain"}}'`` merges those settings
into the config (section by section), to find which setting a step's time depends on.
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import (  # noqa: E402
    LORA_TARGETS, HostMemory, apply_mem_cap, apply_sdpa_backend_from_env, mem_cap_gib)

apply_sdpa_backend_from_env()  # before torch's users (transformers, nbtune) are imported

import trainer_common as tc  # noqa: E402


def finetune_config(args, fmt: str) -> dict:
    method = getattr(args, "method", "sft")  # other scripts pass their own Namespace (sft)
    data = {"source": args.data, "format": fmt, "eval_split": None, "responses_only": False,
            "packing": ("split" if args.packing_strategy == "split" else True) if args.packing else False}
    if method == "dpo":  # only the replies are scored; pairs are not packed
        data = {"source": args.data, "format": "preference", "eval_split": None, "packing": False}
    if method == "grpo":  # prompts, each completed num_generations times; nothing is packed
        data = {"source": args.data, "format": "prompt", "eval_split": None, "packing": False}
    cfg = {
        "model": {"name": args.model, "max_seq_length": args.seq, "dtype": args.dtype},
        "data": data,
        "lora": {"r": tc.LORA_R, "alpha": tc.LORA_R, "dropout": 0.0, "targets": list(LORA_TARGETS)},
        "train": {"max_steps": args.warmup + args.steps, "batch_size": args.batch, "grad_accum": 1, "lr": tc.LR,
                  "scheduler": "linear", "warmup_steps": 0, "optimizer": "adamw_8bit", "logging_steps": 1,
                  "seed": tc.SEED},
        "output": {"dir": args.out, "overwrite": True},  # the benchmark reruns a row into the same folder
    }
    if method == "dpo":
        cfg["train"].update(method="dpo", beta=tc.DPO_BETA)
    if method == "grpo":  # train.batch_size counts completions
        cfg["train"].update(method="grpo", batch_size=args.batch * tc.GRPO_GENERATIONS)
        cfg["grpo"] = {"num_generations": tc.GRPO_GENERATIONS,
                       "max_completion_length": tc.grpo_completion_length(args.seq),
                       "temperature": tc.GRPO_TEMPERATURE, "beta": tc.GRPO_BETA, "rewards": [tc.GRPO_REWARD],
                       "use_vllm": False}
    for section, values in json.loads(os.environ.get("NBTUNE_BENCH_CONFIG") or "{}").items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def notebook_dashboard():
    """nbtune's Dashboard whose display step costs what a kernel's does, minus the sending; None
    where plotly (the dashboard's one extra package) is not installed."""
    import importlib.util

    if importlib.util.find_spec("plotly") is None:
        return None
    from nbtune.ui.dashboard import Dashboard

    class KernelCostDashboard(Dashboard):
        shown_bytes = 0

        def _show(self) -> None:
            self.shown_bytes += len(json.dumps(self.mimebundle()))

    return KernelCostDashboard()


class StepProfiler:
    """A metrics listener that runs torch.profiler from the end of step ``first`` to the end of
    step ``last`` and writes its tables to ``path``."""

    def __init__(self, first: int, last: int, path: str):
        self.first, self.last, self.path, self.prof = first, last, path, None

    def __call__(self, rec: dict) -> None:
        if rec.get("event") != "train":
            return
        import torch

        step = rec.get("step") or 0
        if step == self.first and self.prof is None:
            acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                           if torch.cuda.is_available() else [])
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()
            self.t0 = time.perf_counter()
        elif step == self.last and self.prof is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)
            avg = self.prof.key_averages()
            steps = self.last - self.first
            device_us = sum(getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0) or 0
                            for e in avg)
            text = [f"# torch.profiler over steps {self.first + 1}-{self.last} ({steps} steps)",
                    f"# wall {wall / steps * 1e3:.1f} ms per step (profiled), device kernels "
                    f"{device_us / steps / 1e3:.1f} ms per step", "",
                    avg.table(sort_by="cpu_time_total", row_limit=40), "",
                    avg.table(sort_by="self_cpu_time_total", row_limit=30)]
            if torch.cuda.is_available():
                text += ["", avg.table(sort_by="self_cuda_time_total", row_limit=25)]
            with open(self.path, "w") as f:
                f.write("\n".join(text))
            self.prof = None


class OffloadCounter:
    """A metrics listener keeping, per train step, what the offloaded checkpointing did in it: the
    inputs offloaded and kept on the GPU, and the host-buffer pool's growth (new buffers, slabs
    retired): pinned buffers are allocated, and retired ones freed, only where these grow."""

    KEYS = ("offloaded", "kept_on_device", "not_seen", "pool_takes", "pool_reuses", "pool_buffers", "pool_retired")

    def __init__(self):
        self.steps, self.last = [], None

    def __call__(self, rec: dict) -> None:
        if rec.get("event") not in ("start", "train"):
            return
        from nbtune.kernels.offload import offload_stats

        now = offload_stats()
        if rec.get("event") == "train" and self.last is not None:
            self.steps.append({k: now.get(k, 0) - self.last.get(k, 0) for k in self.KEYS})
        self.last = now


class CompileCounter:
    """A metrics listener keeping, per train step, the Triton kernels compiled in it (Triton's
    ``jit_post_compile_hook``): a compile in a timed step is paid for in that step's time."""

    def __init__(self):
        self.steps, self.names, self.seen = [], [], 0
        try:
            from triton import knobs
        except Exception:  # noqa: BLE001 - no Triton, or one without knobs: nothing is counted
            self.knobs = None
            return
        self.knobs = knobs.runtime
        self.previous = self.knobs.jit_post_compile_hook
        self.knobs.jit_post_compile_hook = self._compiled

    def _compiled(self, *args, **kwargs):
        fn = kwargs.get("fn")
        self.names.append(str(getattr(fn, "name", None) or getattr(fn, "__name__", "?")))
        if self.previous is not None:
            return self.previous(*args, **kwargs)
        return None

    def __call__(self, rec: dict) -> None:
        if rec.get("event") == "train":
            new = self.names[self.seen:]
            self.seen = len(self.names)
            self.steps.append(dict(compiled=len(new), kernels=sorted(set(new))))


class GenerationListener:
    """A metrics listener keeping, per train record (one optimizer step), the seconds nbtune spent
    generating the step's completions and the completion tokens generated (None: no generation)."""

    def __init__(self):
        self.seconds: list[float | None] = []
        self.tokens: list[float | None] = []

    def __call__(self, rec: dict) -> None:
        if rec.get("event") == "train":
            self.seconds.append(rec.get("generation_s"))
            self.tokens.append(rec.get("generation_tokens"))


class ClockListener:
    """A metrics listener feeding the step clock from nbtune's own records."""

    def __init__(self, clock: tc.StepClock):
        self.clock = clock

    def __call__(self, rec: dict) -> None:
        if rec.get("event") == "start":
            self.clock.start()
        elif rec.get("event") == "train":
            self.clock.step(rec.get("tokens") or 0, rec.get("loss"))


def plan_fields(cfg: dict) -> dict:
    """The planner's prediction for this config, as ``nbtune plan`` / ``finetune(plan=True)`` gives it."""
    import nbtune

    try:
        p = nbtune.finetune(cfg, plan=True)
    except Exception as exc:  # noqa: BLE001 - the run goes on; the line says why there is no plan
        return dict(plan_error=f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}")
    if p is None:
        return dict(plan_error="no plan (the planner is not available)")
    return dict(plan_peak_gib=round(p.peak_gib, 3), plan_reserved_gib=round(p.reserved_gib, 3),
                plan_terms={k: round(v, 3) for k, v in p.breakdown.items()}, plan_gpu=p.gpu.name,
                plan_checkpointing=p.settings.gradient_checkpointing, plan_offload_layers=p.settings.offload_layers,
                plan_fits=p.fits, plan_host_peak_gib=round(p.host_process_peak_gib, 3),
                plan_host_terms={k: round(v, 3) for k, v in p.host_breakdown.items()})


def main(argv=None) -> int:
    args = tc.parse_args(argv, methods=tc.METHODS)
    fmt = tc.data_format(args.data)
    import nbtune

    base = dict(peer=f"nbtune-{nbtune.__version__}", row=args.row, method=args.method, batch=args.batch, seq=args.seq,
                dtype=args.dtype, packing=bool(args.packing), data=os.path.basename(args.data), format=fmt,
                packing_strategy=args.packing_strategy if args.packing else None,
                **tc.environment_fields())
    t0 = time.perf_counter()

    def train() -> dict:
        host = HostMemory()
        if tc.on_gpu():
            apply_mem_cap(mem_cap_gib())
            import torch

            torch.zeros(1, device="cuda")  # the CUDA context's host side is part of the baseline
        host.begin()
        # before training: an OOM's line still carries what was planned
        base.update(plan_fields(finetune_config(args, fmt)))
        if args.method == "dpo":
            base.update(beta=tc.DPO_BETA, reference="adapter off", precompute_ref_log_probs=False)
        if args.method == "grpo":
            base.update(tc.grpo_fields(args.seq), reward=tc.GRPO_REWARD)
        clock = tc.StepClock()
        dash = notebook_dashboard()
        if dash is None:
            base["dashboard"] = "off: plotly is not installed here"
        offload = OffloadCounter()
        compiles = CompileCounter()
        generation = GenerationListener()
        listeners = [ClockListener(clock), offload, compiles, host, generation]
        if os.environ.get("NBTUNE_BENCH_PROFILE"):
            first, last = (int(x) for x in os.environ["NBTUNE_BENCH_PROFILE"].split(":"))
            out = os.environ.get("OUT") or "."
            listeners.append(StepProfiler(first, last, os.path.join(out, f"trainer-profile-{args.row}.txt")))
        result = nbtune.finetune(finetune_config(args, fmt), dashboard=dash or False, progress=dash is None,
                                 listeners=listeners)
        peak = tc.peak_reserved_gib()
        host.end()
        line = dict(base, **tc.summarize(clock, args.warmup, tc.sequences(args), args.seq), peak_reserved_gib=peak,
                    gradient_checkpointing=result.gradient_checkpointing, metrics_records=len(result.metrics),
                    offload_each=offload.steps, triton_compiles_each=compiles.steps, **host.fields,
                    total_s=round(time.perf_counter() - t0, 1))
        if args.method == "grpo":
            line.update(tc.summarize_generation(generation.seconds, generation.tokens, line["step_s_each"],
                                                args.warmup, tc.sequences(args), "_generate_single_turn"))
        if dash is not None:
            line.update(dashboard="on", dashboard_renders=dash.renders, dashboard_bytes=dash.shown_bytes)
        return line

    return tc.run_peer(base, train)


if __name__ == "__main__":
    sys.exit(main())
