"""The trainer's FLOPs per micro-batch (nbtune/train/flops.py): transformers' figure, with the model's
parameter count taken once per model instead of once per micro-batch."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer

from nbtune.train.flops import ParameterCountOnce


class _Trainer(ParameterCountOnce, Trainer):
    """A Trainer holding just what floating_point_ops reads (its model); the fallback is transformers'."""

    def __init__(self, model):  # not Trainer.__init__: no arguments, no accelerator needed here
        self.model = model


def _model():
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)
    return LlamaForCausalLM(cfg)


def test_same_flops_as_transformers_and_one_parameter_walk(monkeypatch):
    model = _model()
    trainer = _Trainer(model)
    reference = Trainer.floating_point_ops(trainer, {"input_ids": torch.zeros(2, 16, dtype=torch.long)})
    calls = []
    walk = model.num_parameters
    monkeypatch.setattr(model, "num_parameters", lambda **kw: calls.append(kw) or walk(**kw))
    for rows, length in ((2, 16), (3, 7), (2, 16)):
        inputs = {"input_ids": torch.zeros(rows, length, dtype=torch.long)}
        assert trainer.floating_point_ops(inputs) == reference * rows * length // 32
    assert calls == [{"exclude_embeddings": True}]


def test_a_new_model_is_counted_again_and_other_inputs_fall_back():
    trainer = _Trainer(_model())
    inputs = {"input_ids": torch.zeros(1, 8, dtype=torch.long)}
    first = trainer.floating_point_ops(inputs)
    bigger = LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=256))
    trainer.model = bigger
    assert trainer.floating_point_ops(inputs) == 6 * 8 * bigger.num_parameters(exclude_embeddings=True) > first
    assert trainer.floating_point_ops({"inputs_embeds": torch.zeros(1, 8, 128)}) == 0  # transformers' rule
