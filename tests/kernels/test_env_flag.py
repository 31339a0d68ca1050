"""nbtune._env.env_flag (re-exported by nbtune.kernels._backend): the one reading of yes/no
environment variables (NBTUNE_PATCH, NBTUNE_GC_FREEZE, NBTUNE_OFFLOAD_TIMING, NBTUNE_VERBOSE)."""
import pytest

from nbtune.kernels._backend import env_flag

NAME = "NBTUNE_TEST_FLAG"


@pytest.mark.parametrize("value,on_by_default,off_by_default", [
    (None, True, False),  # unset
    ("", True, False),
    ("0", False, False), ("false", False, False), (" No ", False, False), ("OFF", False, False),
    ("1", True, True), ("true", True, True), (" Yes", True, True), ("ON", True, True),
    ("maybe", True, False),  # unrecognised: the default
])
def test_env_flag(monkeypatch, value, on_by_default, off_by_default):
    if value is None:
        monkeypatch.delenv(NAME, raising=False)
    else:
        monkeypatch.setenv(NAME, value)
    assert env_flag(NAME, default=True) is on_by_default
    assert env_flag(NAME, default=False) is off_by_default


def test_one_reader():
    """The kernels' switches and the torch-free ones (nbtune.quiet) read through the same function."""
    from nbtune import _env, quiet

    assert env_flag is _env.env_flag and quiet.env_flag is _env.env_flag
