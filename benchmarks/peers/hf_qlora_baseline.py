"""Peer baseline: the standard Hugging Face QLoRA recipe (transformers + peft + bitsandbytes).

Builds a random-weight model of a real 7B/8B shape, saves it, reloads it the way users do
(from_pretrained + BitsAndBytesConfig nf4), wraps it with peft LoRA on all linear layers,
and times a plain training loop on random tokens. Prints one JSON line per config.

nbtune's copy of the script behind the reference figures of benchmarks/README.md. Changes from the
original, none of which alters what it measures: SHAPES and build_checkpoint
moved to bench_common.py (same llama shapes, same checkpoint; more shapes); NBTUNE_BENCH_SDPA and
MEM_CAP_GIB honoured when set (T4 emulation); the JSON line also carries first_loss_exact (the
unrounded first loss, for models.py's cross-peer check) and cap_gib.
"""
import json, os, sys, time, gc, shutil
import torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# nbtune copy: shapes and checkpoint come from bench_common (one table for the three peers); the
# T4-emulation switches (NBTUNE_BENCH_SDPA, MEM_CAP_GIB) are honoured. Unset, nothing changes.
from bench_common import SHAPES, build_checkpoint, apply_sdpa_backend_from_env, apply_mem_cap, mem_cap_gib
apply_sdpa_backend_from_env()
from transformers import AutoModelForCausalLM, LlamaConfig, BitsAndBytesConfig
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
import bitsandbytes as bnb

def run(shape, path, batch, seqlen, dtype, steps=8, warmup=3, rank=16):
    torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=dtype,
                                                 attn_implementation="sdpa", device_map={"": 0})
    load_s = time.time() - t0
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    print(f"# gc after prepare: {getattr(model,'is_gradient_checkpointing',None)} 4bit-flag: {getattr(model,'is_loaded_in_4bit',None)}", file=sys.stderr)
    if not getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lcfg = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      target_modules=["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"])
    model = get_peft_model(model, lcfg)
    model.train()
    opt = bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    after_load = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    V = model.config.vocab_size
    g = torch.Generator(device="cuda").manual_seed(1)
    times, losses = [], []
    for i in range(warmup + steps):
        ids = torch.randint(0, V, (batch, seqlen), device="cuda", generator=g)
        torch.cuda.synchronize(); t = time.time()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step(); opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup: times.append(time.time() - t)
        losses.append(out.loss.item())
    med = sorted(times)[len(times)//2]
    res = dict(peer="hf-peft-bnb", shape=shape, batch=batch, seqlen=seqlen, dtype=str(dtype).split(".")[-1],
               rank=rank, load_s=round(load_s,1), step_s_median=round(med,3),
               tokens_per_s=round(batch*seqlen/med), after_load_gib=round(after_load/2**30,2),
               peak_alloc_gib=round(torch.cuda.max_memory_allocated()/2**30,2),
               peak_reserved_gib=round(torch.cuda.max_memory_reserved()/2**30,2),
               first_loss=round(losses[0],3), last_loss=round(losses[-1],3),
               first_loss_exact=losses[0], cap_gib=mem_cap_gib())
    print(json.dumps(res), flush=True)
    del model, opt; gc.collect(); torch.cuda.empty_cache()
    return res

if __name__ == "__main__":
    root = os.environ.get("CKPT_ROOT", "/tmp/ckpt")
    plan = [a.split(":") for a in sys.argv[1:]]  # shape:batch:seqlen:dtype
    for shape, b, s, dt in plan:
        p = f"{root}/{shape}"
        build_checkpoint(shape, p)
        apply_mem_cap(mem_cap_gib())  # after the checkpoint is built, as unsloth_peer.py does
        try:
            run(shape, p, int(b), int(s), getattr(torch, dt))
        except torch.OutOfMemoryError as e:
            print(json.dumps(dict(peer="hf-peft-bnb", shape=shape, batch=b, seqlen=s, error="OOM")))
