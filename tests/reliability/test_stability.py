"""NaN / inf during training (issue 8), in real runs of the tiny model: a step whose loss or
gradients are not finite is skipped, not trained on; NaN/inf for ``train.max_nonfinite_steps``
steps in a row stops the run with a message naming the steps, and the last good checkpoint and
the adapter of the last good step are kept (and resumable).

Faults are injected with a forward hook on the first decoder layer, counted in training forwards
(batch 1, grad_accum 1, no checkpointing: one forward per optimizer step): ``nan`` multiplies the
layer's output by NaN (the loss is NaN), ``inf_grad`` leaves the forward alone and multiplies the
gradient flowing back through it by inf (a finite loss with overflowing gradients).
On a GPU, the same faults under fp16 loss scaling (marker ``gpu``; on the download-free tiny
model, ``offline_model_dir``).
"""
import json

import pytest
import torch
from safetensors.torch import load_file

import nbtune
from nbtune.train.checkpoint import complete_checkpoints
from nbtune.train.metrics import read_log
from nbtune.train.stability import TrainingDivergedError

from .conftest import snapshot, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore")


class Fault:
    """A forward hook on a decoder layer that corrupts chosen training forwards (1-based)."""

    def __init__(self, model, faults: dict):
        self.faults = faults  # forward number -> "nan" | "inf_grad"; a callable for "from then on"
        self.calls = 0
        self.handle = model.model.layers[0].register_forward_hook(self)

    def __call__(self, module, args, output):
        if not module.training:
            return None
        self.calls += 1
        kind = self.faults(self.calls) if callable(self.faults) else self.faults.get(self.calls)
        hidden = output[0] if isinstance(output, tuple) else output
        if kind == "nan":
            hidden = hidden * float("nan")
        elif kind == "inf_grad":
            hidden = hidden * 1.0
            hidden.register_hook(lambda g: g * float("inf"))
        else:
            return None
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def lora_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class Recorder:
    """A metrics listener keeping the LoRA weights as they are after each logged step."""

    def __init__(self, model_ref):
        self.model_ref = model_ref  # () -> the PeftModel (it exists once training started)
        self.after = {}

    def __call__(self, rec):
        if rec.get("event") == "train" and "loss" in rec:
            self.after[rec["step"]] = lora_state(self.model_ref())


def loaded(model_dir, **kw):
    return nbtune.load_model(str(model_dir), max_seq_length=64, **kw)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def all_finite(state: dict) -> bool:
    return all(torch.isfinite(t).all() for t in state.values())


def test_nonfinite_steps_are_skipped_and_the_run_goes_on(tiny_model_dir, tiny_data, tmp_path, capfd):
    model, tok = loaded(tiny_model_dir)
    fault = Fault(model, {2: "nan", 4: "inf_grad"})
    rec = Recorder(lambda: model)
    out = tmp_path / "transient"
    cfg = tiny_config(tiny_model_dir, tiny_data, out, max_steps=5, save_steps=1)
    cfg["output"]["keep_checkpoints"] = 10
    result = nbtune.finetune(cfg, model=model, tokenizer=tok, listeners=[rec], dashboard=False, progress=False)
    fault.handle.remove()
    err = capfd.readouterr().err
    assert result.steps == 5 and fault.calls == 5
    after = rec.after
    assert same(after[2], after[1]) and same(after[4], after[3])  # the bad steps changed nothing
    assert not same(after[3], after[2]) and not same(after[5], after[4])  # the good ones trained
    assert all(all_finite(s) for s in after.values())
    skipped = [r for r in read_log(result.log_path) if r["event"] == "skipped"]
    assert [(r["step"], r["reason"]) for r in skipped] == [
        (2, "the loss is NaN/inf; step skipped"), (4, "the gradients are NaN/inf; step skipped")]
    assert "nbtune: step 2: the loss is NaN/inf; step skipped (not trained on)" in err
    # no checkpoint of a skipped step; the good ones are all there
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-1", "checkpoint-3", "checkpoint-5"]
    assert all(r.get("loss") is None or r["loss"] == r["loss"] for r in result.metrics)  # no NaN in the log


def test_persistent_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_model_dir, tiny_data, tmp_path):
    model, tok = loaded(tiny_model_dir)
    fault = Fault(model, lambda n: "nan" if n >= 3 else None)
    out = tmp_path / "diverged"
    seen = {}

    def keep_checkpoint_2(rec):  # checkpoint-2 as written, before anything bad happened
        if rec.get("event") == "train" and rec.get("step") == 3:
            seen["checkpoint-2"] = snapshot(out / "checkpoints" / "checkpoint-2")

    rec = Recorder(lambda: model)
    cfg = tiny_config(tiny_model_dir, tiny_data, out, max_steps=8, save_steps=1)
    with pytest.raises(TrainingDivergedError) as info:
        nbtune.finetune(cfg, model=model, tokenizer=tok, listeners=[rec, keep_checkpoint_2], dashboard=False,
                        progress=False)
    fault.handle.remove()
    err = info.value
    msg = str(err)
    ckpt = out / "checkpoints" / "checkpoint-2"
    assert "training stopped at step 5" in msg and "NaN/inf at steps 3, 4, 5" in msg
    assert "train.max_nonfinite_steps: 3" in msg and "skipped, not trained on" in msg
    assert f"the last good checkpoint {ckpt}" in msg and "resume=True" in msg
    assert f"the adapter of step 2 in {out / 'adapter'}" in msg and "lower train.lr (now 0.01)" in msg
    assert err.steps == [3, 4, 5] and err.checkpoint == ckpt and fault.calls == 5
    # the last good checkpoint is intact and still the latest; no checkpoint of a bad step
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    assert snapshot(ckpt) == seen["checkpoint-2"]
    # the adapter saved is step 2's, finite, equal to the checkpoint's
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    kept = load_file(ckpt / "adapter_model.safetensors")
    assert saved.keys() == kept.keys() and all(torch.equal(saved[k], kept[k]) for k in saved)
    assert same(rec.after[5], rec.after[2]) and all_finite(rec.after[5])
    log = read_log(out / "metrics.jsonl")
    assert [r["step"] for r in log if r["event"] == "skipped"] == [3, 4, 5]
    diverged = [r for r in log if r["event"] == "diverged"]
    assert len(diverged) == 1 and diverged[0]["step"] == 5 and diverged[0]["last_good_step"] == 2

    # nothing was lost: with the fault gone, resume continues from checkpoint-2 to the end
    resumed = nbtune.finetune(cfg, resume=True, reuse_model=False, dashboard=False, progress=False)
    assert resumed.resumed_from == 2 and resumed.steps == 8 and not resumed.interrupted
    steps = [r["step"] for r in resumed.metrics if r["event"] == "train" and "loss" in r]
    assert steps == list(range(1, 9))


def test_the_limit_is_configurable_and_the_error_keeps_no_trainer(offline_model_dir, tiny_data, tmp_path,
                                                                   monkeypatch):
    """(On the download-free tiny model that the GPU tests use, so CI runs it too.)"""
    import gc
    import weakref

    import transformers

    trainers = []
    real_init = transformers.Trainer.__init__

    def tracked_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        trainers.append(weakref.ref(self))

    monkeypatch.setattr(transformers.Trainer, "__init__", tracked_init)
    model, tok = loaded(offline_model_dir)
    fault = Fault(model, lambda n: "nan" if n >= 2 else None)
    cfg = tiny_config(offline_model_dir, tiny_data, tmp_path / "patience-1", max_steps=6, max_nonfinite_steps=1)
    with pytest.raises(TrainingDivergedError, match="training stopped at step 2") as info:
        nbtune.finetune(cfg, model=model, tokenizer=tok, dashboard=False, progress=False)
    fault.handle.remove()
    assert info.value.steps == [2] and info.value.checkpoint is None  # no save_steps: no checkpoint to keep
    assert "Kept: the adapter of step 1" in str(info.value)
    gc.collect()  # the error is still held (as a notebook holds the last one): the trainer is not
    assert trainers and all(ref() is None for ref in trainers)


def test_the_cli_says_it_in_one_line(tiny_model_dir, tiny_data, tmp_path, capsys, monkeypatch):
    """The CLI loads its own model: the fault is injected on whatever model transformers loads."""
    import transformers
    import yaml

    from nbtune.ui.cli import main

    real = transformers.AutoModelForCausalLM.from_pretrained
    faults = []

    def load_with_fault(*args, **kwargs):
        m = real(*args, **kwargs)
        faults.append(Fault(m, lambda n: "nan"))
        return m

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", load_with_fault)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, tiny_data, tmp_path / "cli", max_steps=5)))
    capsys.readouterr()
    from nbtune.train import session

    session.clear()
    code = main(["finetune", str(path)])
    session.clear()
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("nbtune: error:")]
    assert code == 1 and len(errors) == 1 and "training stopped at step 3" in errors[0], errors
    assert "Kept: nothing (no good step yet)" in errors[0]
    assert not (tmp_path / "cli" / "adapter").exists()  # no good step: no adapter written
    assert json.loads((tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()[-1])["event"] == "diverged"


# ----------------------------------------------------------------------------- fp16 on a GPU
@pytest.mark.gpu
def test_fp16_overflow_is_skipped_by_the_loss_scaler_and_not_trained_on(offline_model_dir, tiny_data, tmp_path):
    model, tok = loaded(offline_model_dir, dtype="float16")
    fault = Fault(model, {3: "inf_grad"})
    rec = Recorder(lambda: model)
    cfg = tiny_config(offline_model_dir, tiny_data, tmp_path / "fp16", max_steps=6)
    cfg["model"]["dtype"] = "float16"
    result = nbtune.finetune(cfg, model=model, tokenizer=tok, listeners=[rec], dashboard=False, progress=False)
    fault.handle.remove()
    assert result.steps == 6  # overflows are the scaler's business: no stop
    skipped = {r["step"]: r for r in read_log(result.log_path) if r["event"] == "skipped"}
    assert 3 in skipped and "fp16 gradients overflowed at loss scale" in skipped[3]["reason"]
    assert skipped[3]["loss_scale"] >= 1
    assert same(rec.after[3], rec.after[2]) and all(all_finite(s) for s in rec.after.values())
    good = [s for s in range(2, 7) if s not in skipped]
    assert any(not same(rec.after[s], rec.after[s - 1]) for s in good)  # the other steps trained


@pytest.mark.gpu
def test_fp16_persistent_nan_stops_with_the_last_good_checkpoint(offline_model_dir, tiny_data, tmp_path):
    model, tok = loaded(offline_model_dir, dtype="float16")
    fault = Fault(model, lambda n: "nan" if n >= 3 else None)
    out = tmp_path / "fp16-nan"
    cfg = tiny_config(offline_model_dir, tiny_data, out, max_steps=8, save_steps=1)
    cfg["model"]["dtype"] = "float16"
    with pytest.raises(TrainingDivergedError, match="training stopped at step 5") as info:
        nbtune.finetune(cfg, model=model, tokenizer=tok, dashboard=False, progress=False)
    fault.handle.remove()
    assert info.value.steps == [3, 4, 5]
    names = [p.name for p in complete_checkpoints(out)]  # (a natural overflow at step 1 or 2 is not saved)
    assert names and names[-1] in ("checkpoint-1", "checkpoint-2") and info.value.checkpoint.name == names[-1]


def test_the_progress_lines_go_on_after_a_skipped_step(tiny_model_dir, tiny_data, tmp_path, capfd):
    """A NaN step's record carries loss None (JSON has no NaN): the terminal view prints it as a
    skipped step and keeps printing; it is not turned off as a failing listener. The steps after it
    log their own finite losses (the Trainer's running loss sum does not stay NaN)."""
    import io

    from nbtune.train.progress import TerminalProgress

    model, tok = loaded(tiny_model_dir)
    fault = Fault(model, {2: "nan"})
    lines = io.StringIO()
    cfg = tiny_config(tiny_model_dir, tiny_data, tmp_path / "progress", max_steps=4)
    result = nbtune.finetune(cfg, model=model, tokenizer=tok, listeners=[TerminalProgress(lines)], dashboard=False,
                             progress=False)
    fault.handle.remove()
    err = capfd.readouterr().err
    assert result.steps == 4 and "turned off" not in err, err
    steps = [line for line in lines.getvalue().splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in steps] == ["step 1/4", "step 2/4", "step 3/4", "step 4/4"], steps
    assert "loss nan/inf (skipped)" in steps[1] and all("loss nan" not in s for s in steps[2:])
    losses = {r["step"]: r["loss"] for r in result.metrics if r["event"] == "train" and "loss" in r}
    assert losses[2] is None and all(isinstance(losses[s], float) for s in (1, 3, 4)), losses
    assert "training done at step 4" in lines.getvalue()


# ----------------------------------------------------------------------------- the verdict itself
def _judge(guard, model, loss, norm=None, handed=True):
    """One optimizer step through the guard's hooks: whether it skipped the step."""
    from transformers import TrainerControl, TrainerState

    state, control = TrainerState(), TrainerControl()
    state.max_steps = 10
    guard.on_step_begin(None, state, control)
    guard.record_loss(loss)
    if handed:
        guard.record_grad_norm(norm)
    before = len(guard.skipped)
    guard.on_pre_optimizer_step(None, state, control, model=model, optimizer=None)
    return len(guard.skipped) > before


def _model_with_grads(poison=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    model[1].requires_grad_(False)  # frozen weights: never a gradient
    model(torch.randn(4, 8)).pow(2).sum().backward()
    if poison is not None:
        model[2].weight.grad[0, 1] = poison
    return model


@pytest.mark.parametrize("poison", [None, float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("loss", [1.5, float("nan")])
def test_the_norm_handed_over_judges_as_the_gradients_do(poison, loss):
    """The trainer hands over the pre-clip norm (what ``_clip_grad_norm`` returns); without it the
    guard reads the listed gradients in one pass. Either way a step is skipped exactly when the loss
    or a gradient of a trainable parameter is NaN/inf, and a skipped step's gradients are dropped."""
    from nbtune.train.stability import NonFiniteGuard

    bad = poison is not None or loss != loss
    for handed in (True, False):
        model = _model_with_grads(poison)
        trainable = [p for p in model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(trainable, 1.0)  # the trainer's clipping, before the guard
        guard = NonFiniteGuard(patience=5)
        assert _judge(guard, model, torch.tensor(loss), norm, handed) == bad
        assert all((p.grad is None) == bad for p in trainable)
        if bad:
            reason = "the loss is NaN/inf" if loss != loss else "the gradients are NaN/inf"
            assert guard.skipped[-1]["reason"] == reason + "; step skipped"


def test_the_verdict_is_the_only_value_read_and_the_parameters_are_listed_once(monkeypatch):
    from nbtune.train.stability import NonFiniteGuard

    model = _model_with_grads()
    guard = NonFiniteGuard()
    walks = []
    listing = torch.nn.Module.parameters
    monkeypatch.setattr(torch.nn.Module, "parameters",
                        lambda self, recurse=True: walks.append(self) or listing(self, recurse))
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _real=real, _name=name, **k:
                            reads.append(_name) or _real(t, *a, **k))
    for step in range(3):
        norm = torch.nn.utils.get_total_norm([p.grad for p in listing(model) if p.grad is not None])
        assert not _judge(guard, model, torch.tensor(1.0), norm, handed=step != 1)
    assert reads == ["tolist"] * 3  # one read of the verdict per step (on a GPU: the one sync)
    assert walks == [model]  # the trainable parameters listed once, not at every step
