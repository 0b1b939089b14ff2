"""The package's layering rules, checked on the source: the library does not speak CLI, and
module-level imports form no cycle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "mgaudit"
CLI_FILES = {"cli.py"}


def _library_modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py")
                  if "commands" not in p.relative_to(PKG).parts and p.name not in CLI_FILES)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # also `if TYPE_CHECKING:`-free try/except blocks at module level
        nodes = [n for top in tree.body for n in ast.walk(top) if not isinstance(top, (ast.FunctionDef, ast.ClassDef,
                                                                                        ast.AsyncFunctionDef))]
    pkg = _module_name(path) if path.name == "__init__.py" else _module_name(path).rsplit(".", 1)[0]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:
                    found.update(f"{mod}.{a.name}" for a in node.names)
                else:
                    found.add(mod)
            elif node.module:
                found.add(node.module)
    return found


@pytest.mark.parametrize("path", _library_modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_library_module_does_not_import_typer_or_rich(path) -> None:
    bad = {m for m in _imports(path, top_level_only=False) if m.split(".")[0] in ("typer", "rich", "click")}
    assert not bad, f"{path.name} imports {sorted(bad)}: only mgaudit/commands/ and cli.py may"


def _error_strings(path: Path) -> list[tuple[int, str]]:
    """String pieces passed to an exception constructor or as a ``hint``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call):
            continue
        name = getattr(node.func, "id", None) or getattr(node.func, "attr", None) or ""
        args = list(node.args) if name.endswith(("Error", "Exception")) else []
        args += [k.value for k in node.keywords if k.arg == "hint" or name.endswith("Error")]
        for a in args:
            for sub in ast.walk(a):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    out.append((sub.lineno, sub.value))
    return out


def test_library_errors_name_no_cli_flag() -> None:
    import mgaudit.cli  # noqa: F401  (the app names its flags to the boundary)
    from mgaudit.commands.boundary import known_flags

    flags = known_flags()
    assert {"--batch-size", "--max-new-tokens", "--out"} <= flags  # the check below has something to find
    offenders = []
    for path in _library_modules():
        for line, text in _error_strings(path):
            for flag in re.findall(r"--[a-z][a-z0-9-]*", text):
                if flag in flags:
                    offenders.append(f"{path.relative_to(PKG)}:{line}: {flag}")
    assert not offenders, "library errors must name parameters (`batch_size`), not flags: " + ", ".join(offenders)


def test_the_cli_writes_parameter_names_as_its_flags() -> None:
    import mgaudit.cli  # noqa: F401  (the app names its flags to the boundary)
    from mgaudit.commands.boundary import as_flags

    assert as_flags("`max_new_tokens` 0 must be at least 1") == "--max-new-tokens 0 must be at least 1"
    assert as_flags("`not_a_flag_anywhere` is wrong") == "not a flag anywhere is wrong"


def test_module_level_imports_form_no_cycle() -> None:
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {m: {d for d in _imports(p, top_level_only=True) if d in modules and d != m} for m, p in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                cycle = visit(d)
                if cycle:
                    return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_readme_file_table_names_every_module() -> None:
    """The README's "File structure" table names every module outside commands/ and endpoint/
    (as ``folder/name.py`` or, for the top level, ``mgaudit/name.py``)."""
    readme = (PKG.parent / "README.md").read_text(encoding="utf-8")
    missing = []
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG)
        if rel.parts[0] in ("commands", "endpoint") or p.name == "__init__.py" and len(rel.parts) > 1:
            continue
        name = f"mgaudit/{rel.as_posix()}" if len(rel.parts) == 1 else rel.as_posix()
        if f"`{name}`" not in readme and f"`{rel.name}`" not in readme:
            missing.append(name)
    assert not missing, f"README's file table does not name {missing}"


def test_errors_say_which_parameter() -> None:
    from mgaudit.errors import UsageError
    from mgaudit.verify import VerifyConfig

    with pytest.raises(UsageError) as exc:
        VerifyConfig(prompts="x", batch_size=0).validate()
    assert exc.value.params == ["batch_size"]
    with pytest.raises(UsageError) as exc:
        VerifyConfig(prompts="x", policy="gate").validate()
    assert exc.value.params == ["policy", "gate", "threshold"]
