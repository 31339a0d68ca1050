"""The patched model inside the loops users run: TRL's SFTTrainer (padded and padding-free) and
``load_model`` -> ``add_lora`` on local checkpoints, including a pre-quantized bitsandbytes one."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from tiny_models import tiny_model, word_tokenizer

import nbtune
from nbtune.models import patches
from nbtune.models.patches import common


def sft_losses(patch: bool, padding_free: bool, tmp_path, plans: list):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 20, (16,), generator=generator).tolist()
    data = Dataset.from_list([{"input_ids": torch.randint(3, 128, (n,), generator=generator).tolist()}
                              for n in lengths])
    model = nbtune.add_lora(tiny_model("llama"), r=4, alpha=8, seed=1, patch=patch,
                            gradient_checkpointing="offload" if patch else "off")
    args = SFTConfig(output_dir=str(tmp_path / f"run-{patch}-{padding_free}"), max_steps=2,
                     per_device_train_batch_size=4, learning_rate=1e-3, report_to="none", use_cpu=True,
                     logging_steps=1, padding_free=padding_free, max_length=None if padding_free else 64,
                     disable_tqdm=True, save_strategy="no", seed=0, data_seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=word_tokenizer())
        trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("padding_free", [False, True])
def test_sft_trainer_trains_the_patched_model(padding_free, tmp_path, monkeypatch):
    """TRL (1.16) replaces the CausalLM forward by its own fused LM head, which calls the decoder
    stack (``model.model``): that is nbtune's patched forward, with a plan (packed when padding-free)."""
    plans = []
    build = common.build_plan

    def recording(*args, **kwargs):
        plan = build(*args, **kwargs)
        plans.append(plan)
        return plan

    monkeypatch.setattr(common, "build_plan", recording)
    ours = sft_losses(True, padding_free, tmp_path, plans)
    assert len(plans) >= 2 and all(p is not None for p in plans)
    assert all(p.packed for p in plans) == padding_free
    ref = sft_losses(False, padding_free, tmp_path, plans)
    assert len(ours) == len(ref) == 2
    assert abs(ours[0] - ref[0]) / ref[0] < 1e-4, (ours, ref)
    assert abs(ours[1] - ref[1]) / ref[1] < 1e-3, (ours, ref)  # after one AdamW step


def save_checkpoint(path, kind="llama", quantized=False):
    model = tiny_model(kind)
    if quantized:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        model.save_pretrained(path / "fp32")
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(path / "fp32", quantization_config=quant, dtype=torch.float32)
    model.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def test_load_model_records_patch_switch_and_add_lora_honours_it(tmp_path):
    path = save_checkpoint(tmp_path)
    model, tokenizer = nbtune.load_model(str(path), max_seq_length=64, device="cpu", patch=False)
    assert model.nbtune_patch is False and next(model.parameters()).dtype == torch.float32  # dtype auto on CPU
    assert not patches.is_patched(nbtune.add_lora(model, r=4))
    model, _ = nbtune.load_model(str(path), max_seq_length=64, device="cpu")
    assert patches.is_patched(nbtune.add_lora(model, r=4))


def test_prequantized_bnb_checkpoint_loads_as_stored_and_trains(tmp_path):
    from bitsandbytes.nn import Linear4bit

    path = save_checkpoint(tmp_path, quantized=True)
    assert json.loads((path / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsandbytes"
    model, tokenizer = nbtune.load_model(str(path), max_seq_length=64, device="cpu")
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 14  # 7 projections x 2 layers, as stored
    # the checkpoint says bfloat16; the dtype chosen for this device (fp32 on a CPU) wins
    assert all(m.compute_dtype == torch.float32 for m in layers)
    peft_model = nbtune.add_lora(model, r=4, alpha=8)
    assert patches.is_patched(peft_model)
    assert all(p.dtype == torch.float32 for p in peft_model.parameters() if p.requires_grad)
    ids = torch.randint(3, 120, (2, 12))
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_A" in n]
    assert torch.isfinite(loss) and grads and all(g is not None for g in grads)


def test_load_adapter_round_trip(tmp_path):
    path = save_checkpoint(tmp_path / "base")
    model, _ = nbtune.load_model(str(path), max_seq_length=64, device="cpu")
    trained = nbtune.add_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    trained.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(3, 120, (1, 10))
    trained.eval()
    with torch.no_grad():
        want = trained(input_ids=ids).logits
    base, _ = nbtune.load_model(str(path), max_seq_length=64, device="cpu")
    loaded = nbtune.load_adapter(base, tmp_path / "adapter").eval()
    assert patches.is_patched(loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
