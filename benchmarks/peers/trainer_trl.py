"""Peers on TRL's SFTTrainer: Unsloth's way (``--peer unsloth``: FastLanguageModel, its LoRA and
its gradient checkpointing, then SFTTrainer, as its notebooks train) and the plain Hugging Face way
(``--peer trl``: transformers + bitsandbytes 4-bit + peft, ``prepare_model_for_kbit_training``,
SFTTrainer with non-reentrant gradient checkpointing).

    python benchmarks/peers/trainer_trl.py --peer unsloth --model DIR --data rows.jsonl --batch 2 \\
        --seq 2048 --dtype bfloat16 [--packing] --warmup 2 --steps 5 --out DIR

Same data, settings and clock as peers/trainer_nbtune.py (trainer_common.py); the rows go to
SFTTrainer as they are (``text`` rows or ``messages`` conversations, which it renders with the
tokenizer's chat template), with ``packing`` and ``max_length`` = --seq. Run the unsloth peer with
Unsloth's packages first on PYTHONPATH (benchmarks/trainer.py does). Prints one JSON line.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import LORA_TARGETS, apply_mem_cap, apply_sdpa_backend_from_env, mem_cap_gib  # noqa: E402

import trainer_common as tc  # noqa: E402

PEERS = ("unsloth", "trl")


def load_unsloth(args, dtype, **load_kwargs):
    from unsloth import FastLanguageModel

    model, tok = FastLanguageModel.from_pretrained(args.model, max_seq_length=args.seq, dtype=dtype,
                                                   load_in_4bit=tc.on_gpu(), **load_kwargs)
    model = FastLanguageModel.get_peft_model(model, r=tc.LORA_R, lora_alpha=tc.LORA_R, lora_dropout=0, bias="none",
                                             target_modules=list(LORA_TARGETS),
                                             use_gradient_checkpointing="unsloth", random_state=tc.SEED)
    return model, tok


def load_peft(args, dtype):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    gpu = tc.on_gpu()
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype) if gpu else None
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=quant, dtype=dtype,
                                                 attn_implementation="sdpa",
                                                 device_map={"": 0} if gpu else None)
    if quant is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=tc.LORA_R, lora_alpha=tc.LORA_R, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      target_modules=list(LORA_TARGETS))
    model = get_peft_model(model, lora)
    return model, AutoTokenizer.from_pretrained(args.model)


def clock_callback(clock: tc.StepClock):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.start()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:  # a step's log (not the end-of-training totals)
                clock.step(state.num_input_tokens_seen or 0, logs["loss"])

    return Clock()


def shared_settings(args, peer: str, batch: int | None = None) -> dict:
    """The TrainingArguments every TRL peer sets alike (SFT, DPO and GRPO): one micro-batch of ``batch``
    (default --batch) sequences per step, trainer_common's lr, schedule and seed, 8-bit AdamW on a GPU,
    the row's dtype, nothing saved or reported; the plain peer's non-reentrant gradient checkpointing."""
    gpu = tc.on_gpu()
    settings = dict(
        output_dir=args.out, per_device_train_batch_size=args.batch if batch is None else batch,
        gradient_accumulation_steps=1, max_steps=args.warmup + args.steps, learning_rate=tc.LR,
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1,
        optim="adamw_8bit" if gpu else "adamw_torch", bf16=gpu and args.dtype == "bfloat16",
        fp16=gpu and args.dtype == "float16", use_cpu=not gpu, report_to="none", save_strategy="no",
        seed=tc.SEED, data_seed=tc.SEED)
    if peer == "trl":
        settings.update(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    return settings


def known_config(config_class, settings: dict):
    """``config_class(**settings)`` without the settings this TRL's class does not know: (config, left out),
    so one set of settings serves the TRL releases the peers run."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(config_class) if f.init}
    left_out = sorted(k for k in settings if k not in known)
    return config_class(**{k: v for k, v in settings.items() if k in known}), left_out


def sft_config(args, peer: str, fmt: str):
    from trl import SFTConfig

    extra = {"dataset_text_field": "text"} if fmt == "text" else {}
    if args.packing and args.packing_strategy == "split":  # TRL's rows cut to length: "wrapped"
        extra["packing_strategy"] = "wrapped"
    return SFTConfig(**shared_settings(args, peer), packing=bool(args.packing), max_length=args.seq,
                     include_num_input_tokens_seen="non_padding", **extra)


def load_run(args, base: dict, after_unsloth=None, unsloth_load: dict | None = None):
    """What both TRL peers start with: Unsloth imported first where it is the peer (it patches
    transformers and TRL; ``after_unsloth`` runs right after it, e.g. its DPO or GRPO patch), the T4
    cap, the model and tokenizer (``unsloth_load``: more arguments of Unsloth's ``from_pretrained``),
    and the rows. Returns (trl, model, tokenizer, dataset)."""
    if args.peer == "unsloth":
        import unsloth

        base["peer"] = f"unsloth-{unsloth.__version__}"
        if after_unsloth is not None:
            after_unsloth()
    import torch
    import trl
    from datasets import load_dataset

    base["trl"] = trl.__version__
    if tc.on_gpu():
        apply_mem_cap(mem_cap_gib())
    dtype = getattr(torch, args.dtype)
    model, tok = load_unsloth(args, dtype, **(unsloth_load or {})) if args.peer == "unsloth" else load_peft(args, dtype)
    return trl, model, tok, load_dataset("json", data_files=args.data, split="train")


def main(argv=None) -> int:
    args = tc.parse_args(argv, peers=PEERS)
    apply_sdpa_backend_from_env()  # before unsloth / transformers are imported
    fmt = tc.data_format(args.data)
    base = dict(peer=args.peer, row=args.row, batch=args.batch, seq=args.seq, dtype=args.dtype,
                packing=bool(args.packing), data=os.path.basename(args.data), format=fmt,
                packing_strategy=(("wrapped" if args.packing_strategy == "split" else "bfd") if args.packing else None),
                **tc.environment_fields())
    t0 = time.perf_counter()

    def train() -> dict:
        trl, model, tok, dataset = load_run(args, base)
        clock = tc.StepClock()
        trainer = trl.SFTTrainer(model=model, processing_class=tok, train_dataset=dataset,
                                 args=sft_config(args, args.peer, fmt), callbacks=[clock_callback(clock)])
        trainer.train()
        peak = tc.peak_reserved_gib()
        return dict(base, **tc.summarize(clock, args.warmup, args.batch, args.seq), peak_reserved_gib=peak,
                    optim=str(getattr(trainer.args.optim, "value", trainer.args.optim)),
                    pad_token=tok.pad_token, total_s=round(time.perf_counter() - t0, 1))

    return tc.run_peer(base, train)


if __name__ == "__main__":
    sys.exit(main())
