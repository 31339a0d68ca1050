"""Peers on TRL's DPOTrainer, for the DPO rows: Unsloth's way (``--peer unsloth``:
FastLanguageModel and its LoRA with ``use_gradient_checkpointing="unsloth"``, then
``PatchDPOTrainer()`` before TRL's DPOTrainer is made, as Unsloth's DPO notebooks do) and the plain
Hugging Face way (``--peer trl``: transformers + bitsandbytes 4-bit + peft,
``prepare_model_for_kbit_training``, non-reentrant gradient checkpointing). The model loaders and
the step clock are peers/trainer_trl.py's.

    python benchmarks/peers/trainer_trl_dpo.py --peer trl --model DIR --data pairs.jsonl --batch 2 \\
        --seq 1024 --dtype bfloat16 --warmup 2 --steps 5 --out DIR

Same settings and clock as peers/trainer_nbtune.py --method dpo (trainer_common.py): the rows (chat
form {prompt, chosen, rejected}) go to DPOTrainer as they are, which renders them with the tokenizer's
chat template as nbtune does; ``ref_model=None`` with ``beta`` 0.1, ``max_length`` = --seq (TRL's
``keep_start`` truncation, nbtune's too), ``precompute_ref_log_probs=False`` (nbtune computes the
reference log-probs each step too), sigmoid loss. Only DPOConfig fields present in both TRL releases
the peers run (Unsloth's and the pinned one) are set; there is no ``max_prompt_length`` (removed from
TRL). The reference: given a PeftModel and no ref_model, TRL copies the (fresh, B = 0) adapter into a
frozen "ref" adapter and scores the reference with it; nbtune deletes that copy and scores with the
adapter switched off. Both give the base model's log-probs; the line's ``reference`` says which this
run used. Prints one JSON line.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import apply_sdpa_backend_from_env  # noqa: E402

import trainer_common as tc  # noqa: E402
from trainer_trl import PEERS, clock_callback, known_config, load_run, shared_settings  # noqa: E402


def dpo_settings(args, peer: str) -> dict:
    """DPOConfig's arguments for this run (before :func:`dpo_config` keeps the ones this TRL has)."""
    return dict(shared_settings(args, peer), include_num_input_tokens_seen="non_padding", beta=tc.DPO_BETA,
                max_length=args.seq, precompute_ref_log_probs=False)


def dpo_config(settings: dict):
    """TRL's DPOConfig from ``settings``, leaving out what this TRL does not know; (config, left out)."""
    from trl import DPOConfig

    return known_config(DPOConfig, settings)


def patch_unsloth_dpo() -> None:
    """Unsloth's DPO patch, before the DPOTrainer is made, as Unsloth's DPO notebooks do."""
    from unsloth import PatchDPOTrainer

    PatchDPOTrainer()


def reference_kind(model) -> str:
    """How DPOTrainer scores the reference of this (peft) model: a frozen copy of the adapter, or the adapter off."""
    return "ref adapter" if "ref" in (getattr(model, "peft_config", None) or {}) else "adapter off"


def main(argv=None) -> int:
    args = tc.parse_args(argv, peers=PEERS)
    args.method = "dpo"
    apply_sdpa_backend_from_env()  # before unsloth / transformers are imported
    fmt = tc.data_format(args.data)
    base = dict(peer=args.peer, row=args.row, method="dpo", batch=args.batch, seq=args.seq, dtype=args.dtype,
                packing=False, data=os.path.basename(args.data), format=fmt, beta=tc.DPO_BETA,
                precompute_ref_log_probs=False, **tc.environment_fields())
    t0 = time.perf_counter()

    def train() -> dict:
        if fmt != "preference":
            raise ValueError(f"{args.data}: DPO reads rows with prompt, chosen and rejected")
        trl, model, tok, dataset = load_run(args, base, after_unsloth=patch_unsloth_dpo)
        config, left_out = dpo_config(dpo_settings(args, args.peer))
        if left_out:
            base["dpo_config_left_out"] = left_out
        clock = tc.StepClock()
        trainer = trl.DPOTrainer(model=model, ref_model=None, args=config, train_dataset=dataset,
                                 processing_class=tok, callbacks=[clock_callback(clock)])
        base["reference"] = reference_kind(trainer.accelerator.unwrap_model(trainer.model))
        trainer.train()
        peak = tc.peak_reserved_gib()
        return dict(base, **tc.summarize(clock, args.warmup, tc.sequences(args), args.seq), peak_reserved_gib=peak,
                    optim=str(getattr(trainer.args.optim, "value", trainer.args.optim)),
                    gradient_checkpointing=bool(trainer.args.gradient_checkpointing),
                    pad_token=tok.pad_token, total_s=round(time.perf_counter() - t0, 1))

    return tc.run_peer(base, train)


if __name__ == "__main__":
    sys.exit(main())
