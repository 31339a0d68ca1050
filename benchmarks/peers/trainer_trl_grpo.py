"""Peers on TRL's GRPOTrainer, for the GRPO rows: Unsloth's way (``--peer unsloth``: right after
``unsloth`` is imported, ``PatchFastRL("GRPO", FastLanguageModel)``, before TRL's GRPOTrainer is
imported or made, as Unsloth's GRPO notebooks do; FastLanguageModel with ``fast_inference=False``
(no vLLM: completions from the model's own generate) and its LoRA with
``use_gradient_checkpointing="unsloth"``) and the plain Hugging Face way (``--peer trl``:
transformers + bitsandbytes 4-bit + peft, ``prepare_model_for_kbit_training``, non-reentrant
gradient checkpointing, GRPOTrainer without vLLM). The model loaders and the step clock are
peers/trainer_trl.py's.

    python benchmarks/peers/trainer_trl_grpo.py --peer trl --model DIR --data prompts.jsonl --batch 1 \\
        --seq 512 --dtype bfloat16 --warmup 2 --steps 5 --out DIR

Same settings and clock as peers/trainer_nbtune.py --method grpo (trainer_common.py states them):
the rows (chat-form ``prompt``, ``answer``) go to GRPOTrainer as they are, which renders each prompt
with the tokenizer's chat template as nbtune does and passes ``answer`` to the reward;
``per_device_train_batch_size`` = --batch x 4 completions, ``num_generations`` 4,
``max_completion_length`` --seq / 2, temperature 1.0, top-p 1, no top-k, beta 0.0, loss "dapo",
rewards scaled by group, one update per generation (``num_iterations`` 1, ``steps_per_generation``
1). Only GRPOConfig fields present in both TRL releases the peers run (Unsloth's and the pinned
one) are set; the line's ``grpo_config_left_out`` names any this TRL lacks. The reward is
:func:`gsm8k_correctness`, nbtune's built-in ``correctness`` written out in plain Python (the same
rule: the completion's final number against the answer's; a test holds them equal).

Generation is timed by :class:`GenerationTimer`, which wraps the trainer's generation method on the
instance (``_generate_single_turn``: the sampling alone, what nbtune times in its own) and leaves
what it does unchanged. Prints one JSON line.
"""
from __future__ import annotations

import os
import re
import sys
import time
from decimal import Decimal, InvalidOperation

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import apply_sdpa_backend_from_env  # noqa: E402

import trainer_common as tc  # noqa: E402
from trainer_trl import PEERS, clock_callback, known_config, load_run, shared_settings  # noqa: E402

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def final_number(text) -> Decimal | None:
    """The number after the last ``####`` of ``text``, else its last number (``$`` and thousands
    separators ignored, trailing zeros not significant); None when it has none."""
    text = str(text).replace("$", "")
    _, sep, tail = text.rpartition("####")
    found = _NUMBER.search(tail) if sep else None
    numbers = [found.group()] if found else _NUMBER.findall(text)
    if not numbers:
        return None
    try:
        return Decimal(numbers[-1].replace(",", "")).normalize()
    except InvalidOperation:
        return None


def gsm8k_correctness(prompts, completions, answer=None, **kwargs) -> list[float | None]:
    """TRL's reward signature: 1.0 per completion whose final number equals its row's answer's, else
    0.0 (None where the row has no answer). Completions are text or chat turns (their contents joined)."""
    out = []
    for completion, expected in zip(completions, answer or [None] * len(completions)):
        if isinstance(completion, dict):
            completion = [completion]
        text = completion if isinstance(completion, str) else "".join(str(t.get("content") or "") for t in completion)
        target = None if expected is None else final_number(expected)
        out.append(None if target is None else float(final_number(text) == target))
    return out


def grpo_settings(args, peer: str) -> dict:
    """GRPOConfig's arguments for this run (before :func:`grpo_config` keeps the ones this TRL has)."""
    return dict(
        shared_settings(args, peer, batch=tc.sequences(args)),
        include_num_input_tokens_seen="no",  # GRPO counts the prompt and completion tokens it generates itself
        num_generations=tc.GRPO_GENERATIONS, max_completion_length=tc.grpo_completion_length(args.seq),
        temperature=tc.GRPO_TEMPERATURE, top_p=1.0, top_k=0, beta=tc.GRPO_BETA, loss_type="dapo",
        scale_rewards="group", num_iterations=1, steps_per_generation=1, use_vllm=False, log_completions=False,
        shuffle_dataset=True, disable_dropout=False)


def grpo_config(settings: dict):
    """TRL's GRPOConfig from ``settings``, leaving out what this TRL does not know; (config, left out)."""
    from trl import GRPOConfig

    return known_config(GRPOConfig, settings)


def patch_unsloth_grpo() -> None:
    """Unsloth's RL patch for GRPO, before TRL's GRPOTrainer is imported, as Unsloth's GRPO notebooks do."""
    from unsloth import FastLanguageModel, PatchFastRL

    PatchFastRL("GRPO", FastLanguageModel)


class GenerationTimer:
    """Times a GRPOTrainer's generation: its method ``_generate_single_turn`` (the sampling alone;
    ``_generate``, which also tokenizes and decodes, where a TRL has no such method), wrapped on the
    instance so that every call, from wherever in the trainer, goes through the clock and does what
    it did. Each training-mode call is kept as (optimizer step it belongs to, seconds from an idle
    device to the completions back, completion tokens generated)."""

    METHODS = {"_generate_single_turn": 0, "_generate": 1}  # method -> where its result holds the completion ids

    def __init__(self, trainer):
        name = next((m for m in self.METHODS if callable(getattr(trainer, m, None))), None)
        if name is None:
            raise AttributeError(f"{type(trainer).__name__} has none of {', '.join(self.METHODS)} to time")
        self.name, self.calls = name, []
        inner, at = getattr(trainer, name), self.METHODS[name]

        def timed(*args, **kwargs):
            tc.synchronize()
            started = time.perf_counter()
            out = inner(*args, **kwargs)
            tc.synchronize()
            seconds = time.perf_counter() - started
            if trainer.model.training:  # the step being trained is the one after global_step
                self.calls.append((trainer.state.global_step + 1, seconds, sum(len(ids) for ids in out[at])))
            return out

        setattr(trainer, name, timed)

    def per_step(self, steps: int) -> tuple[list[float | None], list[int | None]]:
        """Generation seconds and completion tokens of steps 1..``steps`` (None: none in that step)."""
        seconds: list[float | None] = [None] * steps
        tokens: list[int | None] = [None] * steps
        for step, s, n in self.calls:
            if 1 <= step <= steps:
                seconds[step - 1] = (seconds[step - 1] or 0.0) + s
                tokens[step - 1] = (tokens[step - 1] or 0) + n
        return seconds, tokens


def main(argv=None) -> int:
    args = tc.parse_args(argv, peers=PEERS, methods=("grpo",))
    apply_sdpa_backend_from_env()  # before unsloth / transformers are imported
    fmt = tc.data_format(args.data)
    base = dict(peer=args.peer, row=args.row, method="grpo", batch=args.batch, seq=args.seq, dtype=args.dtype,
                packing=False, data=os.path.basename(args.data), format=fmt, **tc.grpo_fields(args.seq),
                reward=gsm8k_correctness.__name__, **tc.environment_fields())
    t0 = time.perf_counter()

    def train() -> dict:
        if fmt != "prompt":
            raise ValueError(f"{args.data}: GRPO reads rows with a prompt (and an answer)")
        trl, model, tok, dataset = load_run(args, base, after_unsloth=patch_unsloth_grpo,
                                            unsloth_load=dict(fast_inference=False))
        config, left_out = grpo_config(grpo_settings(args, args.peer))
        if left_out:
            base["grpo_config_left_out"] = left_out
        clock = tc.StepClock()
        trainer = trl.GRPOTrainer(model=model, reward_funcs=[gsm8k_correctness], args=config, train_dataset=dataset,
                                  processing_class=tok, callbacks=[clock_callback(clock)])
        timer = GenerationTimer(trainer)
        trainer.train()
        peak = tc.peak_reserved_gib()
        line = dict(base, **tc.summarize(clock, args.warmup, tc.sequences(args), args.seq), peak_reserved_gib=peak,
                    optim=str(getattr(trainer.args.optim, "value", trainer.args.optim)),
                    gradient_checkpointing=bool(trainer.args.gradient_checkpointing),
                    pad_token=tok.pad_token, total_s=round(time.perf_counter() - t0, 1))
        seconds, tokens = timer.per_step(len(clock.times))
        line.update(tc.summarize_generation(seconds, tokens, line["step_s_each"], args.warmup, tc.sequences(args),
                                            timer.name))
        return line

    return tc.run_peer(base, train)


if __name__ == "__main__":
    sys.exit(main())
