"""benchmarks/host_cap.py, export_8b.py and export_report.py without a GPU: the host-RAM cap kills
a process that goes over it and reports one that stays under; the random adapter is a real peft
adapter of the base with non-zero B; the whole script end to end on a one-layer model of small
width; RESULTS.md's export section."""
import json
import os
import sys

import pytest

from bench_scripts import BENCH, load_script

host_cap = load_script("nbtune_bench_host_cap", os.path.join(BENCH, "host_cap.py"))
export_report = load_script("nbtune_bench_export_report", os.path.join(BENCH, "export_report.py"))


def _allocate(mb: int) -> list[str]:
    return [sys.executable, "-c", f"x = bytearray({mb} * 10**6); x[::4096] = b'1' * len(x[::4096])"]


def test_the_cap_kills_a_process_over_it_and_passes_one_under_it():
    """Under a 0.4 GB cap: 100 MB passes with a measured peak above 100 MB; 1 GB does not finish.
    Where no memory cgroup can be made, nothing is enforced and the result says so."""
    under = host_cap.run_capped(_allocate(100), cap_gb=0.4)
    assert under["returncode"] == 0 and under["under_cap"]
    assert 0.1 < under["peak_rss_gb"] < 0.4
    over = host_cap.run_capped(_allocate(1000), cap_gb=0.4)
    assert not over["under_cap"]
    if over["capped"]:
        assert over["returncode"] != 0 and over["oom_kills"] >= 1
        assert over["peak_rss_gb"] <= 0.4 + 0.01
    else:
        assert over["returncode"] == 0 and over["peak_rss_gb"] > 1.0


def test_the_cap_removes_its_cgroup():
    # this process's groups only (their names carry its pid): other test workers make their own meanwhile
    mine = f"**/nbtune-cap-{os.getpid()}-*"

    def groups():
        return {p.name for p in host_cap.CGROUP_ROOT.glob(mine)} if host_cap.CGROUP_ROOT.exists() else set()

    before = groups()
    host_cap.run_capped(_allocate(10), cap_gb=0.4)
    assert groups() <= before


@pytest.fixture(scope="module")
def export_8b():
    return load_script("nbtune_bench_export_8b", os.path.join(BENCH, "export_8b.py"))


def test_the_random_adapter_is_peft_s_and_changes_every_projection(export_8b, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    export_8b.build_adapter(str(tmp_path / "base"), str(tmp_path / "adapter"))
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert len(lora_b) == 2 * 7
    assert all(p.abs().sum() > 0 for p in lora_b.values())
    assert all(p.dtype == torch.float32 for p in lora_b.values())


@pytest.mark.slow
def test_the_script_end_to_end_on_a_small_model(export_8b, tmp_path, monkeypatch):
    """A one-layer model at llama3-8b's width through every step: three capped exports, llama.cpp's
    logits against the merged model's (where llama-cpp-python is installed), the JSON and the section."""
    import importlib.util

    out = tmp_path / "export-8b-test.json"
    rc = export_8b.main(["--work", str(tmp_path / "work"), "--layers", "1", "--json", str(out)])
    doc = json.loads(out.read_text())
    assert rc == 0
    assert set(doc["steps"]) == {"gguf", "merged_from_bf16", "merged_from_nf4"}
    for step in doc["steps"].values():
        assert step["returncode"] == 0 and step["under_cap"] and step["output_bytes"] > 0
    assert doc["model"]["layers"] == 1 and doc["model"]["hidden"] == 4096
    if importlib.util.find_spec("llama_cpp"):
        assert doc["llama_cpp"]["loads"] and doc["llama_cpp"]["cosine_min"] > 0.99
    else:  # said, not failed: the exports were measured all the same
        assert "pip install llama-cpp-python" in doc["llama_cpp"]["missing"]
    assert not (tmp_path / "work" / "merged-from-bf16").exists()  # exports are removed once measured
    text = "\n".join(export_report.section([(str(out), doc)]))
    assert "merged float16 from the NF4 base" in text and "| yes |" in text


def test_the_section_says_when_the_cap_was_not_enforced():
    doc = {"shape": "llama3-8b", "quant": "q8_0", "cap_gb": 12.7, "versions": {}, "model": {"params": 7.5e9},
           "steps": {"gguf": {"returncode": 0, "capped": False, "under_cap": True, "peak_rss_gb": 1.5,
                              "seconds": 100, "output_bytes": 8e9},
                     "merged_from_nf4": {"returncode": -9, "capped": True, "under_cap": False, "oom_kills": 1,
                                         "peak_rss_gb": 12.7, "seconds": 30, "output_bytes": 0}}}
    lines = export_report.section([("export-8b-x.json", doc)])
    gguf = next(line for line in lines if line.startswith("| GGUF"))
    nf4 = next(line for line in lines if line.startswith("| merged float16 from the NF4"))
    assert "not enforced" in gguf and "8.00" in gguf
    assert "no (exit -9, OOM kills 1)" in nf4
    assert export_report.section([]) == []
