"""The shape ARCHITECTURE.md promises, checked on the source: a model family is named only
in its own module (studio/models/families/), imports go one way (no cycle, counting imports
inside functions), package __init__ files only re-export, one lazy seam, a torch-free start."""
from __future__ import annotations

import ast
import io
import json
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

from tests.conftest import ROOT

PRODUCT = ("studio", "trainers", "ui")
FAMILY_NAMES = re.compile(r"\b(sd15|sdxl|flux)\b")


def _code_tokens(path):
    """(line, text) of the names and strings of a Python file (comments left out)."""
    source = path.read_text(encoding="utf-8")
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type in (tokenize.NAME, tokenize.STRING):
            yield token.start[0], token.string


def test_no_source_outside_the_family_modules_names_a_family():
    found = []
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.is_relative_to(ROOT / "studio" / "models" / "families"):
                continue
            for line, text in _code_tokens(path):
                if FAMILY_NAMES.search(text):
                    found.append(f"{path.relative_to(ROOT)}:{line}: {text[:60]}")
    assert not found, "\n".join(found)


def _method_branches(path, names: set[str]):
    """(line, text) of comparisons with a method's name: `x == "tlora"`, `x in ("loha", ...)`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        constants = [c for o in operands for c in ([o] if isinstance(o, ast.Constant) else
                                                   getattr(o, "elts", []) if isinstance(o, (ast.Tuple, ast.List, ast.Set))
                                                   else []) if isinstance(c, ast.Constant)]
        if any(c.value in names for c in constants):
            yield node.lineno, ast.unparse(node)


def test_no_source_outside_the_method_modules_branches_on_a_method_name():
    """Adapter methods live in studio/adapters/methods; the file kinds (lora / loha / lokr
    layouts) are studio/adapters/formats' own axis, so both are left out."""
    from studio.adapters.methods import METHODS

    found = []
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            if any(path.is_relative_to(ROOT / "studio" / "adapters" / home) for home in ("methods", "formats")):
                continue
            found += [f"{path.relative_to(ROOT)}:{line}: {text}" for line, text in _method_branches(path, set(METHODS))]
    assert not found, "\n".join(found)


def _imports(path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.lineno, node.module or ""))
    return out


def _importers(packages, target: str) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line}: {name}" for package in packages
            for path in sorted((ROOT / package).rglob("*.py")) for line, name in _imports(path)
            if name == target or name.startswith(target + ".")]


def test_only_trainers_import_trainers():
    """The studio and the UI reach the worker by starting its process, never by import."""
    found = _importers(("studio", "ui"), "trainers")
    assert not found, "\n".join(found)


def test_generation_sits_above_the_adapters_and_the_models():
    """The engine uses adapters and models, never the reverse: LoRA Block Weight's blocks are a
    model fact (studio.models.blocks), the adapters' mixing and mixtures read them there."""
    found = _importers(("studio/adapters", "studio/models"), "studio.generation")
    assert not found, "\n".join(found)


def test_the_toy_world_is_outside_the_product():
    found = _importers(PRODUCT, "toyworld")
    assert not found, "\n".join(found)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _product_modules() -> dict[str, Path]:
    return {_module_name(path): path for package in PRODUCT for path in sorted((ROOT / package).rglob("*.py"))}


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:` (never run, so they make no cycle)."""
    return {id(node) for block in ast.walk(tree)
            if isinstance(block, ast.If) and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
            for statement in block.body for node in ast.walk(statement)}


def _imported_names(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """What an import statement (or `importlib.import_module("x")`) loads: `from a import b`
    is a.b when b is a module, else a; relative imports resolved."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            package = module.split(".")[:len(module.split(".")) - node.level + is_package]
            base = ".".join(package + ([base] if base else []))
        return [f"{base}.{alias.name}" for alias in node.names] + [base]
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
            and node.args and isinstance(node.args[0], ast.Constant)):
        return [node.args[0].value]
    return []


def import_graph() -> dict[str, dict[str, tuple[Path, int]]]:
    """module -> {product module it imports: (file, line)}, every import counted: at the top,
    inside functions, `from package import submodule`, and a package's __init__ importing its
    own modules."""
    modules = _product_modules()
    graph: dict[str, dict[str, tuple[Path, int]]] = {name: {} for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skipped = _type_checking_only(tree)
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            names = _imported_names(node, name, path.name == "__init__.py")
            if isinstance(node, ast.ImportFrom):  # a.b when b is a module, else a itself
                *submodules, base = names
                names = [n for n in submodules if n in modules] or [base]
            for target in names:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].setdefault(target, (path, node.lineno))
    return graph


def _strongly_connected(graph: dict[str, dict]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module: each holds a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = stack[stack.index(node):]
            del stack[stack.index(node):]
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _shortest_cycle(graph: dict[str, dict], start: str, inside: set[str]) -> list[str]:
    """A shortest cycle from `start` back to it within `inside` (breadth first)."""
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in graph[node]:
                if target == start:
                    cycle = [node]
                    while cycle[-1] != start:
                        cycle.append(came_from[cycle[-1]])
                    return [*reversed(cycle), start]
                if target in inside and target not in came_from:
                    came_from[target] = node
                    following.append(target)
        frontier = following
    raise AssertionError(f"{start} is on no cycle")


def import_cycles(graph: dict[str, dict]) -> list[list[str]]:
    """The shortest cycle through each module that is on one, each cycle once."""
    cycles: dict[tuple[str, ...], list[str]] = {}
    for component in _strongly_connected(graph):
        for start in component:
            cycle = _shortest_cycle(graph, start, set(component))
            first = cycle.index(min(cycle[:-1]))
            cycles.setdefault(tuple(cycle[first:-1] + cycle[:first]), cycle)
    return list(cycles.values())


def test_no_import_cycle():
    """Each cycle printed as module (file:line of its import) -> module -> ...; break it by
    moving the shared piece to a module both sides can import."""
    graph = import_graph()
    lines = [" -> ".join([*(f"{a} ({graph[a][b][0].relative_to(ROOT)}:{graph[a][b][1]})"
                            for a, b in zip(cycle, cycle[1:])), cycle[-1]]) for cycle in import_cycles(graph)]
    assert not lines, "import cycles:\n" + "\n".join(lines)


# The one lazy seam: `studio.adapters` offers studio.adapters.api's names on first use
# (module __getattr__), so that studio.config (which lists the methods), the job queue and the
# UI start without torch.
LAZY_SEAM = ROOT / "studio" / "adapters" / "__init__.py"


def _re_exports(statement: ast.stmt) -> bool:
    """An import, the docstring or `__all__ = [...]`."""
    if isinstance(statement, (ast.Import, ast.ImportFrom)):
        return True
    if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
        return isinstance(statement.value.value, str)
    return isinstance(statement, ast.Assign) and [ast.unparse(t) for t in statement.targets] == ["__all__"]


def test_package_inits_only_re_export():
    """Code lives in modules, named for what they hold; a package's __init__ offers their
    public names (imports, `__all__`, a docstring), as httpx's does."""
    found = []
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("__init__.py")):
            for statement in ast.parse(path.read_text(encoding="utf-8")).body:
                seam = path == LAZY_SEAM and isinstance(statement, ast.FunctionDef) and statement.name == "__getattr__"
                if not (_re_exports(statement) or seam):
                    found.append(f"{path.relative_to(ROOT)}:{statement.lineno}: {ast.unparse(statement).splitlines()[0]}")
    assert not found, "\n".join(found)


def test_one_lazy_seam():
    """Names looked up at run time (a module __getattr__, importlib.import_module) hide imports
    from readers and from the cycle check: studio.adapters' is the only one."""
    found = []
    for path in _product_modules().values():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found += [f"{path.relative_to(ROOT)}:{node.lineno}" for node in tree.body
                  if isinstance(node, ast.FunctionDef) and node.name == "__getattr__"]
        found += [f"{path.relative_to(ROOT)}:{node.lineno}" for node in ast.walk(tree)
                  if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("import_module")]
    assert found and all(place.startswith(str(LAZY_SEAM.relative_to(ROOT)) + ":") for place in found), found


@pytest.mark.slow(seconds=5)
def test_the_config_the_job_queue_and_the_cli_start_without_torch():
    """What the UI's first page, `lora-studio --help` and the job supervisor load: torch,
    diffusers, peft and transformers load only inside the functions that use them."""
    heavy = ["torch", "diffusers", "peft", "transformers", "accelerate"]
    code = ("import json, sys\n"
            "import studio.config, studio.jobs, studio.jobs.runs, studio.datasets, studio.cli, studio.adapters, ui.app\n"
            f"print(json.dumps([m for m in {heavy!r} if m in sys.modules]))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


# What the torch-free start (studio.config, the job queue, the CLI and the UI) must not load.
TORCH = {"torch", "diffusers", "peft", "transformers", "accelerate"}
# Entry points that set the environment (HF_HUB_OFFLINE, the log level) before the trainer loads.
ENVIRONMENT_FIRST = {"trainers.__main__", "trainers.speed"}


def _loads(node: ast.AST, module: str, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(product modules, third-party packages) an import statement loads: a module's parent
    packages too, and through the lazy seam (`from studio.adapters import name`) studio.adapters.api."""
    names = _imported_names(node, module, modules[module].name == "__init__.py")
    product, third_party = set(), set()
    if isinstance(node, ast.ImportFrom) and names[-1] == "studio.adapters" and any(n not in modules for n in names[:-1]):
        names.append("studio.adapters.api")
    for name in names:
        top = name.split(".")[0]
        if top in PRODUCT:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            parts = name.split(".")
            product.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in modules)
        elif top and top != "__future__" and top not in sys.stdlib_module_names:
            third_party.add(top)
    return product, third_party


def _import_statements() -> tuple[dict[str, Path], dict[str, list[tuple[ast.AST, bool]]]]:
    """module -> [(import statement, inside a function)], `if TYPE_CHECKING:` left out."""
    modules = _product_modules()
    found = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skipped = _type_checking_only(tree)
        in_functions = {id(node) for function in ast.walk(tree) if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
                        for node in ast.walk(function)}
        found[name] = [(node, id(node) in in_functions) for node in ast.walk(tree)
                       if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skipped]
    return modules, found


def _third_party_at_import(modules, statements) -> dict[str, set[str]]:
    """module -> the third-party packages importing it loads (its top-level imports, transitively)."""
    direct = {}
    for name in modules:
        product, third_party = set(), set()
        for node, in_function in statements[name]:
            if not in_function:
                more_product, more_third = _loads(node, name, modules)
                product |= more_product
                third_party |= more_third
        direct[name] = (product - {name}, third_party)
    loaded = {}
    for name in modules:
        seen, stack, packages = set(), [name], set()
        while stack:
            current = stack.pop()
            if current not in seen:
                seen.add(current)
                stack.extend(direct[current][0])
                packages |= direct[current][1]
        loaded[name] = packages
    return loaded


def test_product_imports_sit_at_the_top_unless_they_would_load_torch():
    """An import of studio / trainers / ui inside a function stays there only where the module
    loads without torch and the imported one would load it (studio.config, the job queue and
    the UI start without torch), in the CLI where it would load any third-party package (a
    command loads what it runs: `lora-studio --help` in 0.1 s), or in the worker's entry
    points, which set the environment first."""
    modules, statements = _import_statements()
    loaded = _third_party_at_import(modules, statements)
    found = []
    for name, found_here in statements.items():
        for node, in_function in found_here:
            product, third_party = _loads(node, name, modules)
            if not in_function or not product or third_party or name in ENVIRONMENT_FIRST:
                continue
            brings = set().union(*(loaded[module] for module in product))
            if name == "studio.cli" and brings:
                continue
            if not loaded[name] & TORCH and brings & TORCH:
                continue
            found.append(f"{modules[name].relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "move to the top of the module:\n" + "\n".join(found)
