"""The patch modules import one another in one direction only (no module imports one that imports
it back, not even inside a function), so each can be read and imported on its own."""
import ast
from pathlib import Path

import nbtune.models.patches as patches

PACKAGE = Path(patches.__file__).parent
NAME = patches.__name__


def _imports(path: Path) -> set:
    """The sibling modules ``path`` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 1:
            found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        elif node.level == 0 and node.module and node.module.startswith(NAME + "."):
            found.add(node.module[len(NAME) + 1:].split(".")[0])
    return {m for m in found if (PACKAGE / f"{m}.py").is_file() and m != path.stem}


def test_no_patch_module_imports_one_that_imports_it_back():
    graph = {p.stem: _imports(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert "common" not in graph["host_facts"]  # the circle this test was written for
    done, cycles = set(), []

    def visit(module, path):
        for dep in sorted(graph.get(module, ())):
            if dep in path:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in done:
                visit(dep, path + [dep])
        done.add(module)

    for module in sorted(graph):
        visit(module, [module])
    assert cycles == []
