"""benchmarks/host_time_cpu.py: a real patched training step with the Triton launches stubbed out
(in a subprocess: the stubs and the kernel mode are process-wide)."""
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_measures_the_host_time_of_the_patched_step_and_profiles_nbtune_code():
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "host_time_cpu.py"), "--layers", "2",
                           "--repeats", "1", "--steps", "2", "--checkpointing", "offload", "--profile"],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = re.search(r"host time \(offload checkpointing, 2 layers, best of 1 x 2 steps\): ([\d.]+) ms per step, "
                  r"([\d.]+) ms per layer", proc.stdout)
    assert m and float(m.group(1)) > 0 and abs(float(m.group(1)) / 2 - float(m.group(2))) < 1e-2
    assert "nbtune/kernels/lora.py" in proc.stdout  # nbtune's own kernels ran (their Python, launches stubbed)
