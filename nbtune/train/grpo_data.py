"""Prompt rows for GRPO (``train.method: grpo``): a prompt, and the answer the rewards check against.

A row holds ``prompt`` and, optionally, ``answer`` (other names through ``data.columns``, e.g.
``columns: {prompt: problem, answer: solution}``). Rows with ``question`` and no ``prompt`` (GSM8K,
question / answer sets) read ``question`` as the prompt, so ``data: gsm8k`` works as it is. The
prompt is either

- plain text: one user turn; or
- chat form: a list of {role, content} turns (``from`` / ``value`` too, as for SFT) ending with a
  user (or tool) turn: the completion is the assistant's reply to it.

``data.system_prompt`` is put first when the prompt has no system turn. On the embedded GSM8K
without a ``data.system_prompt``, each question is followed by :data:`GSM8K_INSTRUCTION`, which
asks for the final line the built-in rewards read (``#### <number>``; nbtune/train/rewards.py).
The answer is text or a number (kept as text); the ``correctness`` reward needs it on every row.

The prompts stay chat messages (TRL renders them with the tokenizer's chat template, the one
``data.chat_template`` chose, when it generates); here they are rendered once to count their
tokens. A prompt is dropped, and counted, when it is empty or when it and
``grpo.max_completion_length`` do not fit ``model.max_seq_length``. Held-out prompts are chosen as
for SFT; without ``data.eval_rows`` at most :data:`DEFAULT_EVAL_PROMPTS` of them are scored (each
costs ``num_generations`` completions, before and after training).
"""
from __future__ import annotations

import dataclasses
import functools

from .config import Config
from .data import DataError, TokenizedData, _normalize_turn, split_rows

GSM8K_INSTRUCTION = ("Solve the problem step by step, then give the final answer on a last line of the form "
                     "'#### <number>'.")
EMBEDDED_WITH_INSTRUCTION = ("gsm8k",)
# held-out prompts scored before and after training when data.eval_rows is unset: each one costs
# num_generations completions of up to max_completion_length tokens, not one forward as for SFT
DEFAULT_EVAL_PROMPTS = 32


@dataclasses.dataclass
class PromptData(TokenizedData):
    """:class:`TokenizedData` of prompt rows: ``train`` / ``eval`` hold ``prompt`` (chat messages) and
    ``answer`` (when the rows have one); ``prompt_tokens`` the train prompts' lengths in tokens."""

    prompt_tokens: list = dataclasses.field(default_factory=list)


def prompt_column(columns, where: str) -> str:
    """The column read as the prompt: ``prompt``, else ``question``; a :class:`DataError` naming the
    columns found and the fix when there is neither."""
    cols = set(columns)
    for name in ("prompt", "question"):
        if name in cols:
            return name
    raise DataError(
        f"{where}: train.method grpo reads prompt rows with a 'prompt' column (and an 'answer' column for the "
        f"correctness reward); these rows have {sorted(columns)}. Name your columns in data.columns (e.g. "
        "columns: {prompt: problem, answer: solution}), or train with train.method: sft on conversations.")


def to_prompt(row: dict, column: str, where: str, system_prompt: str | None = None,
              instruction: str | None = None) -> tuple[list[dict], str | None]:
    """One row -> (prompt turns, answer text or None), or a :class:`DataError` naming the row and the field."""
    value = row.get(column)
    if value is None:
        raise DataError(f"{where}: missing column {column!r} (a grpo row needs a prompt)")
    if isinstance(value, str):
        turns = [{"role": "user", "content": value}]
    elif isinstance(value, (list, dict)):
        value = [value] if isinstance(value, dict) else value
        if not value:
            raise DataError(f"{where}: column {column!r} is an empty list of turns")
        turns = [_normalize_turn(t, f"{where} column {column!r}", i) for i, t in enumerate(value)]
    else:
        raise DataError(f"{where}: column {column!r} must be text or a list of {{role, content}} turns, got "
                        f"{type(value).__name__}")
    if turns[-1]["role"] == "assistant":
        raise DataError(f"{where}: column {column!r} ends with an assistant turn; the prompt ends where the model's "
                        "completion starts (with a user turn): drop the last turn, or train it with train.method: sft")
    if instruction and turns[-1]["role"] == "user":
        turns[-1] = {"role": "user", "content": f"{turns[-1]['content']}\n\n{instruction}"}
    if system_prompt and turns[0]["role"] != "system":
        turns = [{"role": "system", "content": system_prompt}, *turns]
    answer = row.get("answer")
    if answer is not None and (isinstance(answer, bool) or not isinstance(answer, (str, int, float))):
        raise DataError(f"{where}: column 'answer' must be text or a number, got {type(answer).__name__}")
    return turns, None if answer is None else str(answer)


def _instruction(cfg: Config) -> str | None:
    if cfg.data.system_prompt is None and cfg.data.source in EMBEDDED_WITH_INSTRUCTION:
        return GSM8K_INSTRUCTION
    return None


def _needs_answer(cfg: Config) -> list[str]:
    from .rewards import NEEDS_ANSWER

    return [name for name in cfg.grpo.rewards if name in NEEDS_ANSWER]


def parse_rows(rows: list[dict], cfg: Config, where: str) -> tuple[list[list[dict]], list[str | None]]:
    """Every row's (prompt turns, answer), checking the columns the rewards need."""
    if not rows:
        raise DataError(f"{where}: no rows")
    column = prompt_column(rows[0].keys(), where)
    needs = _needs_answer(cfg)
    prompts, answers = [], []
    for n, row in enumerate(rows, 1):
        turns, answer = to_prompt(row, column, f"{where} row {n}", cfg.data.system_prompt, _instruction(cfg))
        if answer is None and needs:
            raise DataError(f"{where} row {n}: no 'answer', which the {needs[0]!r} reward in grpo.rewards checks the "
                            "completions against; give every row an answer (or name its column in data.columns, "
                            "e.g. columns: {answer: solution}), or drop that reward from grpo.rewards")
        prompts.append(turns)
        answers.append(answer)
    return prompts, answers


def check_rows(rows: list[dict], cfg: Config, where: str) -> None:
    """Every row parses into a prompt (the cheap check before a run loads anything)."""
    parse_rows(rows, cfg, where)


def prompt_ids(turns, tokenizer) -> list[int]:
    """The prompt's tokens as the model sees them: rendered with the chat template and the generation prompt."""
    text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_prompts(rows, tokenizer, cfg: Config, where: str):
    """Rows -> a datasets.Dataset(prompt[, answer]), the kept prompts' token counts, and dropped prompts by reason."""
    import datasets

    prompts, answers = parse_rows(rows, cfg, where)
    room = cfg.model.max_seq_length - cfg.grpo.max_completion_length
    kept, kept_answers, lengths, dropped = [], [], [], {}

    def drop(reason):
        dropped[reason] = dropped.get(reason, 0) + 1

    for turns, answer in zip(prompts, answers):
        if not any(t["content"].strip() for t in turns if t["role"] != "system"):
            drop("empty prompt")
            continue
        length = len(prompt_ids(turns, tokenizer))
        if length > room:
            drop(f"prompt over max_seq_length - max_completion_length = {room} tokens")
            continue
        kept.append(turns)
        kept_answers.append(answer)
        lengths.append(length)
    if not kept:
        raise DataError(f"{where}: all {len(prompts)} prompts were dropped ("
                        + ", ".join(f"{c} {r}" for r, c in dropped.items()) + "); raise model.max_seq_length or lower "
                        "grpo.max_completion_length, or check the data")
    columns = {"prompt": kept}
    if any(a is not None for a in kept_answers):
        columns["answer"] = kept_answers
    return datasets.Dataset.from_dict(columns), lengths, dropped


def prompts_per_step(cfg: Config, world: int = 1) -> int:
    """Prompts in one optimizer step: batch_size x grad_accum x processes completions, num_generations per prompt."""
    return cfg.train.batch_size * cfg.train.grad_accum * world // cfg.grpo.num_generations


def prepare_grpo_data(cfg: Config, tokenizer, world: int = 1) -> PromptData:
    """The train (and held-out) prompts; the held-out prompts are chosen as for SFT
    (:func:`nbtune.train.data.split_rows`: an embedded set's test split, 5% of a local file)."""
    splits = split_rows(cfg.data)
    train, lengths, dropped = tokenize_prompts(splits.train, tokenizer, cfg, splits.where)
    per_step = prompts_per_step(cfg, world)
    if train.num_rows < per_step:
        raise DataError(f"{splits.where}: {train.num_rows} prompts, but one step takes {per_step} (train.batch_size x "
                        f"grad_accum{' x GPUs' if world > 1 else ''} / grpo.num_generations); lower train.batch_size "
                        "or train.grad_accum, or give more rows")
    held_out, note = None, splits.eval_note
    if splits.held_out is not None:
        rows = splits.held_out
        if cfg.data.eval_rows is None and len(rows) > DEFAULT_EVAL_PROMPTS:
            rows = rows[:DEFAULT_EVAL_PROMPTS]
            note = ((note + "; ") if note else "") + (
                f"data.eval_rows unset: {DEFAULT_EVAL_PROMPTS} of the {len(splits.held_out)} held-out prompts are "
                f"scored before and after training ({cfg.grpo.num_generations} completions each); set data.eval_rows "
                "for more, data.eval_split: null for none")
        held_out, _, _ = tokenize_prompts(rows, tokenizer, cfg, splits.eval_where)
    return PromptData(train=train, eval=held_out, dropped=dropped, format="prompt", eval_note=note,
                      prompt_tokens=lengths)


def steps_of(cfg: Config, prompts: int, world: int = 1) -> tuple[int, float]:
    """(optimizer steps, epochs) of a run over ``prompts`` train prompts. An epoch is the whole steps that
    fit (TRL's sampler drops the last, incomplete batch of prompts)."""
    per_step = prompts_per_step(cfg, world)
    per_epoch = max(prompts // per_step, 1)
    steps = cfg.train.max_steps or max(int(-(-per_epoch * cfg.train.epochs // 1)), 1)
    return steps, steps / per_epoch


@functools.cache
def _report_class():
    from .run import DryRunReport

    @dataclasses.dataclass
    class GrpoDryRunReport(DryRunReport):
        """The dry run of a grpo config: prompts, their tokens and the steps; completions are made in the run."""

        def summary(self) -> str:
            g, t = self.config.grpo, self.config.train
            lines = super().summary().splitlines()
            completions = t.batch_size * t.grad_accum * self.world_size
            for i, line in enumerate(lines):
                if line.startswith("  tokens:"):
                    lines[i] = (f"  prompt tokens: {self.train_tokens:,}, longest prompt {self.longest} + up to "
                                f"{g.max_completion_length} completion tokens of max_seq_length "
                                f"{self.config.model.max_seq_length}")
                elif line.startswith("  steps:"):
                    prompts = completions // g.num_generations
                    lines[i] = (f"  steps: {self.steps} x {completions} completions ({prompts} prompt"
                                f"{'s' if prompts > 1 else ''} x {g.num_generations} generations; batch {t.batch_size}"
                                f" x grad_accum "
                                f"{t.grad_accum}" + (f" x {self.world_size} GPUs" if self.world_size > 1 else "")
                                + f") = {self.epochs:.2f} epochs")
            return "\n".join(lines)

    return GrpoDryRunReport


def dry_run_report(cfg: Config, plan, tokenizer, world: int, resume_from):
    """The dry run of a grpo config: prompts, their tokens and the steps, without loading the model."""
    data = prepare_grpo_data(cfg, tokenizer, world)
    prompts = data.train.num_rows
    steps, epochs = steps_of(cfg, prompts, world)
    g = cfg.grpo
    notes = [n for n in (data.eval_note,) if n]
    notes.append(f"train.method grpo: each prompt gets {g.num_generations} completions of up to "
                 f"{g.max_completion_length} tokens, generated during the run and scored by {', '.join(g.rewards)}"
                 + (f"; the KL term (beta {g.beta:g}) reads them once more with LoRA off" if g.beta else ""))
    if plan is not None:
        notes.append("memory plan: counted as for SFT on the prompts; the completions' generation (its KV cache) is "
                     "not in it yet")
    if _instruction(cfg):
        notes.append("data.system_prompt unset: each GSM8K question is followed by the instruction to end with "
                     "'#### <number>' (the form the built-in rewards read)")
    first = data.train[0]
    return _report_class()(
        config=cfg, plan=plan, format=data.format, train_rows=prompts,
        eval_rows=0 if data.eval is None else data.eval.num_rows, dropped=data.dropped,
        train_tokens=sum(data.prompt_tokens), trainable_tokens=0, longest=max(data.prompt_tokens), steps=steps,
        epochs=epochs, resume_from=resume_from, sample=tokenizer.decode(prompt_ids(first["prompt"], tokenizer)),
        world_size=world, notes=notes, unit="prompts")
