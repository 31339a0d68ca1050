"""The LoRA weights a run trains stay fp32 on a 4-bit base (issue 8, fp16 loss scaling).

TRL's ``SFTTrainer.__init__`` (1.16) casts every trainable parameter of a model that is
``is_loaded_in_4bit`` (or 8-bit) to bf16, whatever the run's precision. On a GPU nbtune loads in
4 bits by default, so an fp16 run (a T4, or ``model.dtype: float16``) handed the fp16 loss scaler
bf16 gradients, which it cannot unscale (``_amp_foreach_non_finite_check_and_unscale_cuda`` has
no bf16), and a bf16 run trained bf16 adapters. The cast does not depend on the device: here a
real bitsandbytes 4-bit model (its CPU backend, a pre-quantized checkpoint) shows it on a CPU.
"""
import warnings

import pytest
import torch

import nbtune

from .conftest import tiny_config

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def quantized_dir(offline_model_dir, tmp_path_factory):
    """``offline_model_dir``'s model saved pre-quantized by bitsandbytes (NF4), with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    path = tmp_path_factory.mktemp("offline-llama-4bit")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(offline_model_dir, quantization_config=quant, dtype=torch.float32)
        model.save_pretrained(path)
    AutoTokenizer.from_pretrained(offline_model_dir).save_pretrained(path)
    return path


def test_the_optimizer_of_a_4bit_run_holds_fp32_lora_weights(quantized_dir, tiny_data, tmp_path, monkeypatch):
    import transformers

    optimizers = []
    real_create = transformers.Trainer.create_optimizer

    def tracked_create(self, *args, **kwargs):
        optimizers.append(real_create(self, *args, **kwargs))
        return optimizers[-1]

    monkeypatch.setattr(transformers.Trainer, "create_optimizer", tracked_create)
    model, tok = nbtune.load_model(str(quantized_dir), max_seq_length=64, device="cpu")
    assert model.is_loaded_in_4bit  # what makes TRL cast
    cfg = tiny_config(quantized_dir, tiny_data, tmp_path / "run", max_steps=2)
    result = nbtune.finetune(cfg, model=model, tokenizer=tok, dashboard=False, progress=False)
    assert result.steps == 2
    trained = {n: p for n, p in result.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert {p.dtype for p in trained.values()} == {torch.float32}, {n: p.dtype for n, p in trained.items()}
    (optimizer,) = optimizers
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in params} == {id(p) for p in trained.values()}  # the optimizer trains these very tensors
    moments = [optimizer.state[p]["exp_avg"] for p in params]
    assert len(moments) == len(params) and {m.dtype for m in moments} == {torch.float32}
