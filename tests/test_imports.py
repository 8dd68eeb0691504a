"""The top-level modules import one another in one direction only: no cycle, and the foundations import nothing of
the project."""

import ast
import os

from conftest import REPO

MODULES = {f[:-3] for f in os.listdir(REPO) if f.endswith(".py")}


def project_imports(module):
    """The project modules a module imports anywhere (top level or inside functions)."""
    tree = ast.parse(open(os.path.join(REPO, module + ".py")).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return (names & MODULES) - {module}


def test_no_import_cycle_among_top_level_modules():
    graph = {m: project_imports(m) for m in MODULES}
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", f"import cycle: {' -> '.join(path + [m])}"
        state[m] = "open"
        for n in sorted(graph[m]):
            visit(n, path + [m])
        state[m] = "done"
    for m in sorted(graph):
        visit(m, [])
    for foundation in ("mbe", "model", "shards"):
        assert graph[foundation] == set(), (foundation, graph[foundation])
    assert "train" not in graph["prepare_mult"] | graph["prepare_fineweb"]


def test_the_cycle_check_sees_a_cycle(tmp_path, monkeypatch):
    import test_imports as t
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import x\n")
    monkeypatch.setattr(t, "REPO", str(tmp_path))
    monkeypatch.setattr(t, "MODULES", {"a", "b"})
    try:
        t.test_no_import_cycle_among_top_level_modules()
    except AssertionError as e:
        assert "import cycle" in str(e)
    else:
        raise AssertionError("a cycle a -> b -> a was not found")
