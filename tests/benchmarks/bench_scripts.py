"""Helpers for tests/benchmarks: import a benchmark script (benchmarks/ is no package) by path."""
import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(REPO, "benchmarks")


def load_script(name, path):
    """Import a benchmark script under a name of its own (a top-level ``models`` or ``kernels`` on
    sys.path would shadow other imports); imported once per test session."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
