"""nbtune/train/cpu_affinity.py: the kernel's cpulist format, the split of a NUMA node's CPUs among
the GPUs on it by physical core (hyperthread siblings stay together), and the modes' choices."""
import os

import pytest

from nbtune.train import cpu_affinity as ca


def test_parse_cpulist():
    assert ca.parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert ca.parse_cpulist("5") == [5] and ca.parse_cpulist("") == []
    assert ca.format_cpulist([0, 1, 2, 3, 8, 10, 11]) == "0-3,8,10-11"


def _smt_core(cpu):  # 16 cores, 2 threads each: cpu i and i + 16 are siblings (Linux's usual numbering)
    return (0, cpu % 16)


def test_exclusive_share_keeps_siblings_together_and_splits_cores_evenly():
    node = list(range(16)) + list(range(16, 32))
    a = ca.exclusive_share(node, 0, 2, _smt_core)
    b = ca.exclusive_share(node, 1, 2, _smt_core)
    assert a == list(range(8)) + list(range(16, 24)) and b == list(range(8, 16)) + list(range(24, 32))
    assert not {_smt_core(c) for c in a} & {_smt_core(c) for c in b}  # no core in both shares
    three = [ca.exclusive_share(node, i, 3, _smt_core) for i in range(3)]
    assert sorted(c for share in three for c in share) == node
    assert sorted(len(share) // 2 for share in three) == [5, 5, 6]


def test_rank_cpus_modes():
    node0, node1 = [0, 1, 2, 3], [4, 5, 6, 7]
    nodes = [node0, node0, node1]  # GPUs 0 and 1 share node 0, GPU 2 alone on node 1
    single = lambda cpu: ("cpu", cpu)  # noqa: E731 - no hyperthreads
    assert ca.rank_cpus(0, nodes, "off", single) is None
    assert ca.rank_cpus(1, nodes, "node", single) == node0
    assert ca.rank_cpus(0, nodes, "exclusive", single) == [0, 1]
    assert ca.rank_cpus(1, nodes, "exclusive", single) == [2, 3]
    assert ca.rank_cpus(2, nodes, "exclusive", single) == node1
    assert ca.rank_cpus(0, [None, node1], "exclusive", single) is None  # sysfs said nothing


def test_local_cpus_and_cores_from_a_sysfs_tree(tmp_path):
    dev = tmp_path / "pci" / "0000:1b:00.0"
    dev.mkdir(parents=True)
    (dev / "local_cpulist").write_text("0-7,64-71\n")
    assert ca.local_cpus("0000:1b:00.0", str(tmp_path / "pci")) == list(range(8)) + list(range(64, 72))
    assert ca.local_cpus("0000:99:00.0", str(tmp_path / "pci")) is None
    topo = tmp_path / "cpu" / "cpu70" / "topology"
    topo.mkdir(parents=True)
    (topo / "physical_package_id").write_text("1\n")
    (topo / "core_id").write_text("6\n")
    assert ca.physical_core(70, str(tmp_path / "cpu")) == (1, 6)
    assert ca.physical_core(3, str(tmp_path / "cpu")) == ("cpu", 3)


def test_pin_this_rank_checks_the_mode_and_leaves_a_gpu_less_process_alone():
    with pytest.raises(ValueError, match="'nodes'"):
        ca.pin_this_rank(0, "nodes")
    assert ca.pin_this_rank(0, "off") == "cpu affinity: off"
    before = os.sched_getaffinity(0)
    if not __import__("torch").cuda.is_available():
        assert "not applied" in ca.pin_this_rank(0, "exclusive")
    assert os.sched_getaffinity(0) == before or __import__("torch").cuda.is_available()


def test_a_run_pins_itself_only_when_asked(monkeypatch, capsys):
    import torch

    from nbtune.train import distributed

    calls = []
    monkeypatch.setattr(ca, "pin_this_rank", lambda index, mode: calls.append((index, mode)) or f"pinned {mode}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("NBTUNE_CPU_AFFINITY", raising=False)
    distributed.setup_device()
    assert calls == []  # off by default
    monkeypatch.setenv("NBTUNE_CPU_AFFINITY", "Exclusive")
    distributed.setup_device()
    assert calls == [(0, "exclusive")] and "pinned exclusive" in capsys.readouterr().err


def test_an_unknown_mode_names_the_variable(monkeypatch):
    import torch

    from nbtune.train import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NBTUNE_CPU_AFFINITY", "nodes")
    with pytest.raises(distributed.DistributedSetupError, match=r"NBTUNE_CPU_AFFINITY: .*'nodes'.*off, node, exclusive"):
        distributed.setup_device()

