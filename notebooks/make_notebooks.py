"""Writes notebooks/*.ipynb (clean, no outputs): edit here, then run `python notebooks/make_notebooks.py`."""
import nbformat
from nbformat.v4 import new_notebook, new_markdown_cell, new_code_cell
from pathlib import Path

OUT = Path(__file__).resolve().parent
COLAB = "https://colab.research.google.com/github/nbtune/nbtune/blob/main/notebooks/{}"

INSTALL = '''# Install on Colab only. Colab's own CUDA torch is kept: nbtune does not pin torch.
import sys
if "google.colab" in sys.modules:
    %pip install -q "nbtune @ git+https://github.com/nbtune/nbtune"'''


def md(s):
    return new_markdown_cell(s.strip("\n"))


def code(s, tags=None):
    c = new_code_cell(s.strip("\n"))
    if tags:
        c.metadata["tags"] = tags
    return c


def params(s):
    return code(s, tags=["parameters"])


def header(fname, title, text):
    badge = f"[![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)]({COLAB.format(fname)})"
    return md(f"# {title}\n\n{badge}\n\n{text.strip()}")


def save(fname, cells):
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        "accelerator": "GPU", "colab": {"provenance": [], "gpuType": "T4"},
    })
    nbformat.validate(nb)
    nbformat.write(nb, OUT / fname)


# ---------------------------------------------------------------- 01 quickstart
save("01_quickstart.ipynb", [
    header("01_quickstart.ipynb", "nbtune quickstart: QLoRA on a free T4",
           """
Fine-tune **Llama 3.1 8B Instruct** with QLoRA on a free Colab T4 with nbtune's defaults
(4-bit NF4 base, LoRA r=16 on every linear layer, fp16, offloaded gradient checkpointing).
Without a GPU the notebook switches to the embedded **SmolLM2-135M-Instruct**, so it runs
anywhere (mybinder, a laptop, CI) in a few minutes.

On Colab: *Runtime → Change runtime type → T4 GPU*, then *Run all*.
"""),
    code(INSTALL),
    md("## Parameters\nThe next cell holds every knob this notebook uses. CI overrides it to run in seconds on a CPU."),
    params('''
MODEL = None            # None: Llama 3.1 8B on a GPU, the embedded SmolLM2-135M-Instruct on a CPU
MAX_STEPS = 60          # optimizer steps
MAX_ROWS = None         # None: all GSM8K training rows (CPU default below: 64)
EVAL_ROWS = None        # held-out rows for the before/after loss (CPU default below: 16)
MAX_SEQ_LENGTH = 2048   # longest training sequence in tokens
OUTPUT_DIR = "outputs/quickstart"
'''),
    md("## Which model, which machine"),
    code('''
import torch
import nbtune

ON_GPU = torch.cuda.is_available()
if MODEL is None:
    # a pre-quantized (bnb 4-bit), ungated copy of Llama 3.1 8B Instruct: ~5.7 GB to download
    MODEL = "unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit" if ON_GPU else "smollm2-135m-instruct"
if not ON_GPU:
    MAX_STEPS = min(MAX_STEPS, 12)
    MAX_ROWS = MAX_ROWS or 64
    EVAL_ROWS = EVAL_ROWS or 16
    MAX_SEQ_LENGTH = min(MAX_SEQ_LENGTH, 512)
print("GPU:", torch.cuda.get_device_name(0) if ON_GPU else "none (CPU run)")
print("model:", MODEL)
'''),
    md("""
## One config
The same config drives the `%%finetune` magic, `nbtune finetune run.yaml` and `nbtune.finetune(...)`.
Defaults not written here: 4-bit NF4 base on a GPU, dtype auto (fp16 on a T4), AdamW 8-bit, offloaded
gradient checkpointing, training on the answers only.
"""),
    code('''
config = nbtune.build_config({
    "model": {"name": MODEL, "max_seq_length": MAX_SEQ_LENGTH},
    "data": {"source": "gsm8k", "max_rows": MAX_ROWS, "eval_rows": EVAL_ROWS},
    "lora": {"r": 16, "alpha": 16},
    "train": {"max_steps": MAX_STEPS, "batch_size": 2, "grad_accum": 4, "lr": 2e-4,
              **({} if ON_GPU else {"gradient_checkpointing": "off", "optimizer": "adamw", "grad_accum": 1,
                                    "lr": 1e-3, "warmup_steps": 0})},
    "output": {"dir": OUTPUT_DIR, "overwrite": True},  # running the notebook again replaces its own run
})
config
'''),
    md("## Will it fit? The memory plan, before anything is loaded"),
    code('''
plan = nbtune.plan_from_config(config, gpu="auto" if ON_GPU else "T4")
plan
'''),
    md("## Train\n`%finetune config` (one `%`: the config is a variable; `%%finetune` takes it as the cell body instead); the live dashboard updates about once a second."),
    code("%load_ext nbtune"),
    code("%finetune config --dry-run"),
    code("%finetune config --out run"),
    code("print(run.summary())"),
    md("## Talk to the fine-tuned model"),
    code('''
chat = run.chat(max_new_tokens=64)
print(chat("Natalia sold 48 clips in April and half as many in May. How many clips did she sell in all?"))
'''),
    md("""
The adapter is a plain `peft` adapter: `peft.PeftModel.from_pretrained(base, run.adapter_dir)` loads it
anywhere. Next: [02 memory planner](02_memory_planner.ipynb), [03 your own data](03_your_own_data.ipynb).
"""),
    code("sorted(p.name for p in run.adapter_dir.iterdir())"),
])

# ---------------------------------------------------------------- 02 planner
save("02_memory_planner.ipynb", [
    header("02_memory_planner.ipynb", "The memory planner: will it fit before you load it?",
           """
`nbtune.plan` predicts a LoRA/QLoRA run's peak GPU memory term by term (weights, LoRA, optimizer,
activations, logits, workspace) from the model's shape alone: no torch, no download, no GPU.
It runs in well under a millisecond, so you can try settings freely, and `suggest()` finds the
largest batch / context that fits or the smallest change that makes a run fit.
"""),
    code(INSTALL),
    params('''
MODEL = "llama-3.1-8b"   # a catalog name, a hub id or a local checkpoint directory
GPU = "T4"
SEQ_LEN = 2048
BATCH_SIZE = 2
'''),
    code('''
import nbtune
from nbtune.planner import catalog_names, gpu_names

print("models:", ", ".join(catalog_names()))
print("GPUs:  ", ", ".join(gpu_names()))
'''),
    md("## One plan"),
    code('''
plan = nbtune.plan(MODEL, gpu=GPU, seq_len=SEQ_LEN, batch_size=BATCH_SIZE, lora_rank=16)
plan
'''),
    code('''
print(f"peak {plan.peak_gib:.2f} GiB of {plan.capacity_gib:.2f} GiB -> fits: {plan.fits}")
for term, gib in plan.breakdown.items():
    print(f"  {plan.term_label(term):40s} {gib:6.2f} GiB")
print(plan.suggest().message)
'''),
    md("## What the defaults buy: the same run without 4-bit, without checkpointing"),
    code('''
import plotly.graph_objects as go

variants = {
    "nbtune defaults": plan,
    "plain checkpointing": plan.replace(gradient_checkpointing="plain"),
    "no checkpointing": plan.replace(gradient_checkpointing="off"),
    "16-bit base (LoRA)": plan.replace(load_in_4bit=False),
}
fig = go.Figure()
for term in plan.breakdown:
    fig.add_bar(name=plan.term_label(term), y=list(variants), x=[p.breakdown[term] for p in variants.values()],
                orientation="h")
fig.add_vline(x=plan.capacity_gib, line_dash="dash", annotation_text=f"{plan.gpu.name} {plan.capacity_gib:.1f} GiB")
fig.update_layout(barmode="stack", height=330, template="plotly_white", xaxis_title="GiB",
                  title=f"{plan.model.name}, seq_len {SEQ_LEN}, batch {BATCH_SIZE}")
fig
'''),
    md("## How long a context fits on each GPU"),
    code('''
for gpu in ["T4", "L4", "A100 40GB"]:
    p = nbtune.plan(MODEL, gpu=gpu, seq_len=SEQ_LEN, batch_size=1)
    print(f"{gpu:10s} longest context at batch 1: {p.max_seq_len():>7,} tokens;"
          f" largest batch at {SEQ_LEN}: {p.replace(batch_size=1).max_batch_size()}")
'''),
    md("""
## Free Colab is two budgets: the T4's GPU memory and 12.7 GB of RAM
`gpu="colab-t4"` plans both: the T4 (14.3 GiB for torch) and the machine's 12.7 GB of RAM, which
holds everything the process does: Python and torch, the data set, the model while it loads, and
the layer inputs that offloaded checkpointing keeps on the host. A plan fits only where both do.
`gradient_checkpointing="auto"` offloads as many layers as the host holds and checkpoints the rest on
the GPU; the plain `T4` entry judges the GPU alone, and its longer context would not survive a
free Colab session's RAM. These are plans: the measured T4 emulation is in benchmarks/RESULTS.md.
"""),
    code('''
colab = nbtune.plan(MODEL, gpu="colab-t4", seq_len=SEQ_LEN, batch_size=1, gradient_checkpointing="auto")
print(f"GPU:  {colab.peak_gib:5.2f} of {colab.capacity_gib:.2f} GiB -> fits: {colab.gpu_fits}")
print(f"host: {colab.host_peak_gib:5.2f} of {colab.host_capacity_gib:.2f} GiB -> fits: {colab.host_fits}")
for term, gib in colab.host_breakdown.items():
    print(f"  {colab.host_term_label(term):45s} {gib:6.2f} GiB")
both = colab.max_seq_len()
gpu_alone = nbtune.plan(MODEL, gpu="T4", seq_len=SEQ_LEN, batch_size=1).max_seq_len()
print(f"longest context at batch 1 on free Colab, both budgets: {both:,} tokens; the T4's GPU memory alone: "
      f"{gpu_alone:,}")
print(colab.replace(seq_len=both).checkpointing_reason)
'''),
    md("""
## The widget
Change any control and the plan redraws; *make %%finetune config* writes the matching cell.
It uses core ipywidgets only, so it renders in Colab, JupyterLab, Notebook 7 and VS Code.
"""),
    code('''
widget = nbtune.PlannerWidget(model=MODEL, gpu=GPU, seq_len=SEQ_LEN, batch_size=BATCH_SIZE)
widget
'''),
    md("Driving it from code (what a click does):"),
    code('''
widget.seq_len.value = 8192
widget._on_config()
print(widget.badge.value.split(">")[1].split("<")[0], "|", f"{widget.plan.peak_gib:.2f} GiB")
print(widget.config_text.value)
'''),
])

CPU_TRAIN = '''{"gradient_checkpointing": "off", "optimizer": "adamw", "grad_accum": 1, "lr": 1e-3, "warmup_steps": 0}'''

# ---------------------------------------------------------------- 03 your own data
save("03_your_own_data.ipynb", [
    header("03_your_own_data.ipynb", "Your own data: files, chat templates, responses-only training",
           """
`data.source` takes the embedded `gsm8k`, a hub dataset id, or a local `.jsonl` / `.json` / `.csv` /
`.parquet` file. The format is detected from the columns:

| format | columns |
|---|---|
| `messages` | `messages`: a list of `{"role", "content"}` turns (also ShareGPT's `conversations` / `from` / `value`) |
| `prompt_completion` | `prompt`, `completion` |
| `instruction` | `instruction`, `input` (optional), `output` (Alpaca) |
| `qa` | `question`, `answer` |
| `text` | `text` (plain language modelling) |

Other column names map with `data.columns: {canonical: yours}`. By default only the assistant's
tokens are trained on (`responses_only: true`); the prompt still goes through the model as context.
"""),
    code(INSTALL),
    params('''
MODEL = "smollm2-135m-instruct"
MAX_STEPS = 8
MAX_SEQ_LENGTH = 256
OUTPUT_DIR = "outputs/own-data"
DATA_DIR = "data"
'''),
    md("## Three files in three formats"),
    code('''
import csv, json, os
from pathlib import Path
import torch
import nbtune

ON_GPU = torch.cuda.is_available()
data = Path(DATA_DIR)
data.mkdir(parents=True, exist_ok=True)
capitals = [("France", "Paris"), ("Japan", "Tokyo"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Canada", "Ottawa"),
            ("Egypt", "Cairo"), ("Norway", "Oslo"), ("Chile", "Santiago"), ("India", "New Delhi"), ("Spain", "Madrid"),
            ("Italy", "Rome"), ("Ghana", "Accra"), ("Nepal", "Kathmandu"), ("Cuba", "Havana"), ("Iran", "Tehran"),
            ("Mali", "Bamako")]

with open(data / "chat.jsonl", "w") as f:            # messages format
    for country, city in capitals:
        f.write(json.dumps({"messages": [
            {"role": "system", "content": "You answer in one short sentence."},
            {"role": "user", "content": f"What is the capital of {country}?"},
            {"role": "assistant", "content": f"The capital of {country} is {city}."}]}) + "\\n")

with open(data / "pairs.jsonl", "w") as f:           # prompt / completion
    for country, city in capitals:
        f.write(json.dumps({"prompt": f"Capital of {country}?", "completion": city}) + "\\n")

with open(data / "sheet.csv", "w", newline="") as f:  # your own column names
    w = csv.writer(f)
    w.writerow(["country_question", "reply"])
    for country, city in capitals:
        w.writerow([f"Which city is the capital of {country}?", city])

print(*(f"{p.name}: {p.stat().st_size} bytes" for p in sorted(data.iterdir())), sep="\\n")
'''),
    md("""
## Check before you train: `--dry-run`
A dry run reads and tokenizes the data with the model's tokenizer and chat template, without loading
the model: rows, tokens, how many of them are trained on, steps, and the first example as the model sees it.
"""),
    code('''
def dry(source, **data):
    cfg = {"model": {"name": MODEL, "max_seq_length": MAX_SEQ_LENGTH}, "data": {"source": source, **data},
           "train": {"max_steps": MAX_STEPS}}
    return nbtune.finetune(cfg, dry_run=True)

for source, extra in [(data / "chat.jsonl", {}), (data / "pairs.jsonl", {}),
                      (data / "sheet.csv", {"columns": {"question": "country_question", "answer": "reply"}})]:
    print(dry(str(source), **extra).summary(), "\\n")
'''),
    md("""
## Responses only, or everything
With `responses_only: true` (the default) the labels of the system and user turns are `-100`, so the
loss covers only what the assistant says. Compare the trained-on token counts:
"""),
    code('''
only = dry(str(data / "chat.jsonl"))
everything = dry(str(data / "chat.jsonl"), responses_only=False)
print(f"responses only: {only.trainable_tokens:,} of {only.train_tokens:,} tokens trained on")
print(f"everything:     {everything.trainable_tokens:,} of {everything.train_tokens:,} tokens trained on")
'''),
    md("""
## Chat templates
`chat_template: null` keeps the tokenizer's own template (ChatML when it has none); `chatml` forces
ChatML; any other string is used as a Jinja template. The masked tokens of one example, as the trainer sees it:
"""),
    code('''
from transformers import AutoTokenizer
from nbtune.assets import pull_model
from nbtune.train.data import apply_chat_template_choice, tokenize_example

tok = AutoTokenizer.from_pretrained(pull_model(MODEL) if MODEL == "smollm2-135m-instruct" else MODEL)
apply_chat_template_choice(tok, "chatml")
messages = json.loads((data / "chat.jsonl").read_text().splitlines()[0])["messages"]
ids, labels = tokenize_example(messages, tok, MAX_SEQ_LENGTH, responses_only=True)
from IPython.display import HTML
HTML("".join(
    f"<span style='background:{'#d1f7c4' if l != -100 else '#eee'};white-space:pre-wrap'>"
    f"{tok.decode([i]).replace('<', '&lt;')}</span>" for i, l in zip(ids, labels)) +
    "<div style='font-size:12px;color:#57606a'>green: trained on; grey: context only (label -100)</div>")
'''),
    md("## Train on your file with `%%finetune`\n`{name}` in the magic's line is the Python value of `name`."),
    code("%load_ext nbtune"),
    code('''
%%finetune --out mine --overwrite --set model.name={MODEL} --set model.max_seq_length={MAX_SEQ_LENGTH} --set train.max_steps={MAX_STEPS} --set output.dir={OUTPUT_DIR} --set data.source={DATA_DIR}/chat.jsonl
data: {eval_split: 0.25, responses_only: true, chat_template: chatml}
lora: {r: 8, alpha: 16}
train: {batch_size: 2, grad_accum: 1, lr: 1e-3, warmup_steps: 0, optimizer: adamw, gradient_checkpointing: "off"}
'''),
    code('''
print(mine.summary())
print(mine.chat(max_new_tokens=24)("What is the capital of Kenya?"))
'''),
])

# ---------------------------------------------------------------- 04 evaluate / chat / export
save("04_evaluate_chat_export.ipynb", [
    header("04_evaluate_chat_export.ipynb", "Evaluate, chat, export",
           """
After a run: compare the held-out loss before and after, score generations against the answers,
talk to the model, and export it as a `peft` adapter (load it anywhere) or a merged 16-bit
checkpoint (plain `transformers`, vLLM, llama.cpp conversion).
"""),
    code(INSTALL),
    params('''
MODEL = "smollm2-135m-instruct"
MAX_STEPS = 30
MAX_ROWS = 256
EVAL_ROWS = 32
MAX_SEQ_LENGTH = 512
GEN_ROWS = 4            # questions scored by generation
GEN_TOKENS = 96         # longest generated reply
OUTPUT_DIR = "outputs/evaluate"
'''),
    code(f'''
import re
import torch
import nbtune

ON_GPU = torch.cuda.is_available()
run = nbtune.finetune({{
    "model": {{"name": MODEL, "max_seq_length": MAX_SEQ_LENGTH}},
    "data": {{"source": "gsm8k", "max_rows": MAX_ROWS, "eval_rows": EVAL_ROWS}},
    "lora": {{"r": 16, "alpha": 32}},
    "train": {{"max_steps": MAX_STEPS, "batch_size": 2, **({{}} if ON_GPU else {CPU_TRAIN})}},
    "output": {{"dir": OUTPUT_DIR, "overwrite": True}},  # running the notebook again replaces its own run
}})
print(run.summary())
'''),
    md("## Held-out loss, before and after"),
    code('''
import plotly.graph_objects as go

fig = go.Figure(go.Bar(x=["before", "after"], y=[run.eval_loss_before, run.eval_loss_after],
                       marker_color=["#8C8C8C", "#4C72B0"], text=[f"{run.eval_loss_before:.4f}", f"{run.eval_loss_after:.4f}"]))
fig.update_layout(title="held-out loss (GSM8K test rows)", height=300, width=420, template="plotly_white")
fig
'''),
    md("## Score generations: base model vs fine-tuned\nGSM8K answers end in `#### <number>`; we compare the last number of each reply."),
    code('''
from nbtune.train.data import load_rows

def last_number(text):
    nums = re.findall(r"-?\\d[\\d,]*\\.?\\d*", text)
    return nums[-1].replace(",", "").rstrip(".") if nums else None

rows, _ = load_rows(run.config.data, "test")
rows = rows[:GEN_ROWS]
model, tokenizer = run.live_model()
scores = {"base": 0, "fine-tuned": 0}
for row in rows:
    gold = row["answer"].split("####")[-1].strip().replace(",", "")
    tuned = run.generate(row["question"], max_new_tokens=GEN_TOKENS)
    with model.disable_adapter():
        base = run.generate(row["question"], max_new_tokens=GEN_TOKENS)
    scores["fine-tuned"] += last_number(tuned) == gold
    scores["base"] += last_number(base) == gold
print({k: f"{v}/{len(rows)}" for k, v in scores.items()})
print("last reply:", tuned[:300])
'''),
    md("## Chat\n`run.chat()` keeps the conversation; `.reset()` starts over."),
    code('''
chat = run.chat(max_new_tokens=GEN_TOKENS // 2)
print(chat("Tom has 3 apples and buys 4 more. How many apples does he have?"))
print(chat("And if he eats two of them?"))
chat
'''),
    md("## Export: the adapter (peft format) and a merged 16-bit checkpoint"),
    code('''
from pathlib import Path
adapter = run.save_adapter(Path(OUTPUT_DIR) / "export" / "adapter")
merged = run.save_merged()
for p in (adapter, merged):
    size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20
    print(f"{p}: {size:.1f} MiB", sorted(f.name for f in p.iterdir())[:6])
'''),
    md("Load them back the ordinary ways: the adapter on a base model with `peft`, the merged checkpoint with plain `transformers`."),
    code('''
from transformers import AutoModelForCausalLM, AutoTokenizer

base, base_tok = nbtune.load_model(MODEL, max_seq_length=MAX_SEQ_LENGTH)
reloaded = nbtune.load_adapter(base, adapter)             # a peft.PeftModel
print(type(reloaded).__name__, "adapters:", list(reloaded.peft_config))

plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32 if not ON_GPU else "auto")
plain_tok = AutoTokenizer.from_pretrained(merged)
ids = plain_tok.apply_chat_template([{"role": "user", "content": "What is 7*6?"}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)
out = plain.generate(**ids, max_new_tokens=GEN_TOKENS // 2, do_sample=False)
print(plain_tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
'''),
])

# ---------------------------------------------------------------- 05 dashboard replay / comparison
save("05_dashboard_replay.ipynb", [
    header("05_dashboard_replay.ipynb", "Dashboard replay and run comparison",
           """
Every run writes its metrics stream to `<output.dir>/metrics.jsonl`. The live dashboard is one view
of it; the same view comes back from the file at any time (`nbtune.replay`), several runs overlay on
one figure (`nbtune.overlay`), and `.save_html()` writes a page that works offline.
"""),
    code(INSTALL),
    params('''
MODEL = "smollm2-135m-instruct"
MAX_STEPS = 20
MAX_ROWS = 128
EVAL_ROWS = 16
MAX_SEQ_LENGTH = 256
OUTPUT_DIR = "outputs/compare"
RANKS = [4, 16]
'''),
    md("## Two runs that differ only in the LoRA rank\n(`dashboard=False`: progress lines here; the dashboards come from the logs below.)"),
    code(f'''
import torch
import nbtune
from pathlib import Path

ON_GPU = torch.cuda.is_available()
runs = {{}}
for r in RANKS:
    runs[f"r={{r}}"] = nbtune.finetune({{
        "model": {{"name": MODEL, "max_seq_length": MAX_SEQ_LENGTH}},
        "data": {{"source": "gsm8k", "max_rows": MAX_ROWS, "eval_rows": EVAL_ROWS}},
        "lora": {{"r": r, "alpha": 2 * r}},
        "train": {{"max_steps": MAX_STEPS, "batch_size": 2, "eval_steps": max(1, MAX_STEPS // 2),
                   **({{}} if ON_GPU else {CPU_TRAIN})}},
        "output": {{"dir": str(Path(OUTPUT_DIR) / f"r{{r}}"), "overwrite": True}},
    }}, dashboard=False)
{{k: f"{{v.eval_loss_before:.4f}} -> {{v.eval_loss_after:.4f}}" for k, v in runs.items()}}
'''),
    md("## Replay one run's dashboard from its log"),
    code('''
log = Path(OUTPUT_DIR) / f"r{RANKS[-1]}" / "metrics.jsonl"
print(log.read_text().splitlines()[0][:200], "...")
dash = nbtune.replay(log)
dash
'''),
    md("## Compare runs on one figure"),
    code('''
fig = nbtune.overlay({label: run.log_path for label, run in runs.items()})
fig
'''),
    md("## Records as a table, and an offline HTML page"),
    code('''
records = nbtune.read_log(log)
train = [r for r in records if r.get("event") == "train"]
print(f"{len(records)} records, {len(train)} train steps; keys of one: {sorted(train[-1])}")
page = dash.save_html(Path(OUTPUT_DIR) / "dashboard.html")
print(page, f"{page.stat().st_size / 1e6:.1f} MB (plotly.js embedded)")
'''),
])

# ---------------------------------------------------------------- 06 workshop: kernels
save("06_workshop_kernels.ipynb", [
    header("06_workshop_kernels.ipynb", "Workshop: what nbtune's kernels do",
           """
`nbtune.kernels` fuses the memory-hungry pieces of a QLoRA step. Each kernel has a plain-torch
reference of the same function: on a GPU the Triton kernel runs, on a CPU the reference does (or
the Triton kernel itself under Triton's interpreter, `TRITON_INTERPRET=1`, which is how CI tests
them). Each section below states the math, then checks it on tiny tensors.
"""),
    code(INSTALL),
    params('''
USE_TRITON_INTERPRETER = True   # on a CPU, also run the Triton kernels in Triton's interpreter (slow, tiny tensors)
SEED = 0
'''),
    code('''
import os
import torch
if not torch.cuda.is_available() and USE_TRITON_INTERPRETER:
    os.environ["TRITON_INTERPRET"] = "1"    # must be set before the kernels are defined (imported)
import torch.nn.functional as F
from contextlib import contextmanager
import nbtune.kernels as K

torch.manual_seed(SEED)
DEV = "cuda" if torch.cuda.is_available() else "cpu"

@contextmanager
def mode(m):
    """NBTUNE_KERNELS for a block: 'reference' (plain torch) or 'triton'."""
    old = os.environ.get(K.MODE_ENV)
    os.environ[K.MODE_ENV] = m
    try:
        yield
    finally:
        os.environ.pop(K.MODE_ENV) if old is None else os.environ.__setitem__(K.MODE_ENV, old)

MODES = ["reference"] + (["triton"] if K.HAS_TRITON and (DEV == "cuda" or os.environ.get("TRITON_INTERPRET") == "1") else [])
print("device:", DEV, "| paths compared:", MODES)
'''),
    md(r"""
## 1. NF4: 4-bit weights
QLoRA stores each base weight as 4-bit codes into the 16 NormalFloat levels (quantiles of a normal
distribution), one absmax scale per block of 64 values: $w \approx \text{NF4}[c] \cdot \text{absmax}_{block}$.
`nf4_dequantize` reads bitsandbytes' packed layout (two codes per byte) and is bit-exact with it.
Memory: 0.5 byte per weight + a scale per 64 instead of 2 bytes.
"""),
    code('''
import bitsandbytes.functional as bnbF

w = torch.randn(64, 128)
codes, state = bnbF.quantize_4bit(w.to(DEV), quant_type="nf4", blocksize=64)
for m in MODES:
    with mode(m):
        w_hat = K.nf4_dequantize(codes, state).float().cpu()
    print(f"{m:9s} packed {codes.numel()} bytes for {w.numel()} weights; mean |w - w_hat| = {(w - w_hat).abs().mean():.4f}")
'''),
    md(r"""
## 2. RMSNorm
$y = \frac{x}{\sqrt{\text{mean}(x^2) + \epsilon}} \odot w$ (Gemma: $\odot (1 + w)$). The fused kernel reads $x$
once, keeps $1/\text{rms}$ per row for the backward, and never stores the normalized $x$.
"""),
    code('''
x, g = torch.randn(4, 64), torch.rand(64) + 0.5
by_hand = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * g
for m in MODES:
    with mode(m):
        y = K.rms_norm(x.to(DEV), g.to(DEV), eps=1e-6).cpu()
    print(f"{m:9s} max |kernel - by hand| = {(y - by_hand).abs().max():.2e}")
'''),
    md(r"""
## 3. SwiGLU
Llama's MLP: $h = \text{silu}(x W_g) \odot (x W_u)$ with $\text{silu}(a) = a\,\sigma(a)$. Backward:
$\partial h/\partial g = \sigma(g)(1 + g(1-\sigma(g))) \cdot u$ and $\partial h/\partial u = \text{silu}(g)$,
recomputed from $g, u$ so the activation is not saved.
"""),
    code('''
gate, up = torch.randn(8, 32, requires_grad=True), torch.randn(8, 32, requires_grad=True)
ref = F.silu(gate) * up
ref.sum().backward()
ref_grads = gate.grad.clone(), up.grad.clone()
for m in MODES:
    gate.grad = up.grad = None
    with mode(m):
        h = K.swiglu(gate, up)
        h.sum().backward()
    print(f"{m:9s} forward {(h - ref).abs().max():.1e}, d gate {(gate.grad - ref_grads[0]).abs().max():.1e}, "
          f"d up {(up.grad - ref_grads[1]).abs().max():.1e}")
'''),
    md(r"""
## 4. RoPE
Rotary embeddings rotate each pair of dimensions of $q$ and $k$ by an angle proportional to the
position: $x' = x \cos\theta + \text{rotate\_half}(x) \sin\theta$. Dot products $q_m \cdot k_n$ then depend only on $m - n$:
"""),
    code('''
B, H, S, D = 1, 2, 6, 16
inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
angles = torch.outer(torch.arange(S).float(), inv_freq)
cos, sin = torch.cat([angles, angles], -1).cos()[None], torch.cat([angles, angles], -1).sin()[None]
v = torch.randn(D)
q = v.expand(B, H, S, D).clone()
k = v.expand(B, H, S, D).clone()
for m in MODES:
    with mode(m):
        q_rot, k_rot = K.apply_rope(q.clone(), k.clone(), cos, sin)
    scores = q_rot[0, 0] @ k_rot[0, 0].T
    print(f"{m:9s} q_2.k_0 = {scores[2, 0]:.4f}, q_4.k_2 = {scores[4, 2]:.4f}, q_5.k_3 = {scores[5, 3]:.4f}  (same offset, same score)")
'''),
    md(r"""
## 5. LoRA linear
$y = x W^\top + s\,(x A^\top) B^\top$ with a frozen (4-bit) $W$, trainable $A$ ($r \times d_{in}$), $B$ ($d_{out} \times r$)
and $s = \alpha / r$. The fused path dequantizes $W$ tile by tile and shares the read of $x$ between the two products.
"""),
    code('''
d_in, d_out, r = 32, 48, 4
x, W = torch.randn(5, d_in), torch.randn(d_out, d_in)
A, Bm = torch.randn(r, d_in) * 0.1, torch.randn(d_out, r) * 0.1
s = 16 / r
by_hand = x @ W.T + s * (x @ A.T) @ Bm.T
for m in MODES:
    with mode(m):
        y = K.lora_linear(x, W, A, Bm, s)
    print(f"{m:9s} max |kernel - by hand| = {(y - by_hand).abs().max():.2e}")
'''),
    md(r"""
## 6. Fused linear + cross-entropy
The LM head's logits are $N \times V$ (tokens × vocabulary: 2 × 2048 × 128,256 × 4 bytes ≈ 2 GiB for Llama 3 in fp32).
The fused loss computes them chunk by chunk, takes $\text{logsumexp} - \text{logit}_{label}$ and the gradient
$(\text{softmax} - \text{onehot})$ per chunk, and never holds the full matrix.
"""),
    code('''
N, d, V = 12, 16, 50
hidden, head = torch.randn(N, d), torch.randn(V, d)
labels = torch.randint(0, V, (N,))
labels[:3] = -100                               # masked prompt tokens
by_hand = F.cross_entropy(hidden @ head.T, labels, ignore_index=-100)
for m in MODES:
    with mode(m):
        loss = K.fused_linear_cross_entropy(hidden, head, labels)
    print(f"{m:9s} loss {float(loss):.5f} vs unfused {float(by_hand):.5f}")
print(f"full logits for Llama 3 8B at 2x2048 tokens (fp32): {2 * 2048 * 128256 * 4 / 2**30:.2f} GiB never allocated")
'''),
    md(r"""
## 7. Offloaded gradient checkpointing
Checkpointing keeps only each layer's input and recomputes the rest in the backward; nbtune moves those
saved inputs to pinned CPU memory during the forward and brings them back just before each layer's backward.
GPU memory for activations becomes ~one layer's worth instead of one hidden state per layer. The planner shows the difference:
"""),
    code('''
import nbtune
import plotly.graph_objects as go
modes = ["off", "plain", "offload"]
plans = [nbtune.plan("llama-3.1-8b", gpu="T4", seq_len=4096, batch_size=1, gradient_checkpointing=m) for m in modes]
go.Figure(go.Bar(x=modes, y=[p.peak_gib for p in plans], text=[f"{p.peak_gib:.1f} GiB" for p in plans],
                 marker_color=["#cf222e" if not p.fits else "#1a7f37" for p in plans])).update_layout(
    title="Llama 3.1 8B, 4,096 tokens, T4: peak memory by checkpointing mode", yaxis_title="GiB", height=320,
    template="plotly_white")
'''),
])

# ---------------------------------------------------------------- 07 preferences: DPO / ORPO
save("07_preferences_and_rewards.ipynb", [
    header("07_preferences_and_rewards.ipynb", "Preferences and rewards: DPO, ORPO and GRPO",
           """
Supervised fine-tuning shows the model good answers. **Preference training** shows it pairs: for one
prompt, a *chosen* reply and a *rejected* one, and moves the model towards the first and away from
the second. nbtune runs **DPO** (direct preference optimization) and **ORPO** with the same config,
the same doors (`%%finetune`, `nbtune finetune`, `nbtune.finetune`) and the same dashboard: set
`train.method: dpo` (or `orpo`) and point `data` at rows `{prompt, chosen, rejected}`.

DPO's reference model is the model itself with its LoRA adapter switched off (no second copy of the
weights), and the reply log-probabilities come from nbtune's fused linear + log-softmax kernel (the
logits are never held whole). Its *reward* of a reply is
$\\beta\\,(\\log\\pi(\\text{reply}) - \\log\\pi_{ref}(\\text{reply}))$: how much more likely training made it.

**GRPO** (last part) needs no pairs at all: the model writes several answers to each prompt and
reward functions score them.
The DPO / ORPO parts run on a CPU in minutes with the embedded SmolLM2-135M-Instruct; the GRPO part
trains Llama 3.2 1B Instruct on a GPU (a free T4 will do) and runs a tiny version on a CPU.
"""),
    code(INSTALL),
    params('''
MODEL = "smollm2-135m-instruct"
METHOD = "dpo"          # "dpo" or "orpo"
MAX_STEPS = 40          # optimizer steps (CPU default below: 12)
MAX_ROWS = None         # training pairs (None: all 1,000; CPU default below: 48)
EVAL_ROWS = 32          # held-out pairs (CPU default below: 16)
MAX_SEQ_LENGTH = 512    # GSM8K pairs are under 400 tokens: the final answer, where the replies differ, is kept
BETA = 0.1              # DPO's beta: the reward's scale, how hard the model is held near the reference
OUTPUT_DIR = "outputs/preferences"
# GRPO (the last part)
GRPO_MODEL = None       # None: Llama 3.2 1B Instruct on a GPU, MODEL on a CPU
GRPO_STEPS = 60         # optimizer steps (CPU default below: 2)
GRPO_PROMPTS = None     # GSM8K training prompts (None: all 1,000; CPU default below: 8)
NUM_GENERATIONS = 8     # completions per prompt, scored against each other (CPU default below: 2)
MAX_COMPLETION_LENGTH = 256  # tokens per completion; a longer one is cut (CPU default below: 16)
'''),
    md("""
## The embedded preference set
`gsm8k-preferences` is GSM8K turned into pairs, deterministically: the **chosen** reply is the real
worked solution, the **rejected** one the same solution with a wrong final number (a reply that
contradicts its own working). The held-out pairs ask questions the training pairs never ask.
"""),
    code('''
import json
import torch
import nbtune
from nbtune.assets import pull_dataset

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    MAX_STEPS = min(MAX_STEPS, 12)
    MAX_ROWS = MAX_ROWS or 48
    EVAL_ROWS = min(EVAL_ROWS, 16)
pair = json.loads((pull_dataset("gsm8k-preferences") / "train.jsonl").read_text().splitlines()[0])
print("prompt:  ", pair["prompt"][0]["content"][:120], "...")
print("chosen:   ...", pair["chosen"][0]["content"][-60:].replace("\\n", " | "))
print("rejected: ...", pair["rejected"][0]["content"][-60:].replace("\\n", " | "))
'''),
    md("""
Your own pairs: a `.jsonl` / `.json` / `.csv` / `.parquet` file with `prompt`, `chosen` and `rejected`, each
plain text or chat turns (`[{"role": ..., "content": ...}]`); other column names through `data.columns`.
Without a `prompt` column, chat-form `chosen` / `rejected` holding the whole conversation are split where
they stop agreeing.
"""),
    md("## One config, a dry run\nThe dry run counts pairs and tokens (each pair is read as prompt + chosen and prompt + rejected) without loading the model."),
    code('''
config = nbtune.build_config({
    "model": {"name": MODEL, "max_seq_length": MAX_SEQ_LENGTH},
    "data": {"source": "gsm8k-preferences", "max_rows": MAX_ROWS, "eval_rows": EVAL_ROWS},
    "lora": {"r": 16, "alpha": 32},
    "train": {"method": METHOD, "beta": BETA, "max_steps": MAX_STEPS, "batch_size": 4, "grad_accum": 1,
              "lr": 5e-4, "warmup_steps": 0, "eval_batch_size": 8,
              **({} if ON_GPU else {"gradient_checkpointing": "off", "optimizer": "adamw"})},
    "output": {"dir": OUTPUT_DIR, "overwrite": True},
})
%load_ext nbtune
report = %finetune config --dry-run
print(report)
'''),
    md("""
## Train
The dashboard's third row is the method's own: the rewards of the chosen and rejected replies and their
margin, the share of pairs whose chosen reply gets the higher reward (train, and held out as markers),
and the replies' log-probabilities. Before the first step the policy *is* the reference: every reward is 0.
"""),
    code("%finetune config --out run"),
    code('''
print(run.summary())
records = nbtune.read_log(run.log_path)
held = [r for r in records if r.get("event") == "eval"]
for r in held:
    print(f"step {r['step']:3d}  held-out: reward margin {r['eval_reward_margin']:+.3f}, "
          f"pairs ranked right by reward {100 * r['eval_reward_accuracy']:.0f}%")
'''),
    md("""
## Does the model itself prefer the chosen replies?
The reward accuracy above compares each reply with the reference. `nbtune.preference_accuracy` asks the
plain question on the held-out pairs: is the chosen reply the more likely one, for the base model (the
adapter switched off) and for the trained one?
"""),
    code('''
import plotly.graph_objects as go

acc = nbtune.preference_accuracy(run)
print(acc)
go.Figure(go.Bar(x=["base model", f"after {METHOD.upper()}"], y=[acc["before"], acc["after"]],
                 text=[f"{100 * v:.0f}%" for v in (acc["before"], acc["after"])], marker_color=["#8C8C8C", "#4C72B0"])
          ).update_layout(title=f"held-out pairs ranked right ({acc['pairs']} pairs)", yaxis_range=[0, 1.05],
                          height=300, template="plotly_white")
'''),
    md("""
## ORPO: the same pairs, no reference
ORPO adds an odds-ratio term to the ordinary loss on the chosen replies (weighted by `beta`), so it needs
no reference forward at all. Its reward of a reply is `beta` times the reply's mean token log-probability.
"""),
    code('''
orpo = nbtune.finetune(config, train={"method": "orpo", "max_steps": max(2, MAX_STEPS // 2)},
                       output={"dir": OUTPUT_DIR + "-orpo", "overwrite": True}, dashboard=False)
last = [r for r in orpo.metrics if r.get("event") == "train"][-1]
print(orpo.summary())
print({k: round(last[k], 4) for k in ("nll_loss", "log_odds_ratio", "reward_margin", "reward_accuracy")})
'''),
    md("""
## GRPO: rewards instead of pairs
**GRPO** (group relative policy optimization, DeepSeekMath's method) trains on the model's own
answers. For each prompt it samples a *group* of `grpo.num_generations` completions and scores each
with the reward functions of `grpo.rewards` (their rewards are summed). A completion's *advantage* is
its reward minus its group's mean (divided by the group's spread): the update makes the completions
that beat their siblings more likely and the others less. No critic, no reference answers to imitate;
a group whose completions all score the same teaches nothing.

`data: gsm8k` gives prompt rows with answers: each question (followed by the instruction to end with a
line `#### <number>`) is the prompt, and its solution the `answer` the rewards check against. The
built-in rewards:

- `correctness`: 1 when the completion's final number (after its last `####`, else the last number it
  writes) equals the answer's, else 0;
- `format`: 1 when the completion's last line is `#### <number>`, else 0.

`train.batch_size` counts completions: a step of 16 is 2 prompts x 8 completions. On a GPU this part
trains Llama 3.2 1B Instruct (it gets some GSM8K questions right from the start, so groups differ and
there is something to learn); on a CPU the embedded model writes 16-token completions, which shows
every step of GRPO but leaves its rewards at or near 0 (no room for a worked answer).
"""),
    code('''
if GRPO_MODEL is None:
    # an ungated copy of meta-llama/Llama-3.2-1B-Instruct: ~2.5 GB to download
    GRPO_MODEL = "unsloth/Llama-3.2-1B-Instruct" if ON_GPU else MODEL
if not ON_GPU:
    GRPO_STEPS = min(GRPO_STEPS, 2)
    GRPO_PROMPTS = GRPO_PROMPTS or 8
    NUM_GENERATIONS = min(NUM_GENERATIONS, 2)
    MAX_COMPLETION_LENGTH = min(MAX_COMPLETION_LENGTH, 16)
grpo_config = nbtune.build_config({
    "model": {"name": GRPO_MODEL, "max_seq_length": MAX_COMPLETION_LENGTH + 256},  # GSM8K prompts: < 256 tokens
    "data": {"source": "gsm8k", "max_rows": GRPO_PROMPTS, "eval_rows": 16 if ON_GPU else 2},
    "lora": {"r": 16, "alpha": 32},
    "train": {"method": "grpo", "max_steps": GRPO_STEPS, "batch_size": 2 * NUM_GENERATIONS, "grad_accum": 1,
              "lr": 2e-5, "warmup_steps": 0, "eval_batch_size": 2 * NUM_GENERATIONS,
              **({} if ON_GPU else {"gradient_checkpointing": "off", "optimizer": "adamw"})},
    "grpo": {"num_generations": NUM_GENERATIONS, "max_completion_length": MAX_COMPLETION_LENGTH,
             "temperature": 1.0, "rewards": ["correctness", "format"]},
    "output": {"dir": OUTPUT_DIR + "-grpo", "overwrite": True},
})
report = %finetune grpo_config --dry-run
print(report)
'''),
    md("""
The dry run counts prompts, not pairs: the completions are written during the run, each step's at once
(batched, with the KV cache; vLLM when it is installed and the GPU has compute capability 8.0 or more).
The held-out prompts are scored before and after training, `num_generations` completions each.

The dashboard's third row: the mean reward (summed, and one curve per reward function), the held-out mean
reward as markers, the completions' mean length and, with `grpo.beta > 0`, the KL to the reference (the
model with LoRA off). `grpo.beta` is 0 by default: no reference forward, no KL.
"""),
    code("%finetune grpo_config --out grpo_run"),
    code('''
print(grpo_run.summary())
records = nbtune.read_log(grpo_run.log_path)
steps = [r for r in records if r.get("event") == "train"]
for r in steps[:: max(1, len(steps) // 10)] + ([steps[-1]] if len(steps) > 10 else []):
    print(f"step {r['step']:3d}  reward {r['reward']:.3f} (correctness {r['rewards/correctness']:.3f}, "
          f"format {r['rewards/format']:.3f}), groups all alike {100 * r['reward_zero_std_share']:.0f}%, "
          f"completion length {r['completion_length']:.0f} tokens ({100 * r['completion_clipped_share']:.0f}% cut)")
for r in (r for r in records if r.get("event") == "eval"):
    print(f"step {r['step']:3d}  held-out: reward {r['eval_reward']:.3f} (correctness "
          f"{r['eval_rewards/correctness']:.3f}, format {r['eval_rewards/format']:.3f})")
'''),
    md("""
Each train record holds `reward` (the summed mean), `rewards/<name>` (each function's mean),
`reward_std` (the spread within groups), `reward_zero_std_share` (the share of groups whose completions
all scored the same: no signal), `completion_length`, `completion_clipped_share` (cut at
`max_completion_length`), `entropy`, and with `grpo.beta > 0` the `kl`; the held-out records the same
with `eval_` in front. The summary gives rewards, not losses: GRPO's loss stays near 0 whatever happens.

## Your own reward function
A reward is any Python function `f(prompts, completions, **kwargs)` returning one float per completion
(or `None`: not scored). TRL passes it, by keyword, `prompts`, `completions` (chat form here: a list
with the assistant turn `{"role": "assistant", "content": ...}`), `completion_ids`, `trainer_state` and
every data column (GSM8K's `answer`), so it must take `**kwargs`. Name it `module:function` in
`grpo.rewards`; the module is imported from the working folder or the Python path, and the name is
checked when the config is built. This one gives half a point when the right number appears anywhere in
the completion: partial credit while the model learns the format. (The short run below scores no
held-out prompts: `data.eval_split: null`.)
"""),
    code('''
%%writefile my_rewards.py
import re


def mentions_answer(prompts, completions, answer, **kwargs):
    """0.5 when the completion writes the answer's final number anywhere, else 0.0."""
    scores = []
    for completion, solution in zip(completions, answer):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        target = solution.split("####")[-1].strip().replace(",", "")
        numbers = re.findall(r"-?\\d+(?:\\.\\d+)?", text.replace(",", ""))
        scores.append(0.5 if target in numbers else 0.0)
    return scores
'''),
    code('''
mine = nbtune.finetune(grpo_config, grpo={"rewards": ["correctness", "format", "my_rewards:mentions_answer"]},
                       train={"max_steps": max(1, GRPO_STEPS // 6)}, data={"eval_split": None, "eval_rows": None},
                       output={"dir": OUTPUT_DIR + "-grpo-mine", "overwrite": True}, dashboard=False)
print(mine.summary())
last = [r for r in mine.metrics if r.get("event") == "train"][-1]
print({k: round(last[k], 3) for k in ("reward", "rewards/correctness", "rewards/format", "rewards/mentions_answer")})
'''),
])
