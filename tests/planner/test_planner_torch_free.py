"""The planner answers "will it fit" before anything heavy is installed or imported: importing
nbtune.planner, planning and checking the calibration import neither torch nor nbtune's torch layers."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HEAVY = ("torch", "triton", "transformers", "peft", "bitsandbytes", "nbtune.kernels", "nbtune.models", "nbtune.train")

SCRIPT = """
import json, sys
import nbtune.planner
from nbtune.planner import calibration
p = nbtune.planner.plan("llama-3.1-8b", gpu="T4", seq_len=2048, batch_size=1, lora_rank=16)
rows = calibration.check()
q = nbtune.planner.plan("llama-3.1-8b", gpu="colab-t4", seq_len=49152, batch_size=1, host_ram_gib="auto")
q.suggest(); repr(q)  # host RAM: the profile's, and this machine's read from /proc
print(json.dumps({"fits": p.fits, "rows": len(rows), "modules": sorted(sys.modules)}))
"""


def test_importing_and_using_the_planner_imports_no_torch():
    env = {k: v for k, v in os.environ.items() if k != "NBTUNE_GPU"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, env=env,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["fits"] in (True, False) and out["rows"] > 0  # it planned and replayed the committed records
    loaded = [m for m in out["modules"] if any(m == h or m.startswith(h + ".") for h in HEAVY)]
    assert loaded == [], f"importing nbtune.planner loaded {loaded}"
