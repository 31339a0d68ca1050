"""Peer: Unsloth on the same random-weight checkpoints and the same loop as hf_qlora_baseline.py.

nbtune's copy of the script behind the reference figures of benchmarks/README.md. Changes: NBTUNE_BENCH_SDPA (T4 emulation)
is applied before unsloth is imported; the JSON line also carries first_loss_exact; its word-level
tokenizer comes from bench_common.ensure_tokenizer (the same function, shared with nbtune_peer.py).
"""
import os, sys, json, time, gc
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# nbtune copy: NBTUNE_BENCH_SDPA (T4 emulation) must take effect before unsloth is imported.
from bench_common import apply_sdpa_backend_from_env, ensure_tokenizer
apply_sdpa_backend_from_env()
import unsloth
from unsloth import FastLanguageModel
import torch, bitsandbytes as bnb
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_qlora_baseline import build_checkpoint

def run(shape, path, batch, seqlen, dtype, steps=int(os.environ.get("STEPS", 8)), warmup=int(os.environ.get("WARMUP", 3)), rank=16):
    torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    model, tok = FastLanguageModel.from_pretrained(path, max_seq_length=seqlen, dtype=dtype, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=rank, lora_alpha=rank, lora_dropout=0, bias="none",
        target_modules=["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"],
        use_gradient_checkpointing="unsloth", random_state=3407)
    load_s = time.time() - t0
    FastLanguageModel.for_training(model)
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
    res = dict(peer="unsloth-2026.10.9", shape=shape, batch=batch, seqlen=seqlen, dtype=str(dtype).split(".")[-1],
               rank=rank, load_s=round(load_s,1), step_s_median=round(med,3),
               tokens_per_s=round(batch*seqlen/med), after_load_gib=round(after_load/2**30,2),
               peak_alloc_gib=round(torch.cuda.max_memory_allocated()/2**30,2),
               peak_reserved_gib=round(torch.cuda.max_memory_reserved()/2**30,2),
               first_loss=round(losses[0],3), last_loss=round(losses[-1],3),
               first_loss_exact=losses[0], cap_gib=float(os.environ.get("MEM_CAP_GIB", 0)))
    print(json.dumps(res), flush=True)
    del model, opt; gc.collect(); torch.cuda.empty_cache()

if __name__ == "__main__":
    root = os.environ.get("CKPT_ROOT", "/tmp/ckpt")
    cap = float(os.environ.get("MEM_CAP_GIB", 0))
    for shape, b, s, dt in [a.split(":") for a in sys.argv[1:]]:
        p = f"{root}/{shape}"
        build_checkpoint(shape, p)
        from hf_qlora_baseline import SHAPES
        ensure_tokenizer(p, SHAPES[shape]["vocab_size"])
        if cap:  # emulate a smaller GPU: cap what torch's allocator may reserve (after the checkpoint is built)
            torch.cuda.set_per_process_memory_fraction(cap * 2**30 / torch.cuda.get_device_properties(0).total_memory)
        try:
            run(shape, p, int(b), int(s), getattr(torch, dt))
        except torch.OutOfMemoryError:
            print(json.dumps(dict(peer="unsloth", shape=shape, batch=b, seqlen=s, dtype=dt, cap_gib=cap, error="OOM")), flush=True)
            gc.collect(); torch.cuda.empty_cache()
