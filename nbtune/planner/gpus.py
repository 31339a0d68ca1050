"""GPU catalog: memory the process can use, and the rates a rough speed estimate needs.

``total_gib`` is what ``torch.cuda.get_device_properties(i).total_memory`` reports (nvidia-smi's
total less what the driver keeps), in GiB. ``context_gib`` is the device memory a CUDA process
holds outside torch's caching allocator: the CUDA context with its loaded kernel images, plus
library handles. It is not counted by ``torch.cuda.max_memory_reserved()`` but an out-of-memory
error sees it, so ``usable_gib = total_gib - context_gib`` is what torch's allocator can reserve.

The T4 numbers are measured on Colab (14.748 GiB in all, ~0.45 GiB context: 14.3 GiB for
torch, as DESIGN.md records). Other totals are typical readings (±1 %); contexts are estimates
(CUDA 12 with lazy module loading holds 0.3-0.6 GiB). On a desktop card the display takes more:
pass a :class:`GPU` of your own, or ``gpu="auto"`` on the machine itself, which measures.

Rates (dense 16-bit tensor-core TFLOP/s with fp32 accumulation, memory GB/s) are the vendors'
figures and only feed the optional tokens/s estimate.

``gpu="auto"`` asks torch about device 0 (torch is imported only then); the environment variable
``NBTUNE_GPU`` (e.g. ``NBTUNE_GPU=T4``) overrides it, which is how a T4 is emulated on a larger GPU.

Host RAM. A GPU entry (``T4``, ``L4``, ...) says nothing of the machine around it: its
``host_ram_gib`` is None and a plan for it does not judge host memory unless given
(``plan(..., host_ram_gib=...)``). The platform profiles (``PROFILES``: ``colab-t4``,
``kaggle-t4x2``, ``kaggle-p100``, ``colab-l4``, ``colab-a100``) are a catalog GPU plus the RAM that
platform gives (``host_ram_gib``, what its memory meter states) and an estimate of what its OS and
notebook server hold (``host_other_gib``). ``gpu="auto"`` measures the machine it runs on
(:mod:`nbtune.planner.host`: /proc/meminfo and the cgroup limit), also when ``NBTUNE_GPU`` names a
catalog GPU; ``NBTUNE_GPU=colab-t4`` emulates the profile's RAM as well as its GPU.
"""
from __future__ import annotations

import dataclasses
import difflib
import re

from .._env import env_text
from .shapes import PlannerError

# Names the GPU to plan for instead of asking torch (how a T4 is emulated on a larger GPU).
GPU_ENV = "NBTUNE_GPU"


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str
    total_gib: float  # torch's total_memory, GiB
    context_gib: float  # outside torch's allocator (CUDA context, library handles)
    compute_capability: tuple[int, int]
    tflops_16bit: float | None = None  # dense fp16/bf16 tensor-core TFLOP/s (fp32 accumulate)
    bandwidth_gbs: float | None = None  # memory bandwidth, GB/s
    note: str = ""
    # -- the machine around it (None: not known; see the module docstring) --
    host_ram_gib: float | None = None  # RAM the training may use at most (meter / MemTotal / cgroup limit)
    host_other_gib: float = 0.0  # of that, held outside the training process (OS, notebook server, ...)
    host_process_gib: float | None = None  # this process's resident memory when measured here
    host_source: str = ""  # where the host figures come from
    card: str = ""  # a platform profile's GPU (its catalog name); "" for a catalog entry itself
    gpu_count: int = 1  # GPUs the platform gives (data parallel takes world_size=gpu_count)

    @property
    def usable_gib(self) -> float:
        """What torch's caching allocator can reserve."""
        return self.total_gib - self.context_gib

    @property
    def bf16(self) -> bool:
        return self.compute_capability >= (8, 0)

    @property
    def host_known(self) -> bool:
        return self.host_ram_gib is not None

    @property
    def host_budget_gib(self) -> float | None:
        """RAM the training processes may hold: the host's total less what others hold (None: unknown)."""
        return None if self.host_ram_gib is None else self.host_ram_gib - self.host_other_gib

    def describe(self) -> str:
        card = f"{self.gpu_count} x {self.card}, " if self.gpu_count > 1 else (f"{self.card}, " if self.card else "")
        text = f"{self.name} ({card}{self.total_gib:.2f} GiB, {self.usable_gib:.2f} GiB for torch"
        if self.host_ram_gib is not None:
            text += f"; host RAM {self.host_ram_gib:.2f} GiB"
        return text + ")"

    def with_host(self, host) -> "GPU":
        """This GPU with the host RAM of ``host`` (a :class:`nbtune.planner.host.HostMemory`, or a
        number of GiB: the machine's total, nothing held outside the training)."""
        if host is None:
            return self
        if isinstance(host, (int, float)):
            if host <= 0:
                raise PlannerError(f"host_ram_gib must be a positive number of GiB (got {host})")
            return dataclasses.replace(self, host_ram_gib=float(host), host_other_gib=0.0, host_process_gib=None,
                                       host_source="given")
        return dataclasses.replace(self, host_ram_gib=host.total_gib, host_other_gib=host.other_gib,
                                   host_process_gib=host.process_gib, host_source=host.source)


CATALOG: dict[str, GPU] = {g.name: g for g in [
    GPU("T4", 14.748, 0.45, (7, 5), 65.0, 320.0, "free Colab; fp16 only (no bf16)"),
    GPU("L4", 22.17, 0.45, (8, 9), 121.0, 300.0, "Colab / GCP"),
    GPU("A10G", 22.17, 0.45, (8, 6), 70.0, 600.0, "AWS g5"),
    GPU("RTX 3060 12GB", 11.76, 0.40, (8, 6), 25.6, 360.0, "desktop: the display may take more"),
    GPU("RTX 4090", 23.64, 0.45, (8, 9), 165.0, 1008.0, "desktop: the display may take more"),
    GPU("A100 40GB", 39.39, 0.50, (8, 0), 312.0, 1555.0, "Colab Pro"),
    GPU("A100 80GB", 79.15, 0.50, (8, 0), 312.0, 2039.0),
    GPU("H100", 79.11, 0.55, (9, 0), 989.0, 3350.0, "H100 SXM 80GB"),
    GPU("H200", 139.81, 0.55, (9, 0), 989.0, 4800.0),
    GPU("P100", 15.89, 0.35, (6, 0), 18.7, 732.0,
        "Kaggle; Pascal: no tensor cores, no bf16 (recent torch builds and Triton may not support sm_60)"),
]}


def _profile(name: str, gpu: str, host_ram_gib: float, host_other_gib: float, note: str, gpu_count: int = 1) -> GPU:
    return dataclasses.replace(CATALOG[gpu], name=name, card=gpu, gpu_count=gpu_count, host_ram_gib=host_ram_gib,
                               host_other_gib=host_other_gib, note=note,
                               host_source=f"{name} profile (the platform's stated RAM; held outside: an estimate)")


# Notebook platforms: a catalog GPU plus the RAM the platform's meter states. Colab's figures are the
# runtime's "System RAM" (12.7 GB on the free T4 runtime: MemTotal ~13.6e9 bytes, 12.7 GiB); Kaggle's
# are its session limit (29 GiB with a GPU). What the OS, the notebook server and the platform's agents
# hold (``host_other_gib``) is an estimate to be measured (``free -m`` on a fresh runtime, or
# gpu="auto" on the machine, which measures it).
PROFILES: dict[str, GPU] = {g.name: g for g in [
    _profile("colab-t4", "T4", 12.67, 0.7, "free Colab: T4 (15 GB) and 12.7 GB of system RAM"),
    _profile("kaggle-t4x2", "T4", 29.0, 0.7, "Kaggle: two T4s and 29 GiB of RAM for the session",
             gpu_count=2),
    _profile("kaggle-p100", "P100", 29.0, 0.7, "Kaggle: one P100 (16 GB) and 29 GiB of RAM for the session"),
    _profile("colab-l4", "L4", 53.0, 0.7, "Colab Pro: L4 (22.5 GB) and 53 GB of system RAM"),
    _profile("colab-a100", "A100 40GB", 83.5, 0.7, "Colab Pro: A100 40GB and 83.5 GB of system RAM"),
]}

_ALIASES = {
    "tesla t4": "T4", "t4": "T4", "nvidia l4": "L4", "l4": "L4", "a10g": "A10G", "nvidia a10g": "A10G",
    "a10": "A10G", "3060": "RTX 3060 12GB", "rtx 3060": "RTX 3060 12GB", "rtx3060": "RTX 3060 12GB",
    "4090": "RTX 4090", "rtx4090": "RTX 4090", "a100": "A100 40GB", "a100-40": "A100 40GB",
    "a100-40gb": "A100 40GB", "a100 40": "A100 40GB", "a100-80": "A100 80GB", "a100-80gb": "A100 80GB",
    "a100 80": "A100 80GB", "h100": "H100", "h100 80gb": "H100", "h200": "H200", "p100": "P100",
    "tesla p100": "P100", "p100-pcie-16gb": "P100",
}


def gpu_names() -> list[str]:
    """The platform profiles (GPU and host RAM), then the catalog GPUs."""
    return list(PROFILES) + list(CATALOG)


def _profile_key(text: str) -> str:
    return re.sub(r"[\s_]+", "-", text.strip().lower())


def _match_device_name(device_name: str, total_gib: float | None = None) -> GPU | None:
    """Catalog entry for a CUDA device name such as 'Tesla T4' or 'NVIDIA A100-SXM4-80GB'."""
    s = device_name.lower()
    if "a100" in s:
        if total_gib is not None:
            return CATALOG["A100 80GB" if total_gib > 50 else "A100 40GB"]
        return CATALOG["A100 80GB" if "80" in s else "A100 40GB"]
    for key, gpu in (("h200", "H200"), ("h100", "H100"), ("a10g", "A10G"), ("l4", "L4"), ("t4", "T4"), ("p100", "P100"),
                     ("4090", "RTX 4090"), ("3060", "RTX 3060 12GB")):
        if re.search(rf"(^|[^a-z0-9]){key}($|[^a-z0-9])", s):
            return CATALOG[gpu]
    return None


def detect_gpu(device: int | None = None) -> GPU:
    """The GPU this process uses (torch is imported here, and only here; default: the current
    device, which is cuda:LOCAL_RANK in a data-parallel run), with its measured total memory and
    the memory held outside torch's allocator (context, other processes)."""
    try:
        import torch
    except ImportError:
        raise PlannerError("gpu='auto' needs torch to find the GPU; name one instead (e.g. gpu='T4')") from None
    if not torch.cuda.is_available():
        raise PlannerError("gpu='auto': no CUDA GPU is visible here; name one instead, e.g. gpu='T4'")
    if device is None:
        device = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(device)
    total = props.total_memory / 2**30
    known = _match_device_name(props.name, total)
    context = known.context_gib if known else 0.5
    try:
        free, total_bytes = torch.cuda.mem_get_info(device)
        outside = (total_bytes - free - torch.cuda.memory_reserved(device)) / 2**30
        if outside > context:
            context = outside  # another process, or a larger context than the catalog's
    except Exception:  # pragma: no cover - mem_get_info is missing on some builds
        pass
    return GPU(
        name=known.name if known else props.name, total_gib=round(total, 3), context_gib=round(context, 3),
        compute_capability=(props.major, props.minor),
        tflops_16bit=known.tflops_16bit if known else None, bandwidth_gbs=known.bandwidth_gbs if known else None,
        note=f"detected: {props.name}",
    )


def planned_gpu() -> str | None:
    """The GPU ``NBTUNE_GPU`` names for "the GPU here" (None when unset, empty or "auto")."""
    forced = env_text(GPU_ENV)
    return forced if forced and forced.lower() != "auto" else None


# The host RAM that gpu="auto" plans with: unset or "auto" measures this machine; a number of GiB
# stands for it (how free Colab's 12.7 GB is emulated on a larger machine); "off" leaves host RAM unjudged.
HOST_RAM_ENV = "NBTUNE_HOST_RAM"


def detected_host():
    """This machine's RAM (:func:`nbtune.planner.host.detect_host`), or what ``NBTUNE_HOST_RAM`` says;
    None where it cannot be read or ``NBTUNE_HOST_RAM`` is off."""
    from .host import HostMemory, detect_host

    value = env_text(HOST_RAM_ENV).lower()
    if value in ("", "auto"):
        return detect_host()
    if value in ("off", "unknown", "none", "0"):
        return None
    try:
        gib = float(value)
    except ValueError:
        gib = -1.0
    if gib <= 0:
        raise PlannerError(f"environment variable {HOST_RAM_ENV}={value!r}: a number of GiB (e.g. 12.7), auto "
                           "(measure this machine) or off (do not judge host RAM)")
    return HostMemory(total_gib=gib, source=f"{HOST_RAM_ENV}={value}")


def resolve_gpu(gpu="T4") -> GPU:
    """A :class:`GPU` for a GPU object, a profile or catalog name (case-insensitive, loose), or
    'auto' (this machine's GPU, or the one ``NBTUNE_GPU`` names, with this machine's RAM unless the
    name is a platform profile, whose RAM is emulated too)."""
    if isinstance(gpu, GPU):
        return gpu
    if gpu is None or str(gpu).strip().lower() == "auto":
        forced = planned_gpu()
        found = resolve_gpu(forced) if forced else detect_gpu()
        return found if found.host_known else found.with_host(detected_host())
    text = str(gpu).strip()
    profile = PROFILES.get(_profile_key(text))
    if profile is not None:
        return profile
    if text in CATALOG:
        return CATALOG[text]
    key = text.lower().replace("nvidia ", "").replace("geforce ", "").strip()
    for k, v in CATALOG.items():
        if k.lower() == key:
            return v
    if key in _ALIASES:
        return CATALOG[_ALIASES[key]]
    found = _match_device_name(text)
    if found is not None:
        return found
    hint = difflib.get_close_matches(text, gpu_names(), n=2, cutoff=0.4)
    raise PlannerError(
        f"gpu {text!r} is not in the catalog" + (f" (did you mean {', '.join(map(repr, hint))}?)" if hint else "")
        + f"; known: {', '.join(gpu_names())}, or 'auto' for the current GPU"
    )
