"""benchmarks/ddp_profile.py: the wrapped training_step profiles exactly the asked micro-batches of a
real ``nbtune finetune`` (CPU here; the GPU run adds the CUDA kernels and the synchronizing lines)."""
import re
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import ddp_profile  # noqa: E402


def test_busy_time_is_the_union_of_intervals():
    assert ddp_profile._busy_us([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17
    assert ddp_profile._busy_us([]) == 0


class _TimedEvent:
    """Stands in for a timed CUDA event: the GPU reached it ``at_ms`` after the reference event."""

    def __init__(self, at_ms):
        self.at_ms = at_ms

    def elapsed_time(self, other):
        return other.at_ms - self.at_ms


def test_gpu_span_and_lag_put_the_gpu_events_on_the_host_clock():
    prof = ddp_profile.MicroBatchProfiler("/tmp", skip=5, active=1)
    prof.gpu_ref = (100.0, _TimedEvent(0.0))  # recorded on an empty queue at host time 100 s
    prof.marks = [(100.0, 100.3), (100.31, 100.6)]  # host: two calls of 300 and 290 ms
    prof.gpu_marks = [[_TimedEvent(1.0), _TimedEvent(330.0)], [_TimedEvent(330.0), _TimedEvent(650.0)]]
    (a0, a1), (b0, b1) = prof.gpu_times()
    assert (a0, a1, b0, b1) == (100.001, 100.33, 100.33, 100.65)
    rows = prof.timeline().splitlines()[1:]
    assert re.search(r"gpu span\s+329\.0\s+lag\s+30\.0", rows[0])  # the GPU finished 30 ms after the host
    assert re.search(r"gpu span\s+320\.0\s+lag\s+50\.0", rows[1])
    prof.call_steps = [0, 1]
    prof.marks.append((100.7, 100.9))
    prof.gpu_marks.append([_TimedEvent(700.0), _TimedEvent(900.0)])
    prof.call_steps.append(1)
    steps = prof.steps().splitlines()[1:]
    assert len(steps) == 1 and re.search(r"step\s+0: 1 calls, host\s+310\.0\s+gpu\s+329\.0\s+lag\s+30\.0", steps[0])
    prof.gpu_marks[1][1] = None  # a call whose end was not recorded has no GPU columns
    assert "gpu span" not in prof.timeline().splitlines()[2]


def _patched_methods():
    import gc

    import transformers
    import trl
    from transformers import trainer_callback

    owners = (trl.SFTTrainer, transformers.Trainer, trainer_callback.CallbackHandler)
    return {(o.__name__, k): v for o in owners for k, v in vars(o).items() if callable(v)}, list(gc.callbacks)


def test_profiles_the_window_of_a_real_finetune(word_model, tmp_path):
    before = _patched_methods()
    model_dir, data = word_model
    cfg = {"model": {"name": str(model_dir), "max_seq_length": 64, "load_in_4bit": False, "dtype": "float32"},
           "data": {"source": str(data), "format": "text", "responses_only": False, "eval_split": None},
           "lora": {"r": 4, "alpha": 8},
           "train": {"max_steps": 3, "batch_size": 2, "grad_accum": 2, "lr": 1e-3, "warmup_steps": 0,
                     "gradient_checkpointing": "plain", "seed": 1, "save_steps": None, "force": True},
           "output": {"dir": str(tmp_path / "run")}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "profile"
    assert ddp_profile.main([str(path), "--out", str(out), "--skip", "2", "--active", "3"]) == 0
    text = (out / "profile-1gpu-rank0.txt").read_text()
    head = text.splitlines()[0]
    assert re.match(r"# rank 0 of 1: 3 micro-batches, wall [0-9.]+ s", head), head
    assert "## top CPU ops by self time" in text and "aten::" in text
    phases = text[text.index("## loop phases"):]
    assert all(name in phases for name in ("get_batch_samples", "on_pre_optimizer_step", "optimizer.step"))
    assert re.search(r"## garbage collector over the run: .*training gen0: [0-9]+ collections", text)
    assert len(re.findall(r"<- profiled", text)) == 3
    assert ddp_profile.short_path.__module__ == "relpaths" and str(Path(ddp_profile.__file__).parents[1]) not in text
    assert _patched_methods() == before  # the trainer's methods and the collector's callbacks as they were


def test_profile_text_names_files_relative_to_the_repo_or_the_install_folder():
    """The synchronizing lines are written without the machine's folders: a repo file from the repo
    root, an installed package's file from the folder it is installed in."""
    import json
    import warnings

    import torch

    import nbtune
    from relpaths import REPO, relativize, short_path

    assert short_path(nbtune.__file__) == "nbtune/__init__.py"
    assert short_path(torch.__file__) == "torch/__init__.py"
    assert short_path(json.__file__) == "json/__init__.py"
    assert short_path("<string>") == "<string>"
    prof = ddp_profile.MicroBatchProfiler("unused", skip=0, active=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("called a synchronizing CUDA operation")  # a real warning, from this file
        warnings.warn("something else")
    prof.record_sync_lines(caught)
    (where, n), = prof.sync_lines.items()
    assert n == 1 and where.startswith("tests/benchmarks/test_ddp_profile.py:"), where
    text = f"{nbtune.__file__}:1(<module>) and {torch.__file__}:2(f)"
    assert relativize(text) == "nbtune/__init__.py:1(<module>) and torch/__init__.py:2(f)"
    assert REPO not in relativize(text)
