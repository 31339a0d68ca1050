"""What the trainer-path peers share (peers/trainer_nbtune.py, peers/trainer_trl.py,
peers/trainer_trl_dpo.py, peers/trainer_trl_grpo.py): the run's arguments, the step clock, and the
one JSON line each process prints.

Every peer trains the same way: LoRA r=16, alpha 16, dropout 0 on the seven projections, 4-bit
NF4 with double quantization and AdamW 8-bit on a GPU (on a CPU: full precision and torch's AdamW,
for the tests), lr 2e-4, linear schedule without warm-up, one micro-batch per optimizer step,
logging every step, seed 3407, ``max_steps`` = warm-up + timed steps.

The clock (:class:`StepClock`) is read at the same two points in every peer: when training begins
(``on_train_begin``; the peak-memory counters are reset there, so the peak is training's, not
loading's) and at each optimizer step's log (``on_log``, which transformers calls right after the
step; nbtune's metrics stream calls its listeners from there). Each reading synchronizes the device
first (the step's logged loss has done so already). Step k's time is reading k minus reading k-1;
its real tokens are the difference of the trainer's own count of non-padding input tokens
(``include_num_input_tokens_seen="non_padding"``: the attention mask's sum, or the ids that are not
the padding token where a packed batch has no mask; trainer_data.py picks a padding token no row
contains). The first ``warmup`` steps are left out of every figure.

DPO runs (``--method dpo``; peers/trainer_nbtune.py, peers/trainer_trl_dpo.py): beta 0.1 (TRL's
default), ``max_length`` = --seq (longer pairs keep their start), the reference the policy with its
fresh adapter, its log-probs computed each step. A DPO micro-batch holds 2 x batch sequences (each
pair's prompt + chosen, then each pair's prompt + rejected, padded to the longest): its real tokens
are the same count of non-padding input tokens, i.e. the attention mask's sum over those 2 x batch
sequences (the prompt counted once with each reply; the reference forward, which reads the same
tokens again without gradients, is not counted again), and fill is over 2 x batch x seq.

GRPO runs (``--method grpo``; peers/trainer_nbtune.py, peers/trainer_trl_grpo.py): --batch is
prompts per optimizer step, each sampled :data:`GRPO_GENERATIONS` (4) times, so a step generates and
trains on batch x 4 completions (TRL's per-device batch, which counts completions, is batch x 4;
one generation per step). --seq is the prompt + completion budget: ``max_completion_length`` =
seq / 2 (:func:`grpo_completion_length`), prompts of at most seq / 2 tokens (trainer_data.py writes
only such prompts). Temperature 1.0, top-p 1, no top-k, beta 0.0 (no KL term, no reference
forward: the default of TRL and of nbtune), TRL's default loss ("dapo") with one update
per generation, the model's own ``generate`` with its KV cache (no vLLM), the reward GSM8K's
final-number match. A step's tokens are the trainer's own count (TRL's GRPO adds each completion's
prompt and completion tokens to ``num_input_tokens_seen`` as it generates), fill is over batch x 4 x
seq. The sampling is timed apart (:func:`summarize_generation`): seconds from an idle device to
the completions back on the host, and the completion tokens generated, per step.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

LORA_R = 16
LR = 2e-4
SEED = 3407
DPO_BETA = 0.1
GRPO_GENERATIONS = 4
GRPO_BETA = 0.0
GRPO_TEMPERATURE = 1.0
GRPO_REWARD = "correctness"  # nbtune's built-in; the TRL peers' equivalent: trainer_trl_grpo.gsm8k_correctness
METHODS = ("sft", "dpo", "grpo")


def parse_args(argv=None, peers=(), methods=("sft",)) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="one trainer-path benchmark run (prints one JSON line)")
    if peers:
        ap.add_argument("--peer", choices=list(peers), required=True)
    ap.add_argument("--model", required=True, help="checkpoint folder, with its tokenizer")
    ap.add_argument("--data", required=True,
                    help="JSONL rows: text or messages (sft), prompt/chosen/rejected (dpo), prompt/answer (grpo)")
    ap.add_argument("--row", default="", help="the benchmark row this run belongs to (copied to the line)")
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--seq", type=int, required=True)
    ap.add_argument("--dtype", required=True, choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--packing", action="store_true")
    ap.add_argument("--packing-strategy", choices=["whole", "split"], default="whole",
                    help="with --packing: whole documents (nbtune's packing: true, TRL's bfd) or documents cut to "
                         "fill every row (nbtune's packing: split, TRL's wrapped)")
    if len(methods) > 1:
        ap.add_argument("--method", choices=list(methods), default=methods[0])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", required=True, help="the run's output folder")
    args = ap.parse_args(argv)
    if args.warmup < 0 or args.steps < 1:
        ap.error(f"--warmup {args.warmup} --steps {args.steps}: need warm-up >= 0 and at least one timed step")
    if not hasattr(args, "method"):
        args.method = methods[0]
    if args.packing_strategy != "whole" and not args.packing:
        ap.error("--packing-strategy: only with --packing")
    if args.method in ("dpo", "grpo") and args.packing:
        ap.error(f"--packing: {args.method.upper()} sequences are not packed")
    if args.method == "grpo" and args.seq < 4:
        ap.error(f"--seq {args.seq}: GRPO needs room for a prompt and a completion (seq >= 4)")
    return args


def sequences(args) -> int:
    """Sequences per micro-batch: batch, 2 x batch for DPO (prompt + chosen and prompt + rejected),
    batch x :data:`GRPO_GENERATIONS` for GRPO (the completions of batch prompts)."""
    if args.method == "dpo":
        return 2 * args.batch
    if args.method == "grpo":
        return GRPO_GENERATIONS * args.batch
    return args.batch


def grpo_completion_length(seq: int) -> int:
    """GRPO's ``max_completion_length`` for a --seq budget: half of it (the prompts take the other half)."""
    return seq // 2


def grpo_fields(seq: int) -> dict:
    """What a GRPO line states of its run's settings (the same for every peer)."""
    return dict(num_generations=GRPO_GENERATIONS, max_completion_length=grpo_completion_length(seq), beta=GRPO_BETA,
                temperature=GRPO_TEMPERATURE, use_vllm=False)


def data_format(path: str) -> str:
    """"text", "messages", "preference" (prompt, chosen, rejected) or "prompt" (prompt and answer,
    for GRPO), from the first row's keys."""
    with open(path, encoding="utf-8") as f:
        first = json.loads(next(line for line in f if line.strip()))
    if "chosen" in first and "rejected" in first:
        return "preference"
    if "prompt" in first:
        return "prompt"
    if "messages" in first:
        return "messages"
    if "text" in first:
        return "text"
    raise ValueError(f"{path}: rows need a 'text', 'messages' or 'prompt' field, the first has {sorted(first)}")


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepClock:
    """Wall time and the cumulative real-token count at the start and after each logged step."""

    def __init__(self):
        self.t0: float | None = None
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.losses: list[float | None] = []

    def start(self) -> None:
        import torch

        synchronize()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()

    def step(self, tokens_seen: int, loss: float | None) -> None:
        synchronize()
        self.times.append(time.perf_counter())
        self.tokens.append(int(tokens_seen))
        self.losses.append(None if loss is None else float(loss))


def summarize(clock: StepClock, warmup: int, batch: int, seq: int) -> dict:
    """Per-step seconds and real tokens; over the steps after ``warmup``: the median seconds per
    step, real tokens per second (their tokens over their time) and fill (their mean real tokens over
    batch x seq; a DPO run passes its 2 x batch sequences). Raises ValueError when the clock saw too
    few steps or no tokens."""
    if clock.t0 is None:
        raise ValueError("training never began (no on_train_begin)")
    n = len(clock.times)
    if n <= warmup:
        raise ValueError(f"{n} step(s) logged, warm-up is {warmup}: no timed step")
    marks = [clock.t0] + clock.times
    step_s = [b - a for a, b in zip(marks, marks[1:])]
    counts = [clock.tokens[0]] + [b - a for a, b in zip(clock.tokens, clock.tokens[1:])]
    timed_s, timed_tokens = step_s[warmup:], counts[warmup:]
    if sum(timed_tokens) <= 0:
        raise ValueError("the trainer counted no input tokens in the timed steps")
    losses = [x for x in clock.losses if x is not None]
    return dict(
        warmup=warmup, steps=n - warmup,
        s_per_step=round(statistics.median(timed_s), 4),
        tokens_per_s=round(sum(timed_tokens) / sum(timed_s)),
        tokens_per_step=round(statistics.fmean(timed_tokens), 1),
        fill=round(statistics.fmean(timed_tokens) / (batch * seq), 4),
        step_s_each=[round(x, 4) for x in step_s], tokens_each=counts,
        first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None)


def summarize_generation(seconds: list[float], tokens: list[int], step_s: list[float], warmup: int,
                         completions: int, timed: str) -> dict:
    """A GRPO run's sampling, per optimizer step: ``seconds`` spent generating and completion
    ``tokens`` generated in each step (all of them, warm-up included; ``step_s`` the steps' times from
    :func:`summarize`), ``completions`` per step, ``timed`` what was timed (the trainer's method).
    Over the steps after ``warmup``: completion tokens per second of generation (their tokens over
    their generation time), the median generation seconds per step, generation's share of the steps'
    time, and the mean completion length. Raises ValueError when a step has no generation or the
    timed steps generated nothing."""
    if len(seconds) != len(tokens) or len(seconds) != len(step_s):
        raise ValueError(f"generation timed in {len(seconds)} step(s), {len(tokens)} token count(s), "
                         f"{len(step_s)} step(s) logged: one generation per step expected")
    missing = [k + 1 for k, (s, n) in enumerate(zip(seconds, tokens)) if s is None or n is None]
    if missing:
        raise ValueError(f"no generation timed in step(s) {missing}: one generation per step expected")
    timed_s, timed_tokens = seconds[warmup:], tokens[warmup:]
    if not timed_s or sum(timed_s) <= 0 or sum(timed_tokens) <= 0:
        raise ValueError("no completion tokens generated (or no generation time) in the timed steps")
    return dict(
        generation_timed=timed, completions_per_step=completions,
        generation_s_each=[round(x, 4) for x in seconds], generation_tokens_each=[int(x) for x in tokens],
        generation_s_per_step=round(statistics.median(timed_s), 4),
        generation_tokens_per_s=round(sum(timed_tokens) / sum(timed_s), 1),
        generation_share=round(sum(timed_s) / sum(step_s[warmup:]), 4),
        completion_length_mean=round(sum(timed_tokens) / (len(timed_tokens) * completions), 1))


def peak_reserved_gib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_reserved() / 2**30, 3)


def emit(line: dict) -> None:
    print(json.dumps(line), flush=True)


def is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError) or type(exc).__name__ == "GPUOutOfMemoryError":  # nbtune's
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def run_peer(base: dict, train) -> int:
    """Run ``train()`` (a peer's work, returning its result line) and print one JSON line: that
    result, or what failed (its traceback on stderr). Returns the process's exit status."""
    try:
        line = train()
    except Exception as exc:  # noqa: BLE001 - the line says what failed; the traceback goes to stderr
        import traceback

        traceback.print_exc()
        emit(error_line(base, exc))
        return 1
    emit(line)
    return 0


def error_line(base: dict, exc: BaseException) -> dict:
    """The line of a run that failed: ``error`` is "OOM" or the exception's type, ``detail`` its first line."""
    detail = (str(exc).strip().splitlines() or [""])[0][:400]
    return dict(base, error="OOM" if is_oom(exc) else type(exc).__name__, detail=detail)


def environment_fields() -> dict:
    """The T4-emulation switches this process obeys (bench_common reads them)."""
    from bench_common import mem_cap_gib, sdpa_backend_from_env

    return dict(cap_gib=mem_cap_gib(), sdpa=sdpa_backend_from_env() or "default")


def peers_dir() -> str:
    return os.path.dirname(os.path.abspath(__file__))


if peers_dir() not in sys.path:
    sys.path.insert(0, peers_dir())
