"""Keeping each rank's host threads on the CPU cores next to its GPU.

A QLoRA micro-batch of a 7-8B model is launched from Python: thousands of kernel launches, whose
host time comes close to the GPU time of the kernels themselves. A rank's main thread runs flat out
all step, and under data parallel several such threads share the machine. On a host with several
NUMA nodes the scheduler may move them away from the GPU they drive and from the memory they
allocated. On a host with hyperthreads it may put one onto the sibling of another rank's busy core.
Either makes a thread slower.

On a 2 x H200 host with one NUMA node and one thread per core there was nothing to gain (two runs
side by side were as fast as one alone, pinned or not: benchmarks/NOTES.md, "Multi-GPU"). So this
stays off unless asked for (``NBTUNE_CPU_AFFINITY``,
read by nbtune/train/distributed.py). It is meant for multi-socket hosts and for
``%%finetune --gpus N``, where no launcher flag (torchrun's ``--numa-binding``, accelerate's NUMA
affinity) can be given.

``pin_this_rank(local_rank, mode)`` restricts this process to:

- ``"node"``: every CPU of the NUMA node its GPU hangs off (``local_cpulist`` of the GPU's PCI
  device in sysfs);
- ``"exclusive"``: its own share of those CPUs. The GPUs that share a node split its *physical
  cores* evenly (in GPU order), and a rank takes every hardware thread of its cores, so no two
  ranks meet on one core.

Both are intersected with the CPUs the process may use already (a container's cpuset, say). Where
sysfs or the GPU's PCI address is not available, nothing changes and the reason is returned.
"""
from __future__ import annotations

import os

MODES = ("off", "node", "exclusive")
SYSFS_PCI = "/sys/bus/pci/devices"
SYSFS_CPU = "/sys/devices/system/cpu"


def parse_cpulist(text: str) -> list[int]:
    """``"0-3,8,10-11"`` (the kernel's cpulist format) -> ``[0, 1, 2, 3, 8, 10, 11]``."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return sorted(cpus)


def gpu_pci_address(index: int) -> str | None:
    """The sysfs name (``dddd:bb:dd.0``) of CUDA device ``index``'s PCI function, or None."""
    import torch

    props = torch.cuda.get_device_properties(index)
    try:
        return f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
    except AttributeError:  # a torch without the PCI fields
        return None


def local_cpus(pci_address: str, sysfs: str = SYSFS_PCI) -> list[int] | None:
    """The CPUs of the NUMA node a PCI device hangs off, or None when sysfs does not say."""
    try:
        with open(os.path.join(sysfs, pci_address, "local_cpulist")) as f:
            cpus = parse_cpulist(f.read())
    except (OSError, ValueError):
        return None
    return cpus or None


def gpu_local_cpus(index: int) -> list[int] | None:
    """The CPUs of the NUMA node CUDA device ``index`` hangs off, or None when that is not known."""
    address = gpu_pci_address(index)
    return local_cpus(address) if address else None


def physical_core(cpu: int, sysfs: str = SYSFS_CPU) -> tuple:
    """(package, core) of a logical CPU; the CPU itself where the topology is not readable."""
    base = os.path.join(sysfs, f"cpu{cpu}", "topology")
    try:
        with open(os.path.join(base, "physical_package_id")) as f:
            package = int(f.read())
        with open(os.path.join(base, "core_id")) as f:
            return package, int(f.read())
    except (OSError, ValueError):
        return ("cpu", cpu)


def exclusive_share(cpus: list[int], share: int, shares: int, core_of=physical_core) -> list[int]:
    """Share ``share`` of ``shares`` of ``cpus``, split by physical core: every hardware thread of
    a core goes to the same share, and the shares' core counts differ by at most one."""
    cores: dict = {}
    for cpu in sorted(cpus):
        cores.setdefault(core_of(cpu), []).append(cpu)
    groups = list(cores.values())  # in order of each core's first CPU
    n = len(groups)
    lo, hi = share * n // shares, (share + 1) * n // shares
    return sorted(cpu for group in groups[lo:hi] for cpu in group)


def rank_cpus(local_rank: int, node_cpus: list[list[int] | None], mode: str, core_of=physical_core) -> list[int] | None:
    """The CPUs for the rank driving GPU ``local_rank``, given each visible GPU's node CPUs."""
    mine = node_cpus[local_rank]
    if mode == "off" or not mine:
        return None
    if mode == "node":
        return list(mine)
    peers = [i for i, cpus in enumerate(node_cpus) if cpus == mine]  # the GPUs on the same node
    return exclusive_share(mine, peers.index(local_rank), len(peers), core_of)


def pin_this_rank(local_rank: int, mode: str) -> str:
    """Restrict this process to ``mode``'s CPUs for its GPU (see the module's docstring); returns
    what was done, for the run's log."""
    if mode not in MODES:
        raise ValueError(f"CPU affinity mode {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "off":
        return "cpu affinity: off"
    import torch

    if not torch.cuda.is_available() or not hasattr(os, "sched_setaffinity"):
        return "cpu affinity: not applied (no CUDA device or no sched_setaffinity)"
    nodes = [gpu_local_cpus(index) for index in range(torch.cuda.device_count())]
    chosen = rank_cpus(local_rank, nodes, mode)
    allowed = os.sched_getaffinity(0)
    chosen = sorted(set(chosen or ()) & allowed)
    if not chosen:
        return f"cpu affinity: not applied (sysfs gives no CPUs for GPU {local_rank} within the allowed ones)"
    os.sched_setaffinity(0, chosen)
    return f"cpu affinity ({mode}): GPU {local_rank} -> {len(chosen)} CPUs {format_cpulist(chosen)}"


def format_cpulist(cpus: list[int]) -> str:
    """``[0, 1, 2, 3, 8, 10, 11]`` -> ``"0-3,8,10-11"`` (the inverse of :func:`parse_cpulist`)."""
    runs, start, prev = [], None, None
    for cpu in cpus:
        if start is None:
            start = prev = cpu
        elif cpu == prev + 1:
            prev = cpu
        else:
            runs.append((start, prev))
            start = prev = cpu
    if start is not None:
        runs.append((start, prev))
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)
