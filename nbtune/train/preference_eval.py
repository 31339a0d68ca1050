"""How often a model prefers the chosen reply: the sequence log-probabilities of preference pairs.

    acc = preference_accuracy(result)   # {"before": 0.56, "after": 0.81, "pairs": 16}: held-out pairs

``pair_logps`` scores each pair's replies, ``log pi(chosen | prompt)`` and ``log pi(rejected |
prompt)`` (sums over the reply tokens, through :func:`nbtune.kernels.linear_logprobs`). A pair is
ranked right when the chosen reply is the more likely one. Unlike DPO's logged reward accuracy
(which compares each reply to the reference, so it is 0 before any training), this is the model's
own preference, measured the same way before training (the adapter switched off: the base model)
and after.
"""
from __future__ import annotations

import contextlib

import torch


def pair_logps(model, tokenizer, pairs, batch_size: int = 8, max_length: int | None = None):
    """(chosen, rejected): fp32 tensors of the replies' log-probabilities under ``model`` for each
    pair of ``pairs`` (a datasets.Dataset with prompt_ids / chosen_ids / rejected_ids, as
    :func:`nbtune.train.preference_data.prepare_preference_data` makes), cut to ``max_length``
    tokens as training cuts them."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from .preference import _scoring_model, head_supported, logprob_head

    collate = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=max_length)
    device = next(model.parameters()).device
    fused = head_supported(_scoring_model(model))
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    try:
        with torch.no_grad(), logprob_head(model):
            for start in range(0, len(pairs), batch_size):
                batch = collate([pairs[i] for i in range(start, min(start + batch_size, len(pairs)))])
                ids, mask, reply = (batch[k].to(device) for k in ("input_ids", "attention_mask", "completion_mask"))
                labels = ids.masked_fill(reply == 0, -100)
                if fused:
                    per_token = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True,
                                      use_cache=False).log_probs
                else:  # a head nbtune's kernel does not cover: the model's own logits
                    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
                    target = labels[:, 1:]
                    per_token = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
                    per_token = per_token * (target != -100)
                c, r = per_token.sum(-1).float().chunk(2)
                chosen.append(c.cpu())
                rejected.append(r.cpu())
    finally:
        model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def ranked_right(model, tokenizer, pairs, **kwargs) -> float:
    """The share of ``pairs`` whose chosen reply ``model`` finds more likely than the rejected one."""
    chosen, rejected = pair_logps(model, tokenizer, pairs, **kwargs)
    return float((chosen > rejected).float().mean())


def preference_accuracy(result, pairs=None, batch_size: int = 8) -> dict:
    """``{"before", "after", "pairs"}``: the share of pairs ranked right by the base model (LoRA off)
    and by the trained one, for a finished dpo / orpo run's ``result``. ``pairs``: a tokenized pair
    set; default the run's held-out pairs (rebuilt from its config)."""
    model, tokenizer = result.live_model()
    cfg = result.config
    if pairs is None:
        from .preference_data import prepare_preference_data

        pairs = prepare_preference_data(cfg.data, tokenizer, cfg.model.max_seq_length).eval
        if pairs is None:
            raise ValueError("this run has no held-out pairs (data.eval_split: null); pass pairs=")
    kwargs = dict(batch_size=batch_size, max_length=cfg.model.max_seq_length)
    off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with off:
        before = ranked_right(model, tokenizer, pairs, **kwargs)
    return {"before": before, "after": ranked_right(model, tokenizer, pairs, **kwargs), "pairs": len(pairs)}
