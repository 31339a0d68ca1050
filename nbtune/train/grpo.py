"""GRPO runs: TRL's GRPOTrainer, set up the way nbtune sets up its SFT and preference trainers.

``train.method: grpo`` samples ``grpo.num_generations`` completions per prompt from the model being
trained, scores each with the reward functions of ``grpo.rewards`` (nbtune/train/rewards.py),
and moves the policy towards the completions that scored above their group's mean (TRL's
``GRPOTrainer``, its default loss). Data: :mod:`nbtune.train.grpo_data`. The run gets nbtune's
training arguments (:func:`nbtune.train.run.sft_args`'s, with GRPO's own), callbacks (metrics
stream, interrupt, autosave, NaN/inf guard), staged checkpoints and optimizer.

Batches: ``train.batch_size`` counts completions (TRL's rule), so one optimizer step trains on
``batch_size x grad_accum`` completions, i.e. that many / ``num_generations`` prompts; the
completions of a step are generated together, once per step.

Generation: the patched model's own ``generate`` (batched, left-padded prompts, KV cache; each
decoding step's 4-bit projections run :mod:`nbtune.kernels.nf4_matmul`), in train mode with
gradient checkpointing switched off for its duration; vLLM only when ``grpo.use_vllm`` says so ("auto": installed and a GPU of compute capability 8.0 or more; never on
a CPU). TRL turns checkpointing back on with transformers' own checkpoint function, which would
drop nbtune's offloaded / plain one for the rest of the run: each module's checkpoint function is
put back after every generation (:func:`checkpointing_kept`), and TRL's switch around its no-grad
log-prob passes is skipped (without gradients checkpointing does nothing).

Reference (``grpo.beta > 0``): the policy with its LoRA adapter switched off: no second copy of
the weights. (TRL copies a PeftModel's adapter into a frozen "ref" adapter, for adapters that were
trained before; nbtune's adapter is fresh, its B matrices zero, so base and "ref" are the same
model and that copy is deleted, as for DPO.) The per-token log-probabilities come from TRL's chunked LM
head (the logits never whole), installed on the model only while the trainer computes them, so a
model reused by later runs carries nothing of it.

What it logs (the metrics stream keeps it, nbtune/train/metrics.py): the mean reward, per reward
function and summed, its spread within the groups, the completions' mean length and the share cut
at max_completion_length, the policy's entropy and, with beta > 0, the KL to the reference; and the
generation's own cost: the seconds spent sampling the step's completions and the completion tokens
they hold (``generation/seconds``, ``generation/tokens``: a record's ``generation_s``,
``generation_tokens`` and ``generation_tokens_per_s``). The clock starts once the device has
finished the work queued before it and stops when the completions are back on the host, so it
holds the sampling alone, not the scoring or the update.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import time
from pathlib import Path

import torch

from .config import Config, ConfigError

__all__ = ["build_grpo_trainer", "checkpointing_kept", "completion_tokens", "grpo_args", "vllm_choice"]


def vllm_choice(setting, device: torch.device) -> bool:
    """Whether the completions are generated with vLLM: ``grpo.use_vllm`` true / false, or "auto":
    vllm installed and a CUDA GPU of compute capability 8.0 or more (never on a CPU)."""
    if device.type != "cuda":
        if setting is True:
            raise ConfigError("grpo.use_vllm: true, but this run is on a CPU; vLLM generates on a CUDA GPU: set "
                              "grpo.use_vllm: auto (the model's own generate)")
        return False
    if setting != "auto":
        return bool(setting)
    if importlib.util.find_spec("vllm") is None:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def grpo_args(cfg: Config, out: Path, model, has_eval: bool):
    """TRL's GRPOConfig for this run: every TrainingArguments field as the SFT run would set it
    (:func:`nbtune.train.run.sft_args`), plus GRPO's own."""
    from transformers import TrainingArguments
    from trl import GRPOConfig

    from .run import sft_args

    base = sft_args(cfg, out, model, has_eval)
    common = {f.name: getattr(base, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    g = cfg.grpo
    # an evaluation batch holds whole groups of completions
    common["per_device_eval_batch_size"] = -(-common["per_device_eval_batch_size"] // g.num_generations) \
        * g.num_generations
    # GRPO counts the prompt and completion tokens it generates (state.num_input_tokens_seen) itself
    common["include_num_input_tokens_seen"] = "no"
    device = next(model.parameters()).device
    return GRPOConfig(
        **common, num_generations=g.num_generations, max_completion_length=g.max_completion_length,
        temperature=g.temperature, beta=g.beta, use_vllm=vllm_choice(g.use_vllm, device), vllm_mode="colocate",
        disable_dropout=False,  # the user's lora.dropout stays
        log_completions=False, shuffle_dataset=True)


# ----------------------------------------------------------------------------- checkpointing
def _checkpointed_modules(model) -> dict:
    return {m: (m.gradient_checkpointing, getattr(m, "_gradient_checkpointing_func", None))
            for m in model.modules() if hasattr(m, "gradient_checkpointing")}


@contextlib.contextmanager
def checkpointing_kept(model):
    """Whatever switches gradient checkpointing off and on inside (TRL around generation), every
    module's checkpointing flag and function are as before on exit: nbtune's offloaded / plain
    checkpointing stays for the rest of the run."""
    before = _checkpointed_modules(model)
    use_cache = getattr(model.config, "use_cache", None)
    try:
        yield
    finally:
        for module, (flag, func) in before.items():
            module.gradient_checkpointing = flag
            if func is not None:
                module._gradient_checkpointing_func = func
        if use_cache is not None:
            model.config.use_cache = use_cache


# ----------------------------------------------------------------------------- generation's cost
def completion_tokens(completion_ids) -> int:
    """The tokens of a batch of generated completions: TRL's list of token-id lists, one per completion
    (its end-of-sequence token counted, what follows it not)."""
    return sum(len(ids) for ids in completion_ids)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- trainer
def _grpo_class():
    from trl import GRPOTrainer

    from .trainer import RunTrainer, checkpointing_switch_off

    class NbtuneGRPOTrainer(RunTrainer, GRPOTrainer):
        """TRL's GRPOTrainer with nbtune's set-up (nbtune/train/trainer.py), nbtune's checkpointing
        kept through generation, TRL's LM head only while it scores (module docstring)."""

        def nbtune_collator(self, collator):
            return collator  # GRPO's batches are prompts, generated from before any forward

        def __init__(self, *args, **kwargs):
            model = kwargs["model"]
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            had, previous = "forward" in base.__dict__, base.__dict__.get("forward")
            super().__init__(*args, **kwargs)
            unwrapped = self.accelerator.unwrap_model(self.model)
            if "ref" in getattr(unwrapped, "peft_config", {}):  # TRL's copy of the (fresh) adapter: not needed
                unwrapped.delete_adapter("ref")
                unwrapped.set_adapter("default")
            # TRL's fused LM head (installed on the base model by GRPOTrainer) is put on only while scoring
            self._nbtune_head = (base, base.__dict__.get("forward"), had, previous)
            self._head_off()

        def _head_off(self):
            base, _, had, previous = self._nbtune_head
            if had:
                base.forward = previous
            else:
                base.__dict__.pop("forward", None)

        @contextlib.contextmanager
        def _scoring_head(self):
            base, fused, _, _ = self._nbtune_head
            base.forward = fused
            try:
                yield
            finally:
                self._head_off()

        def _get_per_token_logps_and_entropies(self, *args, **kwargs):
            with self._scoring_head():
                return super()._get_per_token_logps_and_entropies(*args, **kwargs)

        def _generate_single_turn(self, *args, **kwargs):
            mode = "train" if self.model.training else "eval"
            _synchronize(self.accelerator.device)  # the clock holds the sampling, not the work queued before it
            started = time.perf_counter()
            with checkpointing_kept(self.accelerator.unwrap_model(self.model)):
                out = super()._generate_single_turn(*args, **kwargs)
            # the completions are Python lists of ids: the device has finished sampling them
            self._metrics[mode]["generation/seconds"].append(time.perf_counter() - started)
            self._metrics[mode]["generation/tokens"].append(float(completion_tokens(out[0])))
            return out

        def _generate_and_score_completions(self, *args, **kwargs):
            with checkpointing_switch_off("grpo_trainer"):
                return super()._generate_and_score_completions(*args, **kwargs)

    return NbtuneGRPOTrainer


def build_grpo_trainer(cfg: Config, out: Path, model, tokenizer, data, callbacks=(), **controls):
    """nbtune's GRPO trainer for this run, its rewards those of ``grpo.rewards``; ``controls``: the
    run's (:class:`~nbtune.train.trainer.RunTrainer`'s keyword arguments)."""
    from .. import quiet
    from .rewards import load_rewards

    args = grpo_args(cfg, out, model, data.eval is not None)
    with quiet.loading():
        return _grpo_class()(model=model, reward_funcs=load_rewards(cfg.grpo.rewards), args=args,
                             train_dataset=data.train, eval_dataset=data.eval, processing_class=tokenizer,
                             callbacks=list(callbacks), **controls)
