"""The package's shape: no import circle between modules (module-level imports), no module over
~400 lines, no function over ~60 lines (outside tests and bench), model/ free of Ray/DeepSpeed."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("orchestrator", "model")
MAX_MODULE_LINES = 420     # "around 400"
MAX_FUNCTION_LINES = 62    # "around 60"


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def _top_level_imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Modules of the package imported at module level (not inside functions, not TYPE_CHECKING)."""
    deps, pkg = set(), name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            deps |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[:len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            deps.add(base)
            deps |= {f"{base}.{a.name}" for a in node.names}
    return {d for d in deps if d in known and d != name}


def test_no_import_circle():
    mods = _modules()
    graph = {name: _top_level_imports(path, name, set(mods)) for name, path in mods.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"
    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert sum(map(len, graph.values())) > 40, "the import graph was read"
    assert not cycles, f"import circles: {cycles}"


def test_module_and_function_sizes():
    long_modules, long_functions = [], []
    for name, path in _modules().items():
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            long_modules.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name}: {n} lines")
    assert not long_modules, long_modules
    assert not long_functions, long_functions


def test_model_is_pure_pytorch():
    for path in (ROOT / "model").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for n in names:
                assert n.split(".")[0] not in ("ray", "deepspeed", "orchestrator"), f"{path}: imports {n}"
            if isinstance(node, ast.Attribute) and node.attr in ("init_process_group", "new_group"):
                raise AssertionError(f"{path}: creates a process group")
