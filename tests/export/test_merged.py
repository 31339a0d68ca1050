"""The merged checkpoint written shard by shard equals peft's merge_and_unload, from a 16-bit and
from a pre-quantized NF4 base, and the export's memory stays near one shard, not the model."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from nbtune.export.adapter import ExportError
from nbtune.export.merged import export_merged


def _state(folder, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).state_dict()


def _peft_merged(base_dir, adapter_dir, dtype):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return {k: v.to(dtype) for k, v in PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().state_dict().items()}


def test_merged_equals_peft_merge_and_unload(sharded_base, smollm2_adapter, tmp_path):
    out = export_merged(sharded_base, smollm2_adapter, tmp_path / "merged", dtype="float16", max_shard_size="50MB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 5  # written in several shards
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float16"
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()

    ours = _state(out, torch.float16)
    ref = _peft_merged(sharded_base, smollm2_adapter, torch.float16)
    base = _state(sharded_base, torch.float16)
    assert ours.keys() == ref.keys()
    changed = 0
    for name, value in ref.items():
        assert ours[name].dtype == torch.float16
        torch.testing.assert_close(ours[name], value, rtol=1e-3, atol=1e-4, msg=name)
        changed += not torch.equal(base[name], value)
    assert changed == 30 * 7  # every adapted linear weight (7 per layer, 30 layers) moved


def test_merged_from_nf4_base(nf4_base, tmp_path):
    """A pre-quantized bnb-4bit base: each weight dequantized on the CPU (bit-identical to
    bitsandbytes' CUDA dequantization), then merged; the same as dequantizing the whole model and
    merging with peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from nbtune.kernels.nf4 import dequantize_base

    bf16_dir, nf4_dir, adapter_dir = nf4_base
    out = export_merged(nf4_dir, adapter_dir, tmp_path / "merged", dtype="bfloat16")
    ours = _state(out, torch.bfloat16)

    quantized = AutoModelForCausalLM.from_pretrained(nf4_dir, device_map="cpu")
    dense = {}
    for name, module in quantized.named_modules():
        if type(module).__name__ == "Linear4bit":
            dense[name + ".weight"] = dequantize_base(module).to(torch.bfloat16)
    assert len(dense) == 2 * 7
    original = _state(bf16_dir, torch.bfloat16)
    for name, w in dense.items():  # the 4-bit weights are the 16-bit ones up to NF4 rounding
        assert (w.float() - original[name].float()).abs().max() <= 0.25 * original[name].float().abs().max()

    ref_model = AutoModelForCausalLM.from_pretrained(bf16_dir, dtype=torch.float32)
    ref_model.load_state_dict({k: v.float() for k, v in dense.items()}, strict=False)
    ref = PeftModel.from_pretrained(ref_model, str(adapter_dir)).merge_and_unload().state_dict()
    for name, value in ref.items():
        torch.testing.assert_close(ours[name], value.to(torch.bfloat16), rtol=1.6e-2, atol=1e-3, msg=name)
    assert not any(torch.equal(ours[n], dense[n]) for n in dense)  # the adapter is in every weight


PEAK_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from nbtune.export.merged import export_merged

    def status(key):  # kB
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])

    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    before = status("VmRSS")
    export_merged(sys.argv[1], sys.argv[2], sys.argv[3], dtype="float16", max_shard_size="60MB")
    print(json.dumps({"before_kib": before, "after_kib": status("VmHWM")}))
""")


def test_peak_memory_is_about_one_shard(sharded_base, smollm2_adapter, tmp_path):
    """Run in a fresh process whose peak-RSS mark (VmHWM) is reset after the imports: the peak
    during the export of a 270 MB model is less than one 60 MB shard + 64 MB above the RSS before it
    (loading the model whole would add at least 270 MB)."""
    import os

    shard_bytes = max(p.stat().st_size for p in sharded_base.glob("model-*.safetensors"))
    model_bytes = sum(p.stat().st_size for p in sharded_base.glob("model-*.safetensors"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(sharded_base), str(smollm2_adapter),
                           str(tmp_path / "merged")], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    grew = (rss["after_kib"] - rss["before_kib"]) * 1024
    print(f"peak RSS grew {grew / 2**20:.1f} MiB during the export (shard {shard_bytes / 2**20:.1f} MiB, "
          f"model {model_bytes / 2**20:.1f} MiB)")
    assert grew < shard_bytes + (64 << 20)
    assert grew < model_bytes / 2


def test_adapter_of_another_model_is_refused(nf4_base, sharded_base, tmp_path):
    _, _, adapter_dir = nf4_base
    with pytest.raises(ExportError, match="another model"):
        export_merged(sharded_base, adapter_dir, tmp_path / "merged")


def test_dora_adapter_is_refused(smollm2_adapter, sharded_base, tmp_path):
    import shutil

    dora = tmp_path / "dora"
    shutil.copytree(smollm2_adapter, dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ExportError, match="DoRA"):
        export_merged(sharded_base, dora, tmp_path / "merged")
