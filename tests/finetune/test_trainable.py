"""Gradients cleared and clipped over the trainable parameters, listed once per run
(nbtune/train/trainable.py): the same run as with transformers' walks over the whole model."""
import torch
from transformers import Trainer

import nbtune
from nbtune.train.trainable import TrainableOnly, trainable_parameters, zero_grads

from .conftest import tiny_config


def test_zero_grads_is_module_zero_grad_over_the_listed_parameters():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    listed = trainable_parameters(model)
    assert [p is q for p, q in zip(listed, [model[0].bias, model[1].weight, model[1].bias])] == [True] * 3
    model(torch.randn(3, 4)).sum().backward()
    assert model[0].weight.grad is None and all(p.grad is not None for p in listed)
    zero_grads(listed, set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() and not p.grad.requires_grad for p in listed)
    zero_grads(listed)
    assert all(p.grad is None for p in model.parameters())


class Spy:
    """Counts Module.zero_grad's walks of the whole model and checks what each clipping got."""

    def __init__(self, monkeypatch):
        self.walks = 0
        self.clips = []  # (tensors clipped, their norm over the list == the norm over every parameter)
        walk = torch.nn.Module.zero_grad

        def counted(module, set_to_none=True):
            if hasattr(module, "peft_config"):
                self.walks += 1
            return walk(module, set_to_none)

        monkeypatch.setattr(torch.nn.Module, "zero_grad", counted)

    def after_step(self, model):
        return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]


def _run(tiny_model_dir, tiny_data, out, monkeypatch, ours: bool):
    import accelerate

    spy = Spy(monkeypatch)
    if not ours:  # transformers' own zero_grad and clipping
        monkeypatch.setattr(TrainableOnly, "_prepare_for_training",
                            lambda self, *a, **k: Trainer._prepare_for_training(self, *a, **k))
    clip = accelerate.Accelerator.clip_grad_norm_

    def clip_and_check(acc, parameters, max_norm, norm_type=2):
        parameters = list(parameters)
        grads = [p.grad for p in parameters if p.grad is not None]
        everywhere = [p.grad for p in model.parameters() if p.grad is not None]
        spy.clips.append((len(parameters), torch.equal(torch.nn.utils.get_total_norm(grads),
                                                       torch.nn.utils.get_total_norm(everywhere))))
        return clip(acc, parameters, max_norm, norm_type)

    monkeypatch.setattr(accelerate.Accelerator, "clip_grad_norm_", clip_and_check)
    model, tok = nbtune.load_model(str(tiny_model_dir), max_seq_length=64)
    left = []

    def after_each_step(rec):
        if rec.get("event") == "train":
            left.append(spy.after_step(model))

    result = nbtune.finetune(tiny_config(tiny_model_dir, tiny_data, out), model=model, tokenizer=tok,
                             listeners=[after_each_step], dashboard=False, progress=False)
    monkeypatch.undo()
    train = [(r["step"], r["loss"], r["grad_norm"]) for r in result.metrics if r.get("event") == "train"
             and "loss" in r]
    return train, spy, left, model


def test_same_run_as_transformers_with_one_walk_of_the_model(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    ours, spy, left, model = _run(tiny_model_dir, tiny_data, tmp_path / "ours", monkeypatch, True)
    theirs, their_spy, _, _ = _run(tiny_model_dir, tiny_data, tmp_path / "theirs", monkeypatch, False)
    assert ours == theirs and len(ours) == 4  # same losses and gradient norms, step by step
    assert left == [[]] * 4  # after every step no trainable parameter holds a gradient
    trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert trainable > 0 and spy.clips == [(trainable, True)] * 4  # the listed parameters, the same norm
    assert all(n > trainable for n, _ in their_spy.clips)  # transformers hands every parameter over
    assert spy.walks == 1 and their_spy.walks >= 5  # once when training starts, not once per step
    assert "zero_grad" not in vars(model)  # the model's own zero_grad is back after the run
