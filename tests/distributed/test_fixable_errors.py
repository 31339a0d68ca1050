"""One rule for which errors the notebook doors show as their message alone: the magic judges the
error it catches, the data-parallel launcher judges each rank's error (recorded in its report)."""
import json

import pytest

from nbtune.planner.plan import DoesNotFitError
from nbtune.train.config import ConfigError
from nbtune.train.disk import DiskFullError
from nbtune.train.distributed import DistributedSetupError
from nbtune.train.oom import GPUOutOfMemoryError
from nbtune.train.stability import TrainingDivergedError
from nbtune.ui.fixable import is_fixable
from nbtune.ui.launch import LaunchError, _ranks_failed


@pytest.mark.parametrize("error", [
    ConfigError("train.lr: must be > 0"),
    GPUOutOfMemoryError("CUDA out of memory at step 3: lower train.batch_size", "train", 3, "lower batch_size"),
    TrainingDivergedError("loss is nan at steps 4, 5, 6: lower train.lr", [4, 5, 6], None, None),
    DistributedSetupError("model on cuda:1, this rank's GPU is cuda:0"),
    DoesNotFitError("predicted 17.2 GiB on a T4 (14.7): set train.batch_size: 1", plan=None),
    LaunchError("rank 1: train.lr: must be > 0", fixable=True),
    DiskFullError("the disk is full (ENOSPC: No space left on device) writing adapter/README.md", None, None),
])
def test_errors_the_user_fixes(error):
    assert is_fixable(error)


def test_other_errors_keep_their_traceback():
    assert not is_fixable(RuntimeError("CUDA error: an illegal memory access"))
    assert not is_fixable(LaunchError("rank 0 failed: KeyError"))
    ConfigErrorElsewhere = type("ConfigError", (ValueError,), {"__module__": "someone_else"})
    assert not is_fixable(ConfigErrorElsewhere("same name, not nbtune's"))


def _report(folder, rank, error, traceback="Traceback (most recent call last):\n  ...\n"):
    (folder / f"error-rank{rank}.json").write_text(json.dumps(dict(
        rank=rank, type=type(error).__name__, message=str(error), fixable=is_fixable(error), traceback=traceback)))


def test_a_ranks_oom_reaches_the_notebook_as_its_message(tmp_path):
    oom = GPUOutOfMemoryError("CUDA out of memory at step 3 (train): lower train.batch_size to 1", "train", 3, "")
    _report(tmp_path, 0, RuntimeError("NCCL watchdog: rank 1 is gone"))
    _report(tmp_path, 1, oom)
    error = _ranks_failed(tmp_path, None)
    assert error.fixable and str(error) == str(oom)  # the rank that says what to change, not the first one
    assert is_fixable(error)


def test_an_unexpected_rank_error_keeps_rank_type_and_traceback(tmp_path):
    _report(tmp_path, 1, KeyError("input_ids"), traceback="Traceback (most recent call last):\n  File x, line 3\nKeyError\n")
    error = _ranks_failed(tmp_path, None)
    assert not error.fixable
    assert "rank 1 of the data-parallel run failed: KeyError" in str(error) and "File x, line 3" in str(error)


def _raiser(error):
    def cmd(args):
        raise error
    return cmd


@pytest.mark.parametrize("error,code,printed", [
    (ConfigError("invalid nbtune config:\n  train.lr: must be > 0\n  lora.r: must be > 0"), 2,
     "invalid nbtune config: train.lr: must be > 0; lora.r: must be > 0"),
    (DistributedSetupError("model on cuda:1, this rank's GPU is cuda:0"), 2, "model on cuda:1"),
    (DoesNotFitError("predicted not to fit:\nplan\nset train.batch_size: 1", plan=None), 2,
     "predicted not to fit:\nplan\nset train.batch_size: 1"),
    (GPUOutOfMemoryError("CUDA out of memory at step 3: lower train.batch_size", "train", 3, ""), 1,
     "CUDA out of memory at step 3"),
    (TrainingDivergedError("loss is nan at steps 4, 5, 6: lower train.lr", [4, 5, 6], None, None), 1, "loss is nan"),
])
def test_the_command_line_ends_a_fixable_error_with_its_message_and_exit_code(error, code, printed, monkeypatch,
                                                                               capsys):
    """The same list decides at the command line: bad input and the planner's no exit 2, a run that
    stopped on what the user changes exits 1, each with its message alone."""
    from nbtune.ui import cli

    monkeypatch.setattr(cli, "cmd_pull", _raiser(error))
    assert cli.main(["pull"]) == code
    err = capsys.readouterr().err
    assert err.startswith("nbtune: error: ") and printed in err and "Traceback" not in err


def test_the_command_line_keeps_the_traceback_of_other_errors(monkeypatch):
    from nbtune.ui import cli

    monkeypatch.setattr(cli, "cmd_pull", _raiser(KeyError("input_ids")))
    with pytest.raises(KeyError):
        cli.main(["pull"])
