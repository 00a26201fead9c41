"""The layout's promises, checked on the source: imports run one way (entry scripts -> library
modules, no cycles), optional extras are imported only where used, the README's paper-to-code map
names functions that exist, and no module grows past about 500 lines without saying why."""
import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
ENTRY_SCRIPTS = {"train", "sample", "evaluate", "bench.throughput", "fused.bench", "fused.gpu_check", "ltx2.__main__"}
OPTIONAL = ("onnx", "onnxruntime", "insightface", "av", "diffusers", "transformers", "cv2")


def project_modules() -> dict[str, Path]:
    files = [p for p in ROOT.glob("*.py")] + [p for p in ROOT.glob("*/*.py") if p.parent.name not in ("tests",)]
    mods = {}
    for p in files:
        if p.parent.name.startswith("."):
            continue
        rel = p.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts)
        mods[name.removesuffix(".__init__")] = p
    return mods


def imported(path: Path, mods: dict) -> set[str]:
    """Project modules `path` imports, anywhere in the file (a package import counts as its __init__)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        out |= {n for n in names if n in mods}
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (module -> modules it imports) as a path, or None (depth-first search)."""
    state = {}  # 1: on the stack, 2: done

    def visit(m, stack):
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d, stack + [d])):
                return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m, [m])):
            return found
    return None


def test_library_modules_never_import_entry_scripts_and_there_is_no_cycle():
    mods = project_modules()
    graph = {m: imported(p, mods) - {m} for m, p in mods.items()}
    entry = ENTRY_SCRIPTS | {m for m in mods if m.startswith("experiments.")}  # scripts that drive the others
    wrong = {m: sorted(deps & entry) for m, deps in graph.items() if m not in entry and deps & entry}
    assert not wrong, f"library modules importing entry scripts: {wrong}"
    assert find_cycle(graph) is None, "import cycle: " + " -> ".join(find_cycle(graph))


def test_the_checks_can_fail_on_planted_modules(tmp_path):
    """Two planted modules that import each other are seen as importing each other, and as a cycle."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import x\n")
    (tmp_path / "c.py").write_text("import a\n")
    mods = {m: tmp_path / f"{m}.py" for m in "abc"}
    graph = {m: imported(p, mods) for m, p in mods.items()}
    assert graph == {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert find_cycle(graph) in (["a", "b", "a"], ["b", "a", "b"])
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_paper_path_runs_without_optional_extras():
    """train, sample and evaluate (synthetic identity loss and judges included) import with every optional
    extra blocked: each extra is imported only where it is used."""
    code = ("import sys\nclass Block:\n    def find_spec(self, name, path=None, target=None):\n"
            f"        if name.split('.')[0] in {OPTIONAL!r}: raise ImportError('blocked ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import train, sample, evaluate, world.face_nets, world.judges, pipeline\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def map_entries() -> list[tuple[str, str]]:
    """(file, name) of every `file.py:name` the README's paper-to-code map cites."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## The paper in code"):]
    table = table[:table.index("\n## ", 5)]
    return sorted(set(re.findall(r"`([\w/]+)\.py:([\w.]+)`", table)))


def test_readme_map_names_functions_that_exist():
    entries = map_entries()
    assert len(entries) >= 15, entries
    for file, name in entries:
        obj = importlib.import_module(file.replace("/", "."))
        for part in name.split("."):
            obj = getattr(obj, part)  # AttributeError names what the map gets wrong
        assert callable(obj), f"{file}.py:{name}"


def test_modules_stay_short_or_say_why():
    for name, path in project_modules().items():
        lines = path.read_text().splitlines()
        if len(lines) > 520:
            head = "\n".join(lines[:12]).lower()
            assert "long because" in head, f"{path.relative_to(ROOT)} has {len(lines)} lines and does not say why"
