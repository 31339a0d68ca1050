"""nbtune._env: the one reading of nbtune's environment variables (yes/no switches such as
NBTUNE_PATCH, names such as NBTUNE_GPU), and the readers that go through it."""
import pytest

from nbtune._env import PATCH_ENV, env_flag, env_raw, env_text

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


def test_env_text(monkeypatch):
    monkeypatch.delenv(NAME, raising=False)
    assert env_text(NAME) == ""
    monkeypatch.setenv(NAME, "  T4 ")
    assert env_text(NAME) == "T4"


@pytest.mark.parametrize("value,on", [(None, True), ("0", False), (" off", False), ("yes", True), ("junk", True)])
def test_the_patches_and_the_planner_read_nbtune_patch_alike(monkeypatch, value, on):
    pytest.importorskip("torch")
    from nbtune.models.patches import patching_enabled
    from nbtune.planner import plan

    if value is None:
        monkeypatch.delenv(PATCH_ENV, raising=False)
    else:
        monkeypatch.setenv(PATCH_ENV, value)
    assert patching_enabled() is on
    assert plan("llama-3.1-8b", gpu="T4").settings.patched is on


@pytest.mark.parametrize("value,planned", [(None, None), ("", None), ("auto", None), (" T4 ", "T4")])
def test_nbtune_gpu_is_read_once(monkeypatch, value, planned):
    from nbtune.planner import planned_gpu, resolve_gpu

    if value is None:
        monkeypatch.delenv("NBTUNE_GPU", raising=False)
    else:
        monkeypatch.setenv("NBTUNE_GPU", value)
    assert planned_gpu() == planned
    if planned:
        assert resolve_gpu("auto").name == "T4"


def test_the_quiet_switch_reads_through_the_same_function():
    from nbtune import quiet

    assert quiet.env_flag is env_flag


def test_a_read_sees_every_change_of_the_value(monkeypatch):
    """env_raw keeps the last value's text for speed; every way of changing it is seen at once."""
    import os

    monkeypatch.delenv(NAME, raising=False)
    assert env_raw(NAME) is None and env_text(NAME) == ""
    for value in ("a", "a", " b ", "", "é"):
        monkeypatch.setenv(NAME, value)
        assert env_raw(NAME) == value == os.environ.get(NAME)
    os.environ[NAME] = "direct"
    assert env_raw(NAME) == "direct"
    del os.environ[NAME]
    assert env_raw(NAME) is None
    monkeypatch.setattr(os, "environ", {NAME: "replaced"})  # a mapping put in os.environ's place
    assert env_raw(NAME) == "replaced" and env_text(NAME) == "replaced"


def test_the_kernel_mode_follows_the_environment(monkeypatch):
    pytest.importorskip("torch")
    from nbtune.kernels import kernel_mode
    from nbtune.kernels._backend import interpreting

    for value, mode in ((None, "auto"), ("reference", "reference"), (" Triton ", "triton"), ("", "auto")):
        if value is None:
            monkeypatch.delenv("NBTUNE_KERNELS", raising=False)
        else:
            monkeypatch.setenv("NBTUNE_KERNELS", value)
        assert kernel_mode() == mode
    monkeypatch.setenv("NBTUNE_KERNELS", "fast")
    with pytest.raises(ValueError, match="NBTUNE_KERNELS='fast'"):
        kernel_mode()
    for value, on in (("1", True), ("0", False), (" 1", False)):  # as before: exactly "1"
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert interpreting() is on
