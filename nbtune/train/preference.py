"""DPO and ORPO runs: TRL's trainers for them, set up the way nbtune sets up SFTTrainer.

``train.method: dpo`` trains on TRL's ``DPOTrainer`` (trl.trainer), ``train.method: orpo`` on
``ORPOTrainer``, which this TRL release ships in ``trl.experimental.orpo``. Both get nbtune's
training arguments (:func:`nbtune.train.trainer.sft_args`'s, with the method's own: ``beta``, the
longest sequence), callbacks (metrics stream, interrupt, autosave, NaN/inf guard), staged
checkpoints, sync-free token counting and optimizer, and the host-built attention plans of the
patched model. Data: :mod:`nbtune.train.preference_data` (tokenized by nbtune, so TRL's own
preparation is skipped).

Memory:

- DPO's reference is the policy with its LoRA adapter switched off (peft's ``disable_adapter()``):
  no second copy of the weights. (TRL copies a PeftModel's adapter into a frozen "ref" adapter when
  no reference is given, for adapters that were trained before; nbtune's adapter is fresh, its B
  matrices zero, so base and "ref" are the same model and that copy is deleted.) The reference
  forward runs under ``no_grad`` through the same patched model.
- The sequence log-probabilities come from :func:`nbtune.kernels.linear_logprobs` (the LM head in
  chunks, the logits never whole): a forward installed for the duration of each loss computation
  answers TRL's ``model(..., labels=..., fused_lm_head=True)`` calls (:func:`logprob_head`), and
  ORPO's forward over the chosen + rejected sequences, which would otherwise build the full logits,
  is replaced by one through it (its chosen-reply loss, average log-probabilities and logged mean
  logits come from the same pass).
- Gradient checkpointing stays nbtune's (offloaded or plain): TRL switches the model's
  checkpointing off around the reference forward and back on with transformers' own function,
  which would drop nbtune's for the rest of the run; that switch is skipped (the reference forward
  runs without gradients, where checkpointing does nothing anyway).

What each logs (TRL's names; the metrics stream keeps them, nbtune/train/metrics.py): rewards of
the chosen and rejected replies, their margin and the share of pairs whose chosen reply has the
higher reward, the replies' log-probabilities; ORPO also its chosen-reply loss and log odds ratio.
DPO's reward of a reply is ``beta * (log pi(reply) - log pi_ref(reply))``; ORPO's is
``beta * mean log pi(reply token)``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import types
from pathlib import Path

import torch

from .config import PREFERENCE_METHODS, Config

__all__ = ["PREFERENCE_METHODS", "build_preference_trainer", "logprob_head", "preference_args"]


# ----------------------------------------------------------------------------- arguments
def preference_args(cfg: Config, out: Path, model, has_eval: bool):
    """TRL's DPOConfig / ORPOConfig for this run: every TrainingArguments field as the SFT run would
    set it (:func:`nbtune.train.trainer.sft_args`), plus the method's own."""
    from transformers import TrainingArguments

    from .trainer import sft_args

    base = sft_args(cfg, out, model, has_eval)
    common = {f.name: getattr(base, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    # the user's lora.dropout stays (TRL would zero every dropout); nbtune tokenized the data
    extra = dict(beta=cfg.train.beta, max_length=cfg.model.max_seq_length, disable_dropout=False, dataset_num_proc=None)
    if cfg.train.method == "dpo":
        from trl import DPOConfig

        return DPOConfig(**common, **extra, loss_type=["sigmoid"], truncation_mode="keep_start",
                         precompute_ref_log_probs=False)
    from trl.experimental.orpo import ORPOConfig

    return ORPOConfig(**common, **extra)


# ----------------------------------------------------------------------------- log-prob head
def _scoring_model(model):
    """The transformers model under DDP / accelerate and peft wrappers: the one whose forward runs the LM head."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def head_supported(base) -> bool:
    """Whether :func:`logprob_head` computes what the model's own head computes: a plain linear LM
    head, optionally Gemma's final softcap; no logit scaling and no MoE router loss (TRL's head
    covers those)."""
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    if any(getattr(config, name, None) is not None for name in ("logit_scale", "output_multiplier",
                                                                "lm_head_multiplier", "logits_scaling")):
        return False
    if getattr(config, "output_router_logits", False):
        return False
    head = base.get_output_embeddings()
    backbone = getattr(base, "base_model", None)  # transformers answers the model itself when it has no backbone
    return type(head) is torch.nn.Linear and backbone is not None and backbone is not base


def _fused_output(**fields):
    from trl.trainer.utils import FusedCausalLMOutput

    return FusedCausalLMOutput(**fields)


def _score(model, args, kwargs, labels, shift_labels):
    """The ``fused_lm_head=True`` answer: TRL's FusedCausalLMOutput from nbtune's linear_logprobs."""
    from ..kernels import linear_logprobs

    kwargs.pop("num_items_in_batch", None)
    kwargs["use_cache"] = False
    hidden = model.base_model(*args, **kwargs).last_hidden_state
    if shift_labels is None:  # token t predicts label t + 1
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    else:
        labels = shift_labels
    head = model.get_output_embeddings()
    hidden, labels = hidden.to(head.weight.device), labels.to(head.weight.device)
    mask = labels != -100
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scored = linear_logprobs(hidden[mask], head.weight, labels[mask], bias=head.bias, stats=True,
                             softcap=getattr(config, "final_logit_softcapping", None))
    # masked_scatter keeps an all-masked micro-batch connected to the graph (a zero, not an error)
    log_probs, entropy, mean_logits, is_top1 = (x.new_zeros(mask.shape).masked_scatter(mask, x) for x in scored)
    loss = -log_probs.sum() / mask.sum().clamp(min=1)
    return _fused_output(loss=loss, log_probs=log_probs, entropy=entropy, mean_logits=mean_logits, is_top1=is_top1,
                         label_mask=mask)


@contextlib.contextmanager
def logprob_head(model):
    """While inside: ``model(..., labels=..., fused_lm_head=True)`` returns the per-token log-probs
    (and TRL's logged stats) of :func:`nbtune.kernels.linear_logprobs`; calls without
    ``fused_lm_head`` run the model's forward as before. The forward in place before (TRL's fused
    head, nbtune's patched forward) is put back on exit, so a model reused by later runs carries
    nothing of it. Models :func:`head_supported` declines keep their forward (TRL's head)."""
    base = _scoring_model(model)
    if not head_supported(base):
        yield
        return
    had = "forward" in base.__dict__
    previous = base.__dict__.get("forward")
    inner = base.forward

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, **kwargs):
        if not fused_lm_head:
            if labels is not None:
                kwargs["labels"] = labels
            if shift_labels is not None:
                kwargs["shift_labels"] = shift_labels
            return inner(*args, **kwargs)
        return _score(self, args, kwargs, labels, shift_labels)

    base.forward = types.MethodType(forward, base)
    try:
        yield
    finally:
        if had:
            base.forward = previous
        else:
            del base.__dict__["forward"]


# ----------------------------------------------------------------------------- trainers
TOKENIZED = ("prompt_ids", "chosen_ids", "rejected_ids")


def _dpo_class():
    from trl import DPOTrainer

    from .flops import ParameterCountOnce
    from .token_count import TokensSeenOnDevice
    from .trainer import RunTrainer, checkpointing_switch_off

    class NbtuneDPOTrainer(ParameterCountOnce, TokensSeenOnDevice, RunTrainer, DPOTrainer):
        """TRL's DPOTrainer with nbtune's set-up; the reference is the model with LoRA switched off,
        the log-probs come from nbtune.kernels.linear_logprobs (module docstring)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            model = self.accelerator.unwrap_model(self.model)
            if "ref" in getattr(model, "peft_config", {}):  # TRL's copy of the (fresh) adapter: not needed
                model.delete_adapter("ref")
                model.set_adapter("default")

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if set(TOKENIZED) <= set(dataset.column_names):  # tokenized by nbtune.train.preference_data
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            with logprob_head(model), checkpointing_switch_off("dpo_trainer"):
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)

    return NbtuneDPOTrainer


def _orpo_class():
    from trl.experimental.orpo import ORPOTrainer

    from .flops import ParameterCountOnce
    from .token_count import TokensSeenOnDevice
    from .trainer import RunTrainer

    class NbtuneORPOTrainer(ParameterCountOnce, TokensSeenOnDevice, RunTrainer, ORPOTrainer):
        """TRL's ORPOTrainer (trl.experimental) with nbtune's set-up, on nbtune's tokenized pairs, its
        forward through nbtune.kernels.linear_logprobs (module docstring)."""

        def tokenize_row(self, feature, model=None):
            """ORPO's row layout from nbtune's token ids: prompt, prompt + chosen and prompt + rejected
            (cut to max_length, keeping the start), labels -100 over the prompt."""
            prompt = list(feature["prompt_ids"])
            row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
            for side in ("chosen", "rejected"):
                ids = (prompt + list(feature[f"{side}_ids"]))[: self.max_length]
                row[f"{side}_input_ids"] = ids
                row[f"{side}_attention_mask"] = [1] * len(ids)
                row[f"{side}_labels"] = [-100] * min(len(prompt), len(ids)) + ids[len(prompt):]
            return row

        def _track_num_input_tokens(self, inputs):
            """ORPO's batches have no ``input_ids``: the tokens read are the chosen and rejected rows'."""
            if "input_ids" not in inputs and "chosen_attention_mask" in inputs:
                masks = [inputs[f"{side}_attention_mask"].reshape(-1) for side in ("chosen", "rejected")]
                inputs = {"input_ids": inputs["chosen_input_ids"], "attention_mask": torch.cat(masks)}
            return super()._track_num_input_tokens(inputs)

        def concatenated_forward(self, model, batch):
            """ORPO's outputs (average reply log-probs, the chosen replies' loss over all their tokens,
            and what its logged mean logits average) from one pass through linear_logprobs."""
            cat = self.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=self.padding_value,
                                           device=self.accelerator.device)
            n_chosen = batch["chosen_labels"].shape[0]
            ids, mask = cat["concatenated_input_ids"], cat["concatenated_attention_mask"]
            labels = torch.where(mask == 1, ids, -100)  # ORPO's loss on the chosen rows: every real token
            with logprob_head(model):
                out = model(ids, attention_mask=mask, use_cache=False, labels=labels, fused_lm_head=True)
            if not hasattr(out, "log_probs"):  # a model logprob_head declines: ORPO's own forward
                return super().concatenated_forward(model, batch)
            reply = cat["concatenated_labels"][:, 1:] != -100
            logps = (out.log_probs * reply).sum(-1) / reply.sum(-1).clamp(min=1)
            chosen_tokens = out.label_mask[:n_chosen]
            nll = -out.log_probs[:n_chosen].sum() / chosen_tokens.sum().clamp(min=1)
            mean_logits = out.mean_logits.detach()
            return (logps[:n_chosen], logps[n_chosen:], mean_logits[:n_chosen][chosen_tokens],
                    mean_logits[n_chosen:][out.label_mask[n_chosen:]], nll)

    return NbtuneORPOTrainer


def build_preference_trainer(cfg: Config, out: Path, model, tokenizer, data, callbacks=(), **controls):
    """nbtune's DPO or ORPO trainer for this run (``cfg.train.method``); ``controls``: the run's
    (:class:`~nbtune.train.trainer.RunTrainer`'s keyword arguments)."""
    from .. import quiet

    args = preference_args(cfg, out, model, data.eval is not None)
    with quiet.loading():
        if cfg.train.method == "dpo":
            return _dpo_class()(model=model, ref_model=None, args=args, train_dataset=data.train,
                                eval_dataset=data.eval, processing_class=tokenizer, callbacks=list(callbacks), **controls)
        return _orpo_class()(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                             processing_class=tokenizer, callbacks=list(callbacks), **controls)
