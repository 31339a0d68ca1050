"""The user's path, side by side: nbtune.finetune vs Unsloth + TRL vs TRL + peft + bitsandbytes.

    python benchmarks/trainer.py                                   # rows "quick", every peer
    python benchmarks/trainer.py --rows main --steps 2:5 --time-budget 480
    python benchmarks/trainer.py --rows 'gsm8k-*,t4' --peers nbtune,unsloth
    python benchmarks/trainer.py --rows dpo --peers nbtune,unsloth,trl   # the DPO rows
    python benchmarks/trainer.py --rows grpo --peers nbtune,unsloth,trl  # the GRPO rows
    python benchmarks/trainer.py --list                            # rows and what they run
    python benchmarks/trainer.py --from-json                       # RESULTS.md from results/*.json, no GPU

benchmarks/models.py times bare training loops on random tokens; this times the trainers users
call, on real token counts: each (row, peer) runs in its own process (peers/trainer_nbtune.py,
peers/trainer_trl.py; settings and clock in peers/trainer_common.py), one after the other, on one
random-weight checkpoint built once (llama3-8b dimensions with SmolLM2's tokenizer and vocabulary:
trainer_data.py) and two data sets written once (``text``: plain-text rows of 1,024-2,048 tokens;
``gsm8k``: GSM8K conversations).

Rows: ``<text|gsm8k>-<batch>x<seq>-<bf16|fp16|fp32>-<packed|split|unpacked>`` and
``t4-<text|gsm8k>-<batch>x<seq>-<packed|split|unpacked>``: the T4 emulation (fp16, the allocator capped
at 14.3 GiB, SDPA's memory-efficient backend only). ``packed``: whole documents (nbtune's
``packing: true``, TRL's ``bfd``); ``split``: documents cut to fill every row (nbtune's ``packing:
split``, which keeps each piece's attention to itself; TRL's ``wrapped``, whose rows attend across
the documents in them). Aliases: ``main`` (both data sets, 2x2048 bf16 and 1x2048 fp16, packed and
unpacked), ``t4`` (both data sets, 1x4096 packed), ``quick`` (text 2x2048 bf16 packed, gsm8k 2x2048
bf16 unpacked: the two ends of fill), ``split`` (text 2x2048 bf16 and 1x2048 fp16, split), ``all``.
fp32 rows are for the CPU (the tests, with ``--model`` a tiny checkpoint).

DPO rows: ``dpo-gsm8k-<batch>x<seq>-<bf16|fp16|fp32>``, seq the longest prompt + reply sequence
(``max_length``): nbtune.finetune with ``train.method: dpo`` vs Unsloth's ``PatchDPOTrainer()`` +
TRL's DPOTrainer vs TRL's DPOTrainer + peft + bitsandbytes (peers/trainer_trl_dpo.py), beta 0.1,
the reference the policy with its fresh LoRA adapter (no second model), reference log-probs computed
each step (not precomputed), on GSM8K preference pairs of seq/2..seq tokens written once per seq
(trainer_data.py). Alias ``dpo`` (1x1024 and 2x1024 bf16, 1x2048 bf16, 1x1024 fp16); ``all`` stays
the SFT rows. A DPO step reads 2 x batch sequences (each pair's prompt + chosen and prompt +
rejected): its real tokens are theirs (the attention mask's sum), fill is over 2 x batch x seq, and
nbtune's line also carries the planner's prediction for that run (``plan_peak_gib``,
``plan_reserved_gib``: what ``nbtune plan`` / ``finetune(plan=True)`` says of the config) beside the
measured peak.

GRPO rows: ``grpo-gsm8k-<batch>x<seq>-<bf16|fp16|fp32>``, batch the prompts per optimizer step (each
sampled 4 times: batch x 4 completions per step, one generation per step), seq the prompt +
completion budget: ``max_completion_length`` = seq/2, prompts of at most seq/2 tokens. nbtune.finetune
with ``train.method: grpo`` (``train.batch_size`` = batch x 4, nbtune's batch counting completions)
vs Unsloth's ``PatchFastRL("GRPO", FastLanguageModel)`` + TRL's GRPOTrainer (FastLanguageModel with
``fast_inference=False``) vs TRL's GRPOTrainer + peft + bitsandbytes (peers/trainer_trl_grpo.py):
every one generating with the model's own ``generate`` and KV cache (no vLLM), temperature 1.0,
beta 0.0 (no KL term: TRL's and nbtune's default), TRL's default loss, reward the GSM8K
final-number match (nbtune's built-in ``correctness``; the TRL peers' plain copy of it), on GSM8K
prompts (question + nbtune's instruction to end with ``#### <number>``) written once per seq
(trainer_data.py). Random weights score 0 and their completions run to the length limit: the rows
measure speed and memory. Alias ``grpo`` (1x512 and 2x512 bf16, 1x512 fp16: 256-token
completions). A step's tokens are the prompt + completion tokens the trainer counts as it generates
(fill over batch x 4 x seq); the sampling is timed apart, from an idle device to the completions on
the host (nbtune's own metrics, a wrapper around the TRL trainers' ``_generate_single_turn``), and
reported as generation tokens/s (completion tokens per second of generation), generation's share of
the step and the mean completion length. nbtune's line carries the planner's prediction with its
terms (``plan_terms``, GRPO's ``generation`` among them).

Per run: real (non-padding) tokens/s, median seconds per step after the warm-up, fill (real tokens
per step / (batch x seq)), peak reserved GiB during training, and what went wrong. A peer that cannot
run here (e.g. unsloth not importable) is reported as skipped with the reason; a job the time budget
does not reach, as not reached. Output: <out-dir>/trainer-<date>-<time>.json (rewritten after every
job), .md (this run's table) and .log (the peers' output); RESULTS.md regenerated, led by the latest
trainer-path table. Every job loads the 4-bit model afresh; with ``--time-budget`` (gpu_suite.sh passes
what is left of its own) a job that would start too late is reported as not reached, so a budget
holds whatever the rows: ``--rows`` and ``--steps`` choose what a budget covers.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import glob
import importlib.util
import json
import os
import re
import signal
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [HERE, os.path.join(HERE, "peers")]
import trainer_report as report  # noqa: E402
from trainer_data import (AssetsMissing, checkpoint_name, preference_name, prompt_name, resolve_assets,  # noqa: E402
                          write_data, write_preference_data, write_prompt_data)


def _load_models():
    """benchmarks/models.py under a private name (its process and metadata helpers are shared)."""
    name = "nbtune_bench_models"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, "models.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


models = _load_models()

RESULTS_DIR = os.path.join(HERE, "results")
RESULTS_MD = os.path.join(HERE, "RESULTS.md")
PEERS_DIR = os.path.join(HERE, "peers")
PEERS = {  # name -> command (after the interpreter), modules it needs
    "nbtune": dict(cmd=[os.path.join(PEERS_DIR, "trainer_nbtune.py")],
                   needs=["torch", "nbtune", "trl", "bitsandbytes"]),
    "unsloth": dict(cmd=[os.path.join(PEERS_DIR, "trainer_trl.py"), "--peer", "unsloth"],
                    needs=["torch", "unsloth", "trl", "bitsandbytes"]),
    "trl": dict(cmd=[os.path.join(PEERS_DIR, "trainer_trl.py"), "--peer", "trl"],
                needs=["torch", "trl", "peft", "bitsandbytes"]),
}
DPO_CMD = {  # the DPO rows' commands (the peers' environments and needs are the same)
    "nbtune": [os.path.join(PEERS_DIR, "trainer_nbtune.py"), "--method", "dpo"],
    "unsloth": [os.path.join(PEERS_DIR, "trainer_trl_dpo.py"), "--peer", "unsloth"],
    "trl": [os.path.join(PEERS_DIR, "trainer_trl_dpo.py"), "--peer", "trl"],
}
GRPO_CMD = {  # the GRPO rows' commands (the same environments and needs again)
    "nbtune": [os.path.join(PEERS_DIR, "trainer_nbtune.py"), "--method", "grpo"],
    "unsloth": [os.path.join(PEERS_DIR, "trainer_trl_grpo.py"), "--peer", "unsloth"],
    "trl": [os.path.join(PEERS_DIR, "trainer_trl_grpo.py"), "--peer", "trl"],
}
METHOD_CMD = {"dpo": DPO_CMD, "grpo": GRPO_CMD}
METHOD_DATASETS = {"dpo": ("gsm8k",), "grpo": ("gsm8k",)}
DATASETS = ("text", "gsm8k")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
SHORT = {v: k for k, v in DTYPES.items()}
T4_CAP_GIB = 14.3
T4_SDPA = "efficient"
MAIN_ROWS = [f"{d}-{shape}-{p}" for d in DATASETS for shape in ("2x2048-bf16", "1x2048-fp16")
             for p in ("packed", "unpacked")]
T4_ROWS = [f"t4-{d}-1x4096-packed" for d in DATASETS]
DPO_ROWS = ["dpo-gsm8k-1x1024-bf16", "dpo-gsm8k-2x1024-bf16", "dpo-gsm8k-1x2048-bf16", "dpo-gsm8k-1x1024-fp16"]
GRPO_ROWS = ["grpo-gsm8k-1x512-bf16", "grpo-gsm8k-2x512-bf16", "grpo-gsm8k-1x512-fp16"]
SPLIT_ROWS = ["text-2x2048-bf16-split", "text-1x2048-fp16-split"]
ALIASES = {"main": MAIN_ROWS, "t4": T4_ROWS, "all": MAIN_ROWS + T4_ROWS,
           "quick": ["text-2x2048-bf16-packed", "gsm8k-2x2048-bf16-unpacked"], "dpo": DPO_ROWS, "grpo": GRPO_ROWS,
           "split": SPLIT_ROWS}
KNOWN_ROWS = MAIN_ROWS + T4_ROWS + DPO_ROWS + GRPO_ROWS + SPLIT_ROWS  # what globs match


@dataclasses.dataclass
class Row:
    id: str
    data: str
    batch: int
    seq: int
    dtype: str  # torch attribute name
    packing: bool
    t4: bool = False
    method: str = "sft"
    split: bool = False  # packing "split": documents cut to fill every row (TRL: "wrapped")

    def label(self) -> str:
        if self.method in METHOD_CMD:
            return f"{self.method.upper()} {self.data} {self.batch}×{self.seq} {SHORT[self.dtype]}"
        packing = ("packed, split" if self.split else "packed") if self.packing else "unpacked"
        text = f"{self.data} {self.batch}×{self.seq} {SHORT[self.dtype]} {packing}"
        return f"T4 emulation: {text}" if self.t4 else text

    @property
    def data_key(self) -> str:
        """The data set this row trains on (trainer_data's names: write_data's, write_preference_data's,
        write_prompt_data's)."""
        if self.method == "dpo":
            return preference_name(self.seq)
        if self.method == "grpo":
            return prompt_name(self.seq)
        return self.data

    @property
    def same_batches(self) -> bool:
        """Whether every peer's steps read the same sequences: not where each tool packs its own way
        (packed rows) or samples its own completions (GRPO rows)."""
        return not self.packing and self.method != "grpo"

    def record(self) -> dict:
        return dict(dataclasses.asdict(self), label=self.label(), results={})


_ROW_RE = re.compile(r"^(?P<t4>t4-)?(?P<data>[a-z0-9]+)-(?P<batch>\d+)x(?P<seq>\d+)(?:-(?P<dtype>bf16|fp16|fp32))?"
                     r"-(?P<packing>packed|split|unpacked)$")


_METHOD_RE = re.compile(r"^(?P<method>dpo|grpo)-(?P<data>[a-z0-9]+)-(?P<batch>\d+)x(?P<seq>\d+)"
                        r"(?:-(?P<dtype>bf16|fp16|fp32))?$")
_METHOD_SHAPE = {"dpo": "seq: the longest prompt + reply; pairs are never packed",
                 "grpo": "batch: prompts per step, 4 completions each; seq: prompt + completion budget, "
                         "completions up to seq/2; nothing is packed"}
_MIN_SEQ = {"dpo": 2, "grpo": 4}


def parse_method_row(row_id: str) -> Row:
    """A DPO or GRPO row: ``<dpo|grpo>-<data>-<batch>x<seq>-<dtype>``."""
    method = row_id.strip().split("-", 1)[0]
    m = _METHOD_RE.match(row_id.strip())
    if not m:
        raise ValueError(f"row {row_id!r}: expected {method}-<{'|'.join(METHOD_DATASETS[method])}>-<batch>x<seq>-"
                         f"<bf16|fp16|fp32> ({_METHOD_SHAPE[method]})")
    if m["data"] not in METHOD_DATASETS[method]:
        raise ValueError(f"row {row_id!r}: {method.upper()} data {m['data']!r} is not one of "
                         f"{', '.join(METHOD_DATASETS[method])}")
    if m["dtype"] is None:
        raise ValueError(f"row {row_id!r}: give the dtype (bf16, fp16 or fp32) after the shape")
    batch, seq = int(m["batch"]), int(m["seq"])
    if batch < 1 or seq < _MIN_SEQ[method]:
        raise ValueError(f"row {row_id!r}: batch >= 1 and seq >= {_MIN_SEQ[method]}")
    dtype = DTYPES[m["dtype"]]
    return Row(f"{method}-{m['data']}-{batch}x{seq}-{m['dtype']}", m["data"], batch, seq, dtype, False, method=method)


def parse_row(row_id: str) -> Row:
    if row_id.strip().split("-", 1)[0] in METHOD_CMD:
        return parse_method_row(row_id)
    m = _ROW_RE.match(row_id.strip())
    if not m:
        raise ValueError(f"row {row_id!r}: expected <text|gsm8k>-<batch>x<seq>-<bf16|fp16|fp32>-<packed|unpacked> "
                         "or t4-<text|gsm8k>-<batch>x<seq>-<packed|unpacked>")
    if m["data"] not in DATASETS:
        raise ValueError(f"row {row_id!r}: data {m['data']!r} is not one of {', '.join(DATASETS)}")
    t4 = bool(m["t4"])
    if t4 and m["dtype"] not in (None, "fp16"):
        raise ValueError(f"row {row_id!r}: the T4 emulation is fp16; write t4-{m['data']}-{m['batch']}x{m['seq']}-"
                         f"{m['packing']}")
    if not t4 and m["dtype"] is None:
        raise ValueError(f"row {row_id!r}: give the dtype (bf16, fp16 or fp32) before {m['packing']!r}")
    batch, seq = int(m["batch"]), int(m["seq"])
    if batch < 1 or seq < 2:
        raise ValueError(f"row {row_id!r}: batch >= 1 and seq >= 2")
    dtype = "float16" if t4 else DTYPES[m["dtype"]]
    packing = m["packing"] in ("packed", "split")
    canonical = (f"t4-{m['data']}-{batch}x{seq}-{m['packing']}" if t4
                 else f"{m['data']}-{batch}x{seq}-{SHORT[dtype]}-{m['packing']}")
    return Row(canonical, m["data"], batch, seq, dtype, packing, t4, split=m["packing"] == "split")


def select_rows(text: str) -> list[Row]:
    """Comma-separated row ids, aliases (main, t4, quick, all, dpo, grpo, split) and globs over the known rows."""
    return models.select_rows(text, ALIASES, parse_row, known=KNOWN_ROWS)


def parse_peers(text: str) -> list[str]:
    return models.parse_peers(text, PEERS)


def parse_steps(text: str) -> tuple[int, int]:
    return models.parse_steps(text, example="2:5")


def parse_range(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+):(\d+)", text.strip())
    if not m or not 2 <= int(m[1]) <= int(m[2]):
        raise argparse.ArgumentTypeError(f"expected LO:HI tokens with 2 <= LO <= HI (e.g. 1024:2048), got {text!r}")
    return int(m[1]), int(m[2])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="quick",
                    help="row ids, aliases (main, t4, quick, all, dpo, grpo, split) or globs, comma-separated")
    ap.add_argument("--peers", default="nbtune,unsloth,trl", help="which peers, in run order (nbtune, unsloth, trl)")
    ap.add_argument("--steps", type=parse_steps, default=(2, 5), metavar="W:S",
                    help="warm-up steps (left out) and timed steps per job (default 2:5)")
    ap.add_argument("--time-budget", type=float, default=0,
                    help="seconds for the whole run (0: none); jobs that would start after it are reported as "
                         "not reached")
    ap.add_argument("--row-timeout", type=float, default=300, help="seconds one peer process may take")
    ap.add_argument("--min-job-s", type=float, default=45,
                    help="do not start a peer process with less than this (or 0.8x that peer's last time) left")
    ap.add_argument("--model", default="", help="a checkpoint folder with its tokenizer (default: build llama3-8b "
                                                "dimensions with the tokenizer's vocabulary under --ckpt-root)")
    ap.add_argument("--shape", default="llama3-8b", help="dimensions of the checkpoint built (peers/bench_common.py)")
    ap.add_argument("--assets", default="", help="folder made by `trainer_data.py export` (tokenizer + GSM8K); "
                                                 "default: nbtune's own copies")
    ap.add_argument("--text-rows", type=int, default=96, help="plain-text rows written")
    ap.add_argument("--text-tokens", type=parse_range, default=(1024, 2048), metavar="LO:HI",
                    help="tokens per plain-text row (uniform)")
    ap.add_argument("--chat-rows", type=int, default=0, help="GSM8K conversations written (0: all)")
    ap.add_argument("--dpo-rows", type=int, default=64, help="preference pairs written per DPO sequence length")
    ap.add_argument("--grpo-rows", type=int, default=64, help="GSM8K prompts written per GRPO sequence budget")
    ap.add_argument("--t4-cap-gib", type=float, default=T4_CAP_GIB)
    ap.add_argument("--t4-sdpa", default=T4_SDPA, help="the SDPA backend allowed in t4 rows")
    ap.add_argument("--ckpt-root", default=os.environ.get("CKPT_ROOT", "/tmp/ckpt"))
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "nbtune-trainer-work"),
                    help="where the data and the runs' output folders go")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the peer processes")
    ap.add_argument("--peer-site", default=os.environ.get("NBTUNE_BENCH_PEER_SITE", ""),
                    help="path(s) put first on PYTHONPATH for the unsloth process only")
    ap.add_argument("--out-dir", default=RESULTS_DIR, help="where trainer-<date>.{json,md,log} go")
    ap.add_argument("--markdown", default=RESULTS_MD, help="RESULTS.md to regenerate ('' for none)")
    ap.add_argument("--tag", default="", help="a note stored in the run's meta")
    ap.add_argument("--from-json", nargs="*", metavar="JSON", default=None,
                    help="only regenerate RESULTS.md (and print the summaries) from these trainer result files "
                         "(none given: out-dir/trainer-*.json)")
    ap.add_argument("--list", action="store_true", help="print the rows and exit")
    return ap


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------
def peer_available(peer: str, args) -> str | None:
    """None if the peer's modules can be found in its own environment, else why not."""
    code = ("import importlib.util, json, sys\n"
            "def found(m):\n"
            "    try:\n        return importlib.util.find_spec(m) is not None\n"
            "    except Exception:\n        return False\n"
            "print(json.dumps([m for m in sys.argv[1:] if not found(m)]))")
    rc, out, err, _ = models.run_process([args.python, "-c", code, *PEERS[peer]["needs"]],
                                         models.peer_env(peer, args), timeout=120, cwd=REPO)
    if rc != 0:
        return f"availability check failed: {models._last_error_line(err)}"
    try:
        missing = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return f"availability check printed {out.strip()[:200]!r}"
    return f"not importable: {', '.join(missing)}" if missing else None


def parse_lines(stdout: str) -> list[dict]:
    lines = []
    for text in stdout.splitlines():
        text = text.strip()
        if text.startswith("{"):
            try:
                obj = json.loads(text)
            except ValueError:
                continue
            if isinstance(obj, dict) and "peer" in obj:
                lines.append(obj)
    return lines


def classify(rc, lines: list[dict], stderr: str, timed_out: bool, seconds: float) -> dict:
    """status (ok | oom | error | timeout), detail and the result line of one peer process."""
    line = lines[-1] if lines else None
    if line and "tokens_per_s" in line:
        return dict(status="ok", detail="", line=line)
    if line and str(line.get("error", "")).upper() == "OOM":
        return dict(status="oom", detail=line.get("detail", ""), line=line)
    if timed_out:
        return dict(status="timeout", detail=f"killed after {seconds:.0f} s", line=line)
    if line and line.get("error"):
        return dict(status="error", detail=f"{line['error']}: {line.get('detail', '')}", line=line)
    if rc != 0 and models._OOM_RE.search(stderr or ""):
        return dict(status="oom", detail="out of memory outside the peer's handler: " + models._last_error_line(stderr),
                    line=line)
    return dict(status="error", detail=(f"exit {rc}: " if rc else "no result line: ") + models._last_error_line(stderr),
                line=line)


def row_checks(results: dict, own_batches: bool = False) -> dict:
    """Per peer against nbtune, on rows whose batches are the same for every peer: whether its steps
    saw the same token counts (same rows in the same order), and how far its first loss is (same
    weights and first batch: the same loss up to 4-bit and summation-order rounding). Rows where
    each peer makes its own batches (``own_batches``: packed rows, where each tool packs its own way,
    nbtune best-fit decreasing over the whole set, TRL its own; GRPO rows, where each samples its own
    completions) have no such check."""
    def line(peer):
        job = results.get(peer) or {}
        return (job.get("line") or {}) if job.get("status") == "ok" else {}

    ref = line("nbtune")
    same, diff = {}, {}
    for peer in results:
        other = line(peer)
        if own_batches or peer == "nbtune" or not ref or not other:
            continue
        if ref.get("tokens_each") and other.get("tokens_each"):
            same[peer] = ref["tokens_each"] == other["tokens_each"]
        if ref.get("first_loss") is not None and other.get("first_loss") is not None:
            diff[peer] = round(abs(ref["first_loss"] - other["first_loss"]), 6)
    return dict(same_tokens=same, first_loss_diff=diff)


class Runner:
    def __init__(self, args, rows: list[Row], peers: list[str]):
        self.args, self.rows, self.peers = args, rows, peers
        self.start = time.time()
        self.deadline = self.start + args.time_budget if args.time_budget > 0 else None
        self.last_seconds: dict[str, float] = {}
        self.unavailable: dict[str, str] = {}
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        os.makedirs(args.out_dir, exist_ok=True)
        self.stamp = stamp
        self.json_path = os.path.join(args.out_dir, f"trainer-{stamp}.json")
        self.md_path = os.path.join(args.out_dir, f"trainer-{stamp}.md")
        self.log_path = os.path.join(args.out_dir, f"trainer-{stamp}.log")
        self.doc = dict(meta=dict(started=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                  argv=sys.argv[1:], peers=peers, rows=[r.id for r in rows],
                                  steps=list(args.steps), time_budget_s=args.time_budget,
                                  row_timeout_s=args.row_timeout, tag=args.tag,
                                  t4=dict(cap_gib=args.t4_cap_gib, sdpa=args.t4_sdpa)),
                        rows=[])
        self.model = ""
        self.data: dict = {}

    def remaining(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.time()

    def say(self, text: str) -> None:
        print(f"[{time.time() - self.start:6.0f}s] {text}", flush=True)

    def save(self) -> None:
        self.doc["meta"]["elapsed_s"] = round(time.time() - self.start, 1)
        tmp = self.json_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.doc, f, indent=1)
        os.replace(tmp, self.json_path)
        with open(self.md_path, "w") as f:
            f.write(report.run_markdown(self.doc, self.stamp))

    def log(self, text: str) -> None:
        with open(self.log_path, "a") as f:
            f.write(text if text.endswith("\n") else text + "\n")

    # -- inputs
    def prepare(self) -> None:
        """The data sets and the checkpoint, once for every job; a failure is the run's error."""
        args = self.args
        tokenizer_dir, gsm8k = resolve_assets(args.assets or None)
        self.say(f"writing the data (tokenizer {tokenizer_dir}, GSM8K {gsm8k}) under {args.work}")
        self.data = write_data(args.work, tokenizer_dir, gsm8k, args.text_rows, *args.text_tokens,
                               chat_rows=args.chat_rows or None)
        for seq in sorted({r.seq for r in self.rows if r.method == "dpo"}):
            self.data[preference_name(seq)] = write_preference_data(args.work, tokenizer_dir, gsm8k, seq,
                                                                    args.dpo_rows)
        for seq in sorted({r.seq for r in self.rows if r.method == "grpo"}):
            self.data[prompt_name(seq)] = write_prompt_data(args.work, tokenizer_dir, gsm8k, seq, args.grpo_rows)
        self.doc["meta"]["data"] = {k: v for k, v in self.data.items()}
        if args.model:
            self.model = args.model
        else:
            vocab = self.data["tokenizer"]["vocab"]
            self.model = os.path.join(args.ckpt_root, checkpoint_name(args.shape, vocab))
            if not os.path.isfile(os.path.join(self.model, "tokenizer.json")):
                self.say(f"building {args.shape} with a {vocab:,}-token vocabulary at {self.model}")
                t0 = time.time()
                rc, out, err, _ = models.run_process(
                    [args.python, os.path.join(HERE, "trainer_data.py"), "checkpoint", self.model,
                     "--tokenizer", tokenizer_dir, "--shape", args.shape],
                    models.peer_env("trl", args), timeout=max(min(self.remaining(), 900), 60), cwd=REPO)
                self.log(f"===== checkpoint rc={rc} {time.time() - t0:.0f}s\n{out}{err}")
                self.doc["meta"]["build_s"] = round(time.time() - t0, 1)
                if rc != 0:
                    raise RuntimeError(f"checkpoint build failed (rc={rc}): {models._last_error_line(err)}")
        self.doc["meta"]["model"] = dict(path=self.model, shape=None if args.model else args.shape)

    # -- one job
    def run_job(self, row: Row, peer: str) -> dict:
        job = dict(peer=peer, status="pending", detail="", seconds=0.0, line=None)
        if peer in self.unavailable:
            return dict(job, status="skipped", detail=self.unavailable[peer])
        left = self.remaining()
        need = max(self.args.min_job_s, 0.8 * self.last_seconds.get(peer, 0))
        if left < need:
            return dict(job, status="not_reached",
                        detail=f"time budget: {max(left, 0):.0f} s left, ~{need:.0f} s needed")
        timeout = min(self.args.row_timeout, left)
        out_dir = os.path.join(self.args.work, "runs", f"{row.id}-{peer}")
        warmup, steps = self.args.steps
        peer_cmd = METHOD_CMD[row.method][peer] if row.method in METHOD_CMD else PEERS[peer]["cmd"]
        cmd = [self.args.python, *peer_cmd, "--model", self.model, "--data", self.data[row.data_key]["path"],
               "--row", row.id, "--batch", str(row.batch), "--seq", str(row.seq), "--dtype", row.dtype,
               "--warmup", str(warmup), "--steps", str(steps), "--out", out_dir]
        if row.packing:
            cmd += ["--packing"] + (["--packing-strategy", "split"] if row.split else [])
        env = {"MEM_CAP_GIB": str(self.args.t4_cap_gib), "NBTUNE_BENCH_SDPA": self.args.t4_sdpa} if row.t4 else {}
        cwd = REPO
        if peer == "unsloth":  # unsloth writes unsloth_compiled_cache/ into its working directory
            cwd = os.path.join(tempfile.gettempdir(), "nbtune-bench-unsloth")
            os.makedirs(cwd, exist_ok=True)
        self.say(f"{row.id} · {peer}" + (f" ({' '.join(f'{k}={v}' for k, v in env.items())})" if env else ""))
        t0 = time.time()
        rc, out, err, timed_out = models.run_process(cmd, models.peer_env(peer, self.args, env), timeout, cwd=cwd)
        seconds = round(time.time() - t0, 1)
        self.last_seconds[peer] = seconds
        job.update(classify(rc, parse_lines(out), err, timed_out, seconds), seconds=seconds, env=env)
        if timed_out and timeout < self.args.row_timeout:
            job["detail"] += " (time budget)"
        sdpa = models.parse_output("", err)[1]
        if sdpa:
            job["sdpa"] = sdpa
        if job["status"] != "ok":
            job["stderr_tail"] = "\n".join(err.splitlines()[-40:])
        self.log(f"===== {row.id} · {peer} · rc={rc} · {seconds}s · {job['status']}\n$ {' '.join(cmd)}\n"
                 f"--- stdout\n{out}--- stderr\n{err}")
        line = job.get("line") or {}
        brief = job["detail"]
        if job["status"] == "ok":
            brief = (f"{line['tokens_per_s']:,} real tok/s · {line['s_per_step']} s/step · fill {line['fill']} · "
                     f"{line.get('peak_reserved_gib')} GiB")
            if line.get("generation_tokens_per_s") is not None:
                brief += (f" · generation {line['generation_tokens_per_s']:,} tok/s "
                          f"({100 * line['generation_share']:.0f}% of the step)")
            if line.get("plan_reserved_gib") is not None:
                brief += f" (planned {line['plan_reserved_gib']} GiB reserved)"
        self.say(f"  -> {job['status']} in {seconds:.0f}s {brief}")
        return job

    def run(self) -> dict:
        self.doc["meta"].update(models.collect_meta(self.args, self.peers))
        for peer in self.peers:
            why = peer_available(peer, self.args)
            if why:
                self.unavailable[peer] = why
                print(f"# peer {peer} skipped: {why}", flush=True)
        self.doc["meta"]["unavailable"] = dict(self.unavailable)
        self.save()
        try:
            self.prepare()
        except (AssetsMissing, RuntimeError, ValueError, OSError) as exc:
            self.doc["meta"]["error"] = str(exc)
            print(f"# trainer benchmark not run: {exc}", flush=True)
            for row in self.rows:
                rec = row.record()
                rec["results"] = {p: dict(peer=p, status="not_reached", detail="no data or checkpoint", line=None)
                                  for p in self.peers}
                self.doc["rows"].append(rec)
            self.save()
            return self.doc
        try:
            for row in self.rows:
                rec = row.record()
                self.doc["rows"].append(rec)
                for peer in self.peers:
                    rec["results"][peer] = dict(peer=peer, status="pending", line=None)
                for peer in self.peers:
                    rec["results"][peer] = self.run_job(row, peer)
                    rec["checks"] = row_checks(rec["results"], not row.same_batches)
                    self.save()
        except (models.Terminated, KeyboardInterrupt):
            print("# stopped from outside (SIGTERM/interrupt): results so far are kept", flush=True)
            self.doc["meta"]["terminated"] = True
            done = {rec["id"] for rec in self.doc["rows"]}
            for row in self.rows:
                if row.id not in done:
                    self.doc["rows"].append(row.record())
            for rec in self.doc["rows"]:
                for peer in self.peers:
                    job = rec["results"].setdefault(peer, dict(peer=peer, line=None))
                    if job.get("status", "pending") == "pending":
                        job.update(status="not_reached", detail="driver stopped")
        self.doc["meta"]["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self.save()
        return self.doc


def write_results_md(out_dir: str, md_path: str, trainer_paths: list[str] | None = None) -> None:
    """RESULTS.md as benchmarks/models.py writes it (its runs in out_dir), led by the trainer table."""
    model_paths = sorted(glob.glob(os.path.join(out_dir, "models-*.json")))
    if trainer_paths is None:
        trainer_paths = sorted(glob.glob(os.path.join(out_dir, "trainer-*.json")))
    models.write_markdown(model_paths, md_path, trainer_paths=trainer_paths)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_json is not None:
        paths = args.from_json or sorted(glob.glob(os.path.join(args.out_dir, "trainer-*.json")))
        if args.markdown:
            write_results_md(args.out_dir, args.markdown, paths)
            print(f"wrote {args.markdown} led by {len(paths)} trainer result file(s)")
        for path, doc in report.load_docs(paths):
            print(f"# {path}")
            print(report.summary_text(doc))
        return 0
    try:
        rows = select_rows(args.rows)
        peers = parse_peers(args.peers)
    except ValueError as exc:
        print(f"trainer.py: {exc}", file=sys.stderr)
        return 2
    if args.list:
        w, s = args.steps
        for row in rows:
            extra = f" (MEM_CAP_GIB={args.t4_cap_gib} NBTUNE_BENCH_SDPA={args.t4_sdpa})" if row.t4 else ""
            print(f"{row.id:<28} {row.label()}: {','.join(peers)}, {w} warm-up + {s} timed steps{extra}")
        return 0
    signal.signal(signal.SIGTERM, models._on_sigterm)
    runner = Runner(args, rows, peers)
    doc = runner.run()
    if args.markdown:
        write_results_md(args.out_dir, args.markdown)
    print(report.summary_text(doc))
    print(f"# results: {runner.json_path}  table: {runner.md_path}  log: {runner.log_path}"
          + (f"  markdown: {args.markdown}" if args.markdown else ""))
    if doc["meta"].get("error"):
        return 1
    broken = [f"{rec['id']}·nbtune" for rec in doc["rows"]
              if (rec["results"].get("nbtune") or {}).get("status") in ("error", "timeout")]
    if broken:
        print(f"# nbtune FAILED in: {', '.join(broken)}")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
