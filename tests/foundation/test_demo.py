"""The README's main job end to end on the CPU, and the adapter it saves, loaded with plain peft."""
import os
import re
import resource
import subprocess
import sys
import time

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, smollm2_dir):
    out = tmp_path_factory.mktemp("demo")
    t0 = time.perf_counter()
    cpu0 = _children_cpu_s()
    proc = subprocess.run([sys.executable, "-m", "nbtune", "demo", "--out", str(out)], capture_output=True,
                          text=True, timeout=1500, env=dict(os.environ, NBTUNE_KERNELS="auto"))
    elapsed = time.perf_counter() - t0
    cpu = _children_cpu_s() - cpu0
    print(proc.stdout)
    print(proc.stderr[-3000:], file=sys.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout, proc.stderr, (elapsed, cpu, os.getloadavg()[0])


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def test_demo_lowers_held_out_loss(demo_run):
    """The demo's held-out loss falls and it shows live progress. Its time is printed, not asserted:
    a test runner sharing the cores (another worker compiling kernels) can double it."""
    out, stdout, stderr, (elapsed, cpu, load) = demo_run
    m = re.search(r"held-out loss: ([\d.]+) before -> ([\d.]+) after", stdout)
    assert m, stdout
    before, after = float(m.group(1)), float(m.group(2))
    print(f"held-out loss before {before:.4f}, after {after:.4f}; demo took {elapsed:.0f} s wall, "
          f"{cpu:.0f} CPU-s, load average {load:.1f} on {os.cpu_count()} cores")
    assert after < before
    assert re.search(r"step \d+/\d+ \| loss", stderr), "no live progress lines"


def test_demo_writes_log_and_adapter(demo_run):
    import json

    out = demo_run[0]
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train = [r for r in records if r["event"] == "train"]
    evals = [r for r in records if r["event"] == "eval"]
    assert len(train) >= 5 and all(r["loss"] > 0 and r["tokens_per_s"] > 0 for r in train[1:])
    assert len(evals) == 2
    assert [r["step"] for r in train] == sorted(r["step"] for r in train)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "run.yaml").is_file()


def test_adapter_loads_with_plain_peft_and_matches_nbtune(demo_run, smollm2_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import nbtune

    adapter = demo_run[0] / "adapter"
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32),
                                      str(adapter)).eval()
    base, tok = nbtune.load_model("smollm2-135m-instruct", max_seq_length=512)
    ours = nbtune.load_adapter(base, adapter).eval()
    lora_b = [p for n, p in plain.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b), "the adapter was not trained"
    text = tok.apply_chat_template([{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many?"}],
                                   tokenize=False, add_generation_prompt=True)
    ids = AutoTokenizer.from_pretrained(smollm2_dir)(text, return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = plain(input_ids=ids).logits, ours(input_ids=ids).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), plain.disable_adapter():
        base_logits = plain(input_ids=ids).logits
    assert (a - base_logits).abs().max() > 1e-3, "adapter changes nothing"
