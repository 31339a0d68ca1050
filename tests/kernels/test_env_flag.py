"""nbtune.kernels._backend.env_flag: the one reading of yes/no environment variables
(NBTUNE_PATCH, NBTUNE_GC_FREEZE, NBTUNE_OFFLOAD_TIMING)."""
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
