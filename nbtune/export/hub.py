"""Publish a finished run on the Hugging Face Hub: the adapter, the merged checkpoint and/or GGUF
files, with a model card.

``push_to_hub(RUN_DIR, "me/my-model", formats=("adapter", "gguf"))`` stages what it uploads in a
temporary folder (the adapter at the top level, ``merged/`` and ``gguf/`` beside it, ``README.md``)
and sends it in one commit through ``huggingface_hub``. It needs a token (``token=``, ``HF_TOKEN``
or ``huggingface-cli login``); with the hub switched off (``HF_HUB_OFFLINE=1``) or out of reach it
stops at once with one line. The model card names the base model, the data, the run's config and
its held-out loss (a GRPO run: its held-out mean reward) before and after training; it holds no
token and no local path: a local model or data file is named by its file name only.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from .adapter import ExportError

FORMATS = ("adapter", "merged", "gguf")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _public_name(value: str) -> str:
    """A model or data name fit for a public card: hub ids as they are, local paths by their last part."""
    text = str(value)
    if text.startswith(("/", "~", ".")) or os.sep in text.strip("/") and Path(os.path.expanduser(text)).exists():
        return Path(text).name
    return text


def _public_config(cfg) -> dict:
    data = cfg.model_dump()
    data["model"]["name"] = _public_name(data["model"]["name"])
    data["data"]["source"] = _public_name(data["data"]["source"])
    data["output"]["dir"] = Path(data["output"]["dir"]).name
    return data


def _held_out(run_dir: Path, key: str = "eval_loss") -> tuple[float | None, float | None]:
    """(held-out ``key`` before training, after) from the run's metrics stream: the loss, or a GRPO
    run's mean reward (``eval_reward``)."""
    evals = []
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == "eval" and record.get(key) is not None:
                evals.append((record.get("step", 0), record[key]))
    if not evals:
        return None, None
    before = next((loss for step, loss in evals if step == 0), None)
    return before, evals[-1][1] if evals[-1][0] != 0 else None


def model_card(run_dir, cfg, formats, repo_id: str) -> str:
    """README.md for the hub repo (YAML metadata + what the model is and how it was made)."""
    run_dir = Path(run_dir)
    base, data = _public_name(cfg.model.name), _public_name(cfg.data.source)
    # a GRPO run's eval loss is its surrogate loss (about 0 whatever the model does): its mean reward instead
    grpo = cfg.train.method == "grpo"
    before, after = _held_out(run_dir, "eval_reward" if grpo else "eval_loss")
    meta = {"library_name": "peft" if "adapter" in formats else "transformers",
            "tags": ["nbtune", "lora", *(["gguf"] if "gguf" in formats else [])]}
    if base.count("/") == 1 and not Path(os.path.expanduser(str(cfg.model.name))).exists():
        meta["base_model"] = base  # a hub id: the hub links the fine-tune to it
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {repo_id.split('/')[-1]}", "",
             f"A LoRA fine-tune of **{base}** on **{data}**, made with nbtune.", ""]
    from ..assets.registry import DATASETS, MODELS

    if cfg.model.name in MODELS:
        lines += [f"Base model: {MODELS[cfg.model.name].description}.", ""]
    if cfg.data.source in DATASETS:
        lines += [f"Data: {DATASETS[cfg.data.source].description}.", ""]
    if before is not None or after is not None:
        fmt = lambda x: "n/a" if x is None else f"{x:.3f}" if grpo else f"{x:.4f}"  # noqa: E731
        lines += [f"| held-out {'mean reward' if grpo else 'loss'} | value |", "| --- | --- |",
                  f"| before training | {fmt(before)} |",
                  f"| after training | {fmt(after)} |", ""]
    lines += ["## Files", ""]
    if "adapter" in formats:
        lines.append("- the LoRA adapter (peft format) at the top level: "
                     "`PeftModel.from_pretrained(base_model, repo_id)`")
    if "merged" in formats:
        lines.append("- `merged/`: the adapter folded into a 16-bit checkpoint: "
                     "`AutoModelForCausalLM.from_pretrained(repo_id, subfolder='merged')`")
    if "gguf" in formats:
        lines.append("- `gguf/`: one GGUF file for llama.cpp / LM Studio, with an Ollama Modelfile beside it")
    lines += ["", "## Training config", "", "```yaml", yaml.safe_dump(_public_config(cfg), sort_keys=False).strip(),
              "```", ""]
    return "\n".join(lines)


def _scrub_paths(folder: Path) -> None:
    """Local absolute paths in the staged JSON files (peft records the base model's folder in
    adapter_config.json) become their last part: a public repo names no local path."""
    def scrub(value):
        if isinstance(value, str) and os.path.isabs(os.path.expanduser(value)) and len(value) > 1:
            return Path(value).name
        if isinstance(value, dict):
            return {k: scrub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [scrub(v) for v in value]
        return value

    for path in folder.rglob("*.json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            continue
        clean = scrub(data)
        if clean != data:
            path.write_text(json.dumps(clean, indent=2) + "\n", encoding="utf-8")


def _token(token: str | None) -> str:
    if token:
        return token
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise ExportError("push_to_hub needs a Hugging Face token with write access: pass token=..., set HF_TOKEN, "
                          "or run `huggingface-cli login`")
    return found


def push_to_hub(run_dir, repo_id: str, formats=("adapter",), token: str | None = None, private: bool = True,
                quant: str | None = None, commit_message: str | None = None) -> str:
    """Upload the run in ``run_dir`` to the hub repo ``repo_id`` (created if missing, private by
    default) as ``formats`` (adapter, merged, gguf; GGUF in ``quant``); returns the repo's URL."""
    from .api import export_run, read_run

    formats = [formats] if isinstance(formats, str) else list(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ExportError(f"formats: {unknown or formats!r} is not a list of {', '.join(FORMATS)}")
    if "/" not in repo_id:
        raise ExportError(f"repo_id: {repo_id!r} is not owner/name (e.g. 'me/smollm2-gsm8k')")
    if _offline():
        raise ExportError("push_to_hub: the hub is switched off here (HF_HUB_OFFLINE=1); unset it to upload")
    token = _token(token)
    cfg, adapter_dir = read_run(run_dir)
    run_dir = Path(run_dir)
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
    except Exception as e:
        raise ExportError(f"push_to_hub: could not create or reach {repo_id!r} on the hub "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    with tempfile.TemporaryDirectory(prefix="nbtune-hub-") as tmp:
        stage = Path(tmp)
        if "adapter" in formats:
            shutil.copytree(adapter_dir, stage, dirs_exist_ok=True)
        if "merged" in formats:
            export_run(run_dir, "merged", out=stage / "merged")
        if "gguf" in formats:
            export_run(run_dir, "gguf", quant=quant, out=stage / "gguf")
        (stage / "README.md").write_text(model_card(run_dir, cfg, formats, repo_id), encoding="utf-8")
        _scrub_paths(stage)
        try:
            api.upload_folder(folder_path=str(stage), repo_id=repo_id,
                              commit_message=commit_message or f"nbtune: {', '.join(formats)}")
        except Exception as e:
            raise ExportError(f"push_to_hub: the upload to {repo_id!r} failed "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    return f"{api.endpoint.rstrip('/')}/{repo_id}"
