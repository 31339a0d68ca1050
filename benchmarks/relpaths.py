"""File paths in profile text without the machine's folders, so a profile reads the same wherever
it ran: a file of this repository relative to its root (``nbtune/kernels/lora.py``), an installed
package's relative to the folder it is installed in (``torch/nn/modules/module.py``), the standard
library's by its module path (``threading.py``). The longest matching folder wins, so a virtual
environment inside the repository still gives ``torch/...``."""
from __future__ import annotations

import os
import site
import sys
import sysconfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def roots() -> list[str]:
    """The folders that paths are written relative to, longest first."""
    found = {REPO}
    paths = sysconfig.get_paths()
    for key in ("purelib", "platlib", "stdlib", "platstdlib"):
        if paths.get(key):
            found.add(paths[key])
    try:
        found.update(site.getsitepackages())
    except AttributeError:  # pragma: no cover - some virtualenv versions lack it
        pass
    found.update(p for p in sys.path if p.endswith(("site-packages", "dist-packages")))
    return sorted({os.path.abspath(p) for p in found}, key=len, reverse=True)


def short_path(path: str) -> str:
    """``path`` relative to the longest folder of :func:`roots` holding it; a path outside all of
    them by its file name; a relative path (or a pseudo-file such as ``<string>``) as it is."""
    if not os.path.isabs(path):
        return path
    absolute = os.path.abspath(path)
    for root in roots():
        if absolute.startswith(root + os.sep):
            return os.path.relpath(absolute, root)
    return os.path.basename(absolute)


def relativize(text: str) -> str:
    """``text`` with every folder of :func:`roots` (and the separator after it) removed from the
    paths in it."""
    for root in roots():
        text = text.replace(root + os.sep, "")
    return text
