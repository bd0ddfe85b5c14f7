"""An import-linter contract type for what its built-in ones cannot say: only some rooms may
touch Twisted's *global* reactor.

import-linter sees external packages only at their top level (``twisted``), yet the rule is
about one module of it (``twisted.internet.reactor``) and the helpers that use it behind your
back (``deferToThread``). So this contract reads the source of every module outside the
allowed rooms and reports each import of a forbidden name. Everything else receives the
reactor, a clock or a ``run_blocking`` from ``smarthost.app``, which is what lets the tests
pass a ``task.Clock`` instead.
"""

from __future__ import annotations

import ast
import importlib.util

from grimp import ImportGraph
from importlinter import Contract, ContractCheck, fields, output


class GlobalReactorContract(Contract):
    """Options: ``source`` (the root package), ``allowed`` (packages that may), ``forbidden``
    (dotted names no other module may import)."""

    source = fields.StringField()
    allowed = fields.ListField(subfield=fields.StringField())
    forbidden = fields.ListField(subfield=fields.StringField())

    def check(self, graph: ImportGraph, verbose: bool) -> ContractCheck:
        root, allowed = str(self.source), [str(a) for a in self.allowed]  # type: ignore[attr-defined]
        forbidden = [str(f) for f in self.forbidden]  # type: ignore[attr-defined]
        found: list[tuple[str, int, str]] = []
        for module in sorted(graph.modules):
            if not _inside(module, [root]) or _inside(module, allowed):
                continue
            for line, name in _imports(module):
                if any(name == f or name.startswith(f + ".") for f in forbidden):
                    found.append((module, line, name))
        return ContractCheck(kept=not found, metadata={"found": found})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for module, line, name in check.metadata["found"]:
            output.print_error(f"{module}:{line} imports {name}", bold=False)
            output.new_line()


def _inside(module: str, packages: list[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _imports(module: str) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in the module, function-level ones included;
    ``from a import b`` counts as ``a.b``."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return []
    with open(spec.origin, encoding="utf-8") as f:
        tree = ast.parse(f.read(), spec.origin)
    names: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return names
