"""Data parallel on the 2-GPU machine: the same nbtune config on 1 GPU and on 2 GPUs (torchrun, DDP).

    python benchmarks/multi_gpu.py [--out DIR] [--stages losses,throughput,contention,profile] [--steps 10] [--warmup 3]

Both stages run ``nbtune finetune run.yaml`` itself (1 GPU: ``CUDA_VISIBLE_DEVICES=0 python -m
nbtune.ui.cli finetune``; 2 GPUs: ``torchrun --nproc_per_node 2 -m nbtune.ui.cli finetune``), the
same global batch on both: the 2-GPU run halves grad_accum (--one-gpu-grad-accum, default 2), so each
rank's micro-batch is one of the 1-GPU run's micro-batches.

- ``losses``: a small random Llama (hidden 1024, 8 layers, 8192-word vocabulary, 4-bit NF4, bf16)
  on word sequences with a learnable pattern, 30 steps: the two loss curves agree within
  LOSS_RTOL at every step, the same rows are read at every step (equal token counts), and the
  ranks' LoRA weights are identical at the end.
- ``throughput``: llama3-8b QLoRA (the peers' random-weight checkpoint from
  peers/bench_common.py, r=16 on the seven projections, offloaded checkpointing, 8-bit AdamW),
  2 x 2048 tokens per GPU per micro-batch: tokens/s of the whole run (rank 0's metrics stream:
  global tokens over wall time per step, median over the steps after the warm-up) on 2 GPUs
  over 1 GPU; target >= 1.85x. Also each rank's peak reserved memory against the planner's
  per-GPU figure for world_size 2. ``--rounds N`` runs each side N times in alternating order and
  compares the median runs.
- ``contention``: whether one GPU's run slows down when another runs beside it: the one-GPU run
  alone, then one on each GPU at once (independent processes, no DDP), then that pair with each
  process held to its own half of the CPUs; tokens/s of each against the solo run, and the host's
  CPU layout.
- ``profile``: the throughput stage's model and micro-batches under benchmarks/ddp_profile.py, on
  1 GPU and on each rank of the 2-GPU run (``--profile-worlds``): per rank a text file with the
  host timeline of every micro-batch, the loop's phases per step (clipping, the optimizer step,
  logging, fetching batches), the garbage collections, and a torch.profiler window around the last
  step boundary. Plain checkpointing unless ``--checkpointing`` names another mode.
- ``checkpointing`` (one GPU): the one-GPU run with plain and with offloaded checkpointing,
  ``--rounds`` times each in alternating order: what offloading costs on one GPU, i.e. how far
  the ``auto`` default's speed-up stands from the like-for-like one.

Every run's timed steps report the collector's pauses (``gc_ms_each``, ``gc_full``); with ``--env
NBTUNE_OFFLOAD_TIMING=1`` an offloading run's steps also report where offloading spent time
(``offload_each``: the compute stream's waits on the copies, the copies' GB/s). Every run samples
the GPUs (clock, power, slowdown reasons: benchmarks/gpu_sampler.py) into its ``gpu_samples``.

No network: the checkpoints are built locally (CKPT_ROOT, default /tmp/ckpt); the tokenizers are
whitespace word-level tokenizers ("w<i>" is token i), so the data are text rows of those words.
Writes ``multi_gpu.json`` to --out (default $OUT, else /tmp/nbtune-multi-gpu; a failed run's log
tail is in it); the runs' outputs and logs stay in --work (/tmp/nbtune-multi-gpu-work). Exits 1
when a run fails or a target is missed, 2 without the GPUs the stages need. About 5-7 minutes on
2 x H200 (the 8B checkpoint build, ~1-2 minutes, is skipped when CKPT_ROOT already has it).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [os.path.join(HERE, "peers"), HERE]
from bench_common import LORA_TARGETS, SHAPES, build_checkpoint, checkpoint_path  # noqa: E402
from gpu_sampler import GpuSampler  # noqa: E402

TARGET_SPEEDUP = 1.85
LOSS_RTOL = 1e-2
WORLD = 2


# ---------------------------------------------------------------------------- inputs
SPECIALS = ("<pad>", "<unk>", "</s>")  # ids 0, 1, 2; no word contains them (transformers splits on them)


def word_tokenizer(path: str, vocab: int) -> None:
    """A whitespace word-level tokenizer of ``vocab`` tokens at ``path``: "w<i>" is token i (i >= 3)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {name: i for i, name in enumerate(SPECIALS)} | {f"w{i}": i for i in range(len(SPECIALS), vocab)}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                            eos_token="</s>").save_pretrained(path)


def word_view(checkpoint: str, vocab: int) -> str:
    """A sibling folder whose weight and config files link to ``checkpoint``'s, with a word tokenizer."""
    view = f"{checkpoint.rstrip('/')}@words"
    if os.path.isfile(os.path.join(view, "tokenizer.json")):
        return view
    os.makedirs(view, exist_ok=True)
    for name in os.listdir(checkpoint):
        if name.startswith("tokenizer") or name == "special_tokens_map.json":
            continue
        link = os.path.join(view, name)
        if not os.path.lexists(link):
            os.symlink(os.path.join(os.path.abspath(checkpoint), name), link)
    word_tokenizer(view, vocab)
    return view


def small_checkpoint(path: str, vocab: int) -> str:
    """A random Llama of ~130M parameters (bf16) with a word tokenizer."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                      num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=1024, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    word_tokenizer(path, vocab)
    return path


def write_rows(path: str, rows: list[str]) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps({"text": r}) + "\n" for r in rows)
    return path


def pattern_rows(n: int, vocab: int, lengths: tuple[int, int], seed: int = 0) -> list[str]:
    """Word cycles of 16 from a random start (a model can learn them), of random lengths."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start, length = rng.randrange(3, vocab - 16), rng.randrange(*lengths)
        out.append(" ".join(f"w{start + k % 16}" for k in range(length)))
    return out


def random_rows(n: int, vocab: int, words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(3, vocab)}" for _ in range(words)) for _ in range(n)]


def run_config(model: str, data: str, seq: int, train: dict, lora: dict, out: str,
               checkpointing: str = "offload") -> dict:
    return {
        "model": {"name": model, "max_seq_length": seq, "load_in_4bit": True, "dtype": "bfloat16"},
        "data": {"source": data, "format": "text", "responses_only": False, "eval_split": None},
        "lora": lora,
        "train": {"warmup_steps": 0, "optimizer": "adamw_8bit", "gradient_checkpointing": checkpointing, "seed": 1,
                  "logging_steps": 1, "save_steps": None, "force": True, **train},
        "output": {"dir": out},
    }


# ---------------------------------------------------------------------------- runs
def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def start_finetune(cfg: dict, gpus: int, name: str, work: str, entry: list[str] | None = None, gpu: int = 0,
                   cpus: list[int] | None = None, env_extra: dict | None = None) -> dict:
    """Start ``nbtune finetune`` on one GPU (``gpu``) or under torchrun on ``gpus``; returns the job
    for :func:`finish_finetune`.

    ``entry``: a script and its arguments to run instead of the CLI (the config's path is appended);
    ``cpus``: the CPUs the process may run on (a one-GPU run); ``env_extra``: more environment."""
    import yaml

    shutil.rmtree(cfg["output"]["dir"], ignore_errors=True)
    path = os.path.join(work, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", **(env_extra or {}))
    program = [*entry, path] if entry else ["-m", "nbtune.ui.cli", "finetune", path]
    if gpus == 1:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        cmd = [sys.executable, *program]
    else:
        env.pop("CUDA_VISIBLE_DEVICES", None)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus), "--master_addr",
               "127.0.0.1", "--master_port", free_port(), *program]
    log_path = os.path.join(work, f"{name}.log")
    log = open(log_path, "w")
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    # the GPUs' clocks, power and slowdown reasons during the run (a slow rank or a throttled GPU)
    sampler = GpuSampler(os.path.join(work, f"{name}.gpus.csv")).start()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, preexec_fn=pin)
    return dict(proc=proc, log=log, log_path=log_path, cfg=cfg, name=name, gpus=gpus, t0=time.time(),
                sampler=sampler)


def finish_finetune(job: dict, timeout: float) -> dict:
    """Wait for a started run (killed past ``timeout`` seconds from its start); its metrics log and
    how it went."""
    proc = job["proc"]
    try:
        rc = proc.wait(timeout=max(1.0, timeout - (time.time() - job["t0"])))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = "timeout"
    job["sampler"].stop()
    job["log"].close()
    metrics = os.path.join(job["cfg"]["output"]["dir"], "metrics.jsonl")
    records = [json.loads(line) for line in open(metrics) if line.strip()] if os.path.isfile(metrics) else []
    with open(job["log_path"]) as f:
        tail = f.read()[-3000:]
    seconds = round(time.time() - job["t0"], 1)
    samples = job["sampler"].summary()
    busy = "; ".join(f"GPU {i} busy {g['busy_s']} s at {g['sm_mhz_median']} MHz (min {g['sm_mhz_min']}), "
                     f"{g['power_w_median']} W, slowdowns {g['slowdowns']}" for i, g in samples.items() if g["busy_s"])
    print(f"# {job['name']}: rc={rc} in {seconds:.0f} s" + (f"; {busy}" if busy else ""), flush=True)
    return dict(name=job["name"], gpus=job["gpus"], rc=rc, seconds=seconds, records=records, gpu_samples=samples,
                log_tail=tail if rc != 0 else None)


def finetune(cfg: dict, gpus: int, name: str, work: str, timeout: int, entry: list[str] | None = None,
             **options) -> dict:
    """Run ``nbtune finetune`` to the end (:func:`start_finetune`'s options); its metrics log and how it went."""
    return finish_finetune(start_finetune(cfg, gpus, name, work, entry, **options), timeout)


def train_records(run: dict) -> list[dict]:
    return [r for r in run["records"] if r.get("event") == "train" and r.get("loss") is not None]


def compare_losses(one: dict, two: dict) -> dict:
    a, b = train_records(one), train_records(two)
    worst = max((abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in zip(a, b)), default=None)
    dist = next((r for r in two["records"] if r.get("event") == "distributed"), {})
    return dict(steps=[len(a), len(b)], losses_1gpu=[round(r["loss"], 5) for r in a],
                losses_2gpu=[round(r["loss"], 5) for r in b], max_rel_diff=worst,
                same_rows=[r["tokens"] for r in a] == [r["tokens"] for r in b],
                replicas_identical=dist.get("replicas_identical"), devices=dist.get("devices"),
                ok=bool(a) and len(a) == len(b) and worst is not None and worst <= LOSS_RTOL
                and dist.get("replicas_identical") is True)


OFFLOAD_FIELDS = ("wait_forward_ms", "wait_backward_ms", "host_wait_ms", "copy_out_gbps", "copy_in_gbps")


def speed(run: dict, warmup: int) -> dict:
    recs = [r for r in train_records(run) if r["step"] > warmup and r.get("tokens_per_s")]
    steps = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(train_records(run), train_records(run)[1:])
             if b["step"] > warmup]
    end = next((r for r in run["records"] if r.get("event") == "end"), {})
    dist = next((r for r in run["records"] if r.get("event") == "distributed"), {})
    return dict(tokens_per_s=statistics.median(r["tokens_per_s"] for r in recs) if recs else None,
                step_s=round(statistics.median(steps), 4) if steps else None, timed_steps=len(recs),
                step_s_each=[round(x, 4) for x in steps],  # a slow run: every step, or some?
                # the garbage collector's pauses in the timed steps (nbtune/train/gc_pause.py)
                gc_ms_each=[r.get("gc_ms") for r in recs], gc_full=sum(r.get("gc_full") or 0 for r in recs),
                gc_ms_per_step=round(statistics.mean(r.get("gc_ms") or 0.0 for r in recs), 1) if recs else None,
                # with NBTUNE_OFFLOAD_TIMING=1: per timed step, the compute stream's waits on the
                # offload copies and the copies' rates (nbtune.kernels.offload.offload_timing)
                offload_each=[{k: r.get(f"offload_{k}") for k in OFFLOAD_FIELDS} for r in recs]
                if any("offload_copy_out_n" in r for r in recs) else None,
                peak_reserved_gib=dist.get("peak_reserved_gib") or end.get("vram_peak_gib"))


def median_run(runs: list[dict], warmup: int) -> tuple[dict, dict]:
    """Of several runs of one side, the one with the median tokens/s (the lower middle one of an
    even count) and its speed: a whole run, so that its step time and memory go with its speed."""
    timed = sorted(((speed(r, warmup), r) for r in runs), key=lambda sr: sr[0]["tokens_per_s"] or 0.0)
    s, r = timed[(len(timed) - 1) // 2]
    return r, s


def without_records(run: dict) -> dict:
    """A run as the result JSON keeps it: how it went, not its metrics records."""
    return {k: v for k, v in run.items() if k != "records"}


# ---------------------------------------------------------------------------- stages
LORA = {"r": 16, "alpha": 16, "targets": list(LORA_TARGETS)}
THROUGHPUT_TRAIN = dict(batch_size=2, lr=2e-4)  # 2 x 2048 tokens per GPU per micro-batch


def llama3_8b_words(root: str) -> tuple[str, int, float]:
    """The peers' random-weight llama3-8b checkpoint (built once under ``root``) seen with the word
    tokenizer: (model folder, vocabulary size, seconds the build took)."""
    shape = "llama3-8b"
    path = checkpoint_path(shape, root)
    t0 = time.time()
    build_checkpoint(shape, path)
    build_s = round(time.time() - t0, 1)
    vocab = SHAPES[shape]["vocab_size"]
    return word_view(path, vocab), vocab, build_s

def stage_losses(work: str, root: str) -> dict:
    vocab, seq, steps = 8192, 512, 30
    model = small_checkpoint(os.path.join(root, "llama-130m-words"), vocab)
    data = write_rows(os.path.join(work, "patterns.jsonl"), pattern_rows(16 * steps, vocab, (64, 512)))
    base = dict(max_steps=steps, batch_size=4, lr=1e-3)
    one = finetune(run_config(model, data, seq, dict(base, grad_accum=4), LORA, os.path.join(work, "losses-1gpu")),
                   1, "losses-1gpu", work, 300)
    two = finetune(run_config(model, data, seq, dict(base, grad_accum=2), LORA, os.path.join(work, "losses-2gpu")),
                   WORLD, "losses-2gpu", work, 300)
    result = dict(model="random llama 130M (hidden 1024, 8 layers), 4-bit NF4, bf16", global_batch=16,
                  runs=[without_records(r) for r in (one, two)],
                  **compare_losses(one, two))
    result["ok"] = result["ok"] and one["rc"] == 0 and two["rc"] == 0
    return result


def stage_throughput(work: str, root: str, steps: int, warmup: int, one_gpu_grad_accum: int = 2,
                     two_gpu_grad_accum: int | None = None, checkpointing: str = "auto", rounds: int = 1,
                     env: dict | None = None) -> dict:
    shape = "llama3-8b"
    model, vocab, build_s = llama3_8b_words(root)
    if two_gpu_grad_accum is None:  # the same global batch
        two_gpu_grad_accum = max(1, one_gpu_grad_accum // WORLD)
    total = warmup + steps
    data = write_rows(os.path.join(work, "random-2048.jsonl"),
                      random_rows(2 * max(one_gpu_grad_accum, WORLD * two_gpu_grad_accum) * total, vocab, 2100))
    base = dict(THROUGHPUT_TRAIN, max_steps=total)
    runs = {1: [], WORLD: []}
    for r in range(rounds):  # alternating order: a host that drifts during the call favours neither side
        for gpus in ((1, WORLD) if r % 2 == 0 else (WORLD, 1)):
            accum = one_gpu_grad_accum if gpus == 1 else two_gpu_grad_accum
            name = f"8b-{gpus}gpu" + (f"-r{r + 1}" if rounds > 1 else "")
            runs[gpus].append(finetune(run_config(model, data, 2048, dict(base, grad_accum=accum), LORA,
                                                  os.path.join(work, name), checkpointing), gpus, name, work, 420,
                                          env_extra=env))
    (one, s1), (two, s2) = median_run(runs[1], warmup), median_run(runs[WORLD], warmup)
    ratio = s2["tokens_per_s"] / s1["tokens_per_s"] if s1["tokens_per_s"] and s2["tokens_per_s"] else None
    planned = None
    try:
        sys.path.insert(0, REPO)
        from nbtune.planner import plan_from_config

        p = plan_from_config(run_config(model, data, 2048, dict(base, grad_accum=1), LORA, "", checkpointing), gpu="H200",
                             world_size=WORLD)
        planned = round(p.peak_gib, 2)
    except Exception as e:  # noqa: BLE001 - the plan is context, not the measurement
        planned = f"no plan: {e}"
    same_global = one_gpu_grad_accum == WORLD * two_gpu_grad_accum
    return dict(shape=shape, per_gpu_micro_batch="2x2048", checkpointing=checkpointing, env=env or {},
                global_batch_rows=[2 * one_gpu_grad_accum, 2 * WORLD * two_gpu_grad_accum],
                grad_accum=[one_gpu_grad_accum, two_gpu_grad_accum], checkpoint_build_s=build_s,
                one_gpu=s1, two_gpus=s2, speedup=round(ratio, 3) if ratio else None, target=TARGET_SPEEDUP,
                planner_peak_gib_per_gpu=planned, losses=compare_losses(one, two) if same_global else None,
                rounds=rounds, tokens_per_s_per_round=[[speed(r, warmup)["tokens_per_s"] for r in runs[g]]
                                                       for g in (1, WORLD)],
                gc_full_per_round=[[speed(r, warmup)["gc_full"] for r in runs[g]] for g in (1, WORLD)],
                runs=[without_records(r) for r in runs[1] + runs[WORLD]],
                ok=bool(ratio and ratio >= TARGET_SPEEDUP
                        and all(r["rc"] == 0 for r in runs[1] + runs[WORLD])))


def host_topology() -> dict:
    """What the host's CPUs are (for reading the contention stage)."""
    keep = ("Model name", "Socket(s)", "Core(s) per socket", "Thread(s) per core", "NUMA node", "CPU max MHz", "CPU(s)")
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        lscpu = []
    return dict(lscpu=[line for line in lscpu if line.split(":")[0].strip().startswith(keep)],
                allowed_cpus=len(os.sched_getaffinity(0)))


def cpu_halves(cpus) -> list[list[int]]:
    """``cpus`` split into WORLD near-equal runs in order (one per process of the pinned pair)."""
    cpus = sorted(cpus)
    return [cpus[i * len(cpus) // WORLD:(i + 1) * len(cpus) // WORLD] for i in range(WORLD)]


def stage_contention(work: str, root: str, steps: int, warmup: int, grad_accum: int = 8,
                     checkpointing: str = "plain") -> dict:
    """Is a one-GPU run slower when another runs beside it? The throughput stage's one-GPU run
    alone on GPU 0, then one on each GPU at the same time (independent processes, no DDP), then the
    same pair with each process held to its own half of the CPUs this process may use. A run whose
    micro-batches are launched from Python slows down beside another when the two share host
    resources (cores, hyperthreads, memory)."""
    model, vocab, build_s = llama3_8b_words(root)
    data = write_rows(os.path.join(work, "random-2048.jsonl"), random_rows(2 * grad_accum * (warmup + steps), vocab, 2100))
    train = dict(THROUGHPUT_TRAIN, max_steps=warmup + steps, grad_accum=grad_accum)

    def config(name):
        return run_config(model, data, 2048, train, LORA, os.path.join(work, name), checkpointing)

    shares = cpu_halves(os.sched_getaffinity(0))
    solo = finetune(config("solo"), 1, "solo", work, 420)
    variants = {"solo": [solo]}
    for label, cpus in (("pair", [None] * WORLD), ("pair-pinned", shares)):
        jobs = [start_finetune(config(f"{label}-gpu{i}"), 1, f"{label}-gpu{i}", work, gpu=i, cpus=cpus[i])
                for i in range(WORLD)]
        variants[label] = [finish_finetune(job, 420) for job in jobs]
    speeds = {label: [speed(r, warmup) for r in runs] for label, runs in variants.items()}
    base = speeds["solo"][0]["tokens_per_s"]
    return dict(shape="llama3-8b", per_gpu_micro_batch="2x2048", grad_accum=grad_accum, checkpointing=checkpointing,
                checkpoint_build_s=build_s, topology=host_topology(),
                pinned_cpus=shares,
                tokens_per_s={label: [s["tokens_per_s"] for s in ss] for label, ss in speeds.items()},
                step_s={label: [s["step_s"] for s in ss] for label, ss in speeds.items()},
                vs_solo={label: [round(s["tokens_per_s"] / base, 3) if base and s["tokens_per_s"] else None for s in ss]
                         for label, ss in speeds.items() if label != "solo"},
                runs=[without_records(r) for runs in variants.values() for r in runs],
                ok=all(r["rc"] == 0 for runs in variants.values() for r in runs))


def one_gpu_variants(work: str, root: str, steps: int, warmup: int, grad_accum: int, rounds: int,
                     variants: dict) -> dict:
    """The throughput stage's one-GPU run under each of ``variants`` ({label: (checkpointing mode,
    extra environment)}), ``rounds`` times each in alternating order; the median runs compared with
    the first variant's. Needs one GPU only."""
    model, vocab, build_s = llama3_8b_words(root)
    data = write_rows(os.path.join(work, "random-2048.jsonl"), random_rows(2 * grad_accum * (warmup + steps), vocab, 2100))
    train = dict(THROUGHPUT_TRAIN, max_steps=warmup + steps, grad_accum=grad_accum)
    labels = list(variants)
    runs = {label: [] for label in labels}
    for r in range(rounds):
        for label in (labels if r % 2 == 0 else labels[::-1]):
            mode, env = variants[label]
            name = f"1gpu-{label}" + (f"-r{r + 1}" if rounds > 1 else "")
            runs[label].append(finetune(run_config(model, data, 2048, train, LORA, os.path.join(work, name), mode),
                                        1, name, work, 420, env_extra=env))
    medians = {label: median_run(runs[label], warmup)[1] for label in labels}
    base = medians[labels[0]]["tokens_per_s"]
    return dict(shape="llama3-8b", per_gpu_micro_batch="2x2048", grad_accum=grad_accum, rounds=rounds,
                checkpoint_build_s=build_s, variants={k: dict(checkpointing=m, env=e) for k, (m, e) in variants.items()},
                median=medians,
                tokens_per_s_per_round={label: [speed(r, warmup)["tokens_per_s"] for r in runs[label]] for label in labels},
                gc_full_per_round={label: [speed(r, warmup)["gc_full"] for r in runs[label]] for label in labels},
                vs_first={label: round(m["tokens_per_s"] / base, 3) if base and m["tokens_per_s"] else None
                          for label, m in medians.items()},
                runs=[without_records(r) for label in labels for r in runs[label]],
                ok=all(r["rc"] == 0 for label in labels for r in runs[label]))


def stage_checkpointing(work: str, root: str, steps: int, warmup: int, grad_accum: int = 8, rounds: int = 1,
                        env: dict | None = None) -> dict:
    """What offloaded checkpointing costs on one GPU: ``plain`` against ``offload`` (one_gpu_variants).
    It is the one-GPU half of the ``auto`` default (offload on one GPU, plain under data
    parallelism), so it decides how far the default's speed-up differs from the like-for-like one."""
    return one_gpu_variants(work, root, steps, warmup, grad_accum, rounds,
                            {"plain": ("plain", env or {}), "offload": ("offload", env or {})})


# GPUs each stage needs (profile: the largest world it profiles)
STAGE_GPUS = {"losses": WORLD, "throughput": WORLD, "contention": WORLD, "checkpointing": 1}


def stage_profile(work: str, root: str, out: str, one_gpu_grad_accum: int = 8, checkpointing: str = "plain",
                  worlds: tuple = (1, WORLD), steps: int = 4, repeats: int = 1) -> dict:
    """llama3-8b 2x2048 per GPU under benchmarks/ddp_profile.py, on 1 GPU and on each rank (``worlds``):
    the host timeline of every micro-batch and the loop's phases per step, unprofiled, then four
    micro-batches under torch.profiler around the last step boundary (the all-reduce, clipping, the
    optimizer step and logging between): the window comes last so that it perturbs nothing before.
    ``repeats`` > 1 profiles each run that many times, into ``out/r1``, ``out/r2``, ...: runs of one
    config differ from one another (benchmarks/NOTES.md, "Multi-GPU"), and one profile may not catch a slow one."""
    shape, two_gpu_grad_accum = "llama3-8b", max(1, one_gpu_grad_accum // WORLD)
    model, vocab, _ = llama3_8b_words(root)
    data = write_rows(os.path.join(work, "random-2048-profile.jsonl"),
                      random_rows(2 * one_gpu_grad_accum * steps, vocab, 2100))
    base = dict(THROUGHPUT_TRAIN, max_steps=steps)
    runs, windows, files = [], {}, []
    for repeat in range(1, repeats + 1):
        into = os.path.join(out, f"r{repeat}") if repeats > 1 else out
        for gpus in worlds:
            accum = one_gpu_grad_accum if gpus == 1 else two_gpu_grad_accum
            # the last two micro-batches of the second-to-last step and the first two of the last one
            windows[gpus] = ["--skip", str((steps - 1) * accum - 2), "--active", "4"]
            entry = [os.path.join(HERE, "ddp_profile.py"), "--out", into, *windows[gpus]]
            name = f"profile-{gpus}gpu" + (f"-r{repeat}" if repeats > 1 else "")
            runs.append(finetune(run_config(model, data, 2048, dict(base, grad_accum=accum), LORA,
                                            os.path.join(work, name), checkpointing), gpus, name, work, 420, entry))
        if os.path.isdir(into):
            files += sorted(os.path.relpath(os.path.join(into, f), out) for f in os.listdir(into)
                            if f.startswith("profile-") and f.endswith(".txt"))
    for f in files:
        with open(os.path.join(out, f)) as fh:
            print(f"# {f}: {fh.readline().strip()}")
    return dict(shape=shape, checkpointing=checkpointing, windows=windows, files=files, repeats=repeats,
                runs=[without_records(r) for r in runs],
                ok=all(r["rc"] == 0 for r in runs))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "/tmp/nbtune-multi-gpu")
    ap.add_argument("--work", default="/tmp/nbtune-multi-gpu-work", help="runs' outputs and logs (large)")
    ap.add_argument("--stages", default="losses,throughput",
                    help="comma-separated: losses, throughput, contention, profile (2 GPUs; profile with "
                         "--profile-worlds 1 needs one), checkpointing (1 GPU)")
    ap.add_argument("--steps", type=int, default=int(os.environ.get("STEPS", 10)))
    ap.add_argument("--warmup", type=int, default=int(os.environ.get("WARMUP", 3)))
    ap.add_argument("--one-gpu-grad-accum", type=int, default=2,
                    help="throughput: grad_accum of the 1-GPU run (global batch 2 x this rows of 2048 tokens)")
    ap.add_argument("--two-gpu-grad-accum", type=int, default=None,
                    help="throughput: grad_accum of the 2-GPU run (default: half the 1-GPU run's, the same global "
                         "batch; equal to it: the 1-GPU run's per-GPU schedule, twice its global batch)")
    ap.add_argument("--checkpointing", default="auto",
                    help="throughput: train.gradient_checkpointing of both runs (default auto, the config's "
                         "default: offload on one GPU, plain under DDP where it fits)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="throughput, checkpointing: run each side this many times, alternating the order; "
                         "the median run of each side counts")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="throughput, checkpointing: more environment for every run (e.g. NBTUNE_KERNELS=reference)")
    ap.add_argument("--profile-worlds", default=f"1,{WORLD}",
                    help="profile: the runs to profile, by number of GPUs (e.g. 2: the data-parallel run only)")
    ap.add_argument("--profile-repeats", type=int, default=1,
                    help="profile: profile each run this many times (into OUT/r1, OUT/r2, ...)")
    args = ap.parse_args(argv)
    bad = [e for e in args.env if "=" not in e]
    if bad:
        ap.error(f"--env takes KEY=VALUE, not {bad[0]!r}")
    env = dict(e.split("=", 1) for e in args.env)
    import torch

    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    worlds = tuple(int(n) for n in args.profile_worlds.split(","))
    need = max((max(worlds) if s == "profile" else STAGE_GPUS.get(s, 1)) for s in stages) if stages else 0
    if torch.cuda.device_count() < need:
        print(f"multi_gpu.py --stages {args.stages} needs {need} GPUs; this machine shows "
              f"{torch.cuda.device_count()}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    work = args.work
    os.makedirs(work, exist_ok=True)
    root = os.environ.get("CKPT_ROOT", "/tmp/ckpt")
    os.makedirs(root, exist_ok=True)
    result = dict(gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                  torch=torch.__version__, stages={})
    out_json = os.path.join(args.out, "multi_gpu.json")
    for stage in stages:
        t0 = time.time()
        if stage == "losses":
            result["stages"][stage] = stage_losses(work, root)
        elif stage == "throughput":
            result["stages"][stage] = stage_throughput(work, root, args.steps, args.warmup, args.one_gpu_grad_accum,
                                                       args.two_gpu_grad_accum, args.checkpointing, args.rounds,
                                                       env)
        elif stage == "contention":
            result["stages"][stage] = stage_contention(work, root, args.steps, args.warmup, args.one_gpu_grad_accum,
                                                       "plain" if args.checkpointing == "auto" else args.checkpointing)
        elif stage == "profile":
            result["stages"][stage] = stage_profile(work, root, args.out, args.one_gpu_grad_accum,
                                                    "plain" if args.checkpointing == "auto" else args.checkpointing,
                                                    worlds, args.steps, args.profile_repeats)
        elif stage == "checkpointing":
            result["stages"][stage] = stage_checkpointing(work, root, args.steps, args.warmup, args.one_gpu_grad_accum,
                                                          args.rounds, env)
        else:
            raise SystemExit(f"unknown stage {stage!r}: losses, throughput, contention, profile, checkpointing")
        result["stages"][stage]["stage_s"] = round(time.time() - t0, 1)
        with open(out_json, "w") as f:
            json.dump(result, f, indent=1)
    for name, st in result["stages"].items():
        if name == "profile":
            print(f"profile ({st['checkpointing']} checkpointing): {st['files']} in {args.out} -> "
                  f"{'ok' if st['ok'] else 'FAIL'}")
        elif name == "contention":
            print(f"contention ({st['checkpointing']} checkpointing): tokens/s {st['tokens_per_s']}; vs solo "
                  f"{st['vs_solo']}; topology {st['topology']}")
        elif name == "checkpointing":
            print(f"{name} on 1 GPU (median of {st['rounds']}): "
                  + ", ".join(f"{k} {m['tokens_per_s']} tok/s (gc {m['gc_ms_per_step']} ms/step)"
                              for k, m in st["median"].items())
                  + f"; vs the first {st['vs_first']}; per round {st['tokens_per_s_per_round']}")
        elif name == "losses":
            print(f"losses: max rel diff {st['max_rel_diff']} (tol {LOSS_RTOL}), same rows {st['same_rows']}, "
                  f"replicas identical {st['replicas_identical']} -> {'PASS' if st['ok'] else 'FAIL'}")
        else:
            print(f"throughput {st['shape']} {st['per_gpu_micro_batch']}: 1 GPU {st['one_gpu']['tokens_per_s']} tok/s, "
                  f"2 GPUs {st['two_gpus']['tokens_per_s']} tok/s -> {st['speedup']}x (target {TARGET_SPEEDUP}x) "
                  f"{'PASS' if st['ok'] else 'FAIL'}; peak per GPU {st['two_gpus']['peak_reserved_gib']} GiB "
                  f"(planner {st['planner_peak_gib_per_gpu']})"
                  + (f"; losses max rel diff {st['losses']['max_rel_diff']}" if st["losses"] else ""))
    print(f"# wrote {out_json}")
    return 0 if all(st["ok"] for st in result["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
