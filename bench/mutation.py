"""Mutation score of engine modules against a test selection: how many small code changes the tests notice.

Each mutant changes one operator or constant of one module (``+``↔``-``, ``*``↔``/``, ``<``↔``<=``,
``==``↔``!=``, ``and``↔``or``, ``not x``→``x``, ``True``↔``False``, an integer ``n``→``n + 1``, a
float ``x``→``x * 2``, ``min``↔``max``). The tests run once per mutant in a forked child of one parent
that has imported torch, open_clip and pytest already; the child serves the mutated source for that module
through an import hook, so nothing on disk changes. A mutant is *killed* when the tests fail or exceed
the timeout, *survives* when they pass.

    python bench/mutation.py attribution/text.py -- tests/attribution/test_text.py -m "not slow"
    python bench/mutation.py attribution/tail.py --budget-s 900 --json tail.json -- tests/attribution/...

Prints the survivors (line, change) and a table row per module; ``--budget-s`` stops starting new
mutants after that many seconds (the score is then over the mutants run, and says so).
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]

SWAPS: dict[type, type] = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.FloorDiv: ast.Mult,
    ast.MatMult: ast.Mult,
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.And: ast.Or,
    ast.Or: ast.And,
}
NAME_SWAPS = {"min": "max", "max": "min"}
PRELOAD = ("pytest", "torch", "numpy", "open_clip", "PIL.Image", "hypothesis", "exclip.explanation")


@dataclass(frozen=True)
class Mutant:
    index: int
    line: int
    change: str


@dataclass
class Outcome:
    mutant: Mutant
    killed: bool
    seconds: float
    how: str  # "failed", "timeout", "survived"


def _sites(tree: ast.Module) -> Iterator[tuple[ast.AST, str]]:
    """Every mutable node in source order, with a description of its change (docstrings skipped)."""
    docstrings = {
        id(body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef)
        and (body := node.body)
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp | ast.AugAssign) and type(node.op) in SWAPS:
            yield node, f"{type(node.op).__name__} -> {SWAPS[type(node.op)].__name__}"
        elif isinstance(node, ast.BoolOp) and type(node.op) in SWAPS:
            yield node, f"{type(node.op).__name__} -> {SWAPS[type(node.op)].__name__}"
        elif isinstance(node, ast.Compare):
            for k, op in enumerate(node.ops):
                if type(op) in SWAPS:
                    yield node, f"#{k} {type(op).__name__} -> {SWAPS[type(op)].__name__}"
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not | ast.USub):
            yield node, f"drop {type(node.op).__name__}"
        elif isinstance(node, ast.Constant) and id(node) not in docstrings:
            value = node.value
            if isinstance(value, bool | int | float):
                yield node, f"{value} -> {_mutated_constant(value)}"
        elif isinstance(node, ast.Name) and node.id in NAME_SWAPS:
            yield node, f"{node.id} -> {NAME_SWAPS[node.id]}"


def _mutated_constant(value: bool | int | float) -> bool | int | float:
    """``True``↔``False``, an integer ``n``→``n + 1``, a float ``x``→``x * 2``."""
    if isinstance(value, bool):  # before int: bool is an int
        return not value
    if isinstance(value, int):
        return value + 1
    return value * 2


def _apply(node: ast.AST, change: str) -> ast.AST | None:
    """Mutate ``node`` in place; return a replacement node where the change replaces it."""
    if isinstance(node, ast.BinOp | ast.AugAssign | ast.BoolOp):
        node.op = SWAPS[type(node.op)]()
    elif isinstance(node, ast.Compare):
        k = int(change.split()[0][1:])
        node.ops[k] = SWAPS[type(node.ops[k])]()
    elif isinstance(node, ast.UnaryOp):
        return node.operand
    elif isinstance(node, ast.Constant):
        value = node.value
        assert isinstance(value, bool | int | float), f"_sites yields no {type(value).__name__} constant"
        node.value = _mutated_constant(value)
    elif isinstance(node, ast.Name):
        node.id = NAME_SWAPS[node.id]
    return None


class _Replace(ast.NodeTransformer):
    def __init__(self, target: ast.AST, replacement: ast.AST) -> None:
        self.target, self.replacement = target, replacement

    def generic_visit(self, node: ast.AST) -> ast.AST:
        if node is self.target:
            return self.replacement
        return super().generic_visit(node)


def mutants(source: str) -> list[Mutant]:
    tree = ast.parse(source)
    return [Mutant(i, getattr(n, "lineno", 0), c) for i, (n, c) in enumerate(_sites(tree))]


def mutated_source(source: str, index: int) -> str:
    tree = ast.parse(source)
    node, change = list(_sites(tree))[index]
    replacement = _apply(node, change)
    if replacement is not None:
        tree = _Replace(node, replacement).visit(copy.copy(tree))
    return ast.unparse(ast.fix_missing_locations(tree))


class _MutatedModule(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves ``source`` for module ``name`` (ahead of every other finder)."""

    def __init__(self, name: str, path: Path, source: str) -> None:
        self.name, self.path, self.source = name, path, source

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name:
            return None
        return importlib.util.spec_from_loader(fullname, self, origin=str(self.path))

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None  # the default module

    def exec_module(self, module: ModuleType) -> None:
        module.__file__ = str(self.path)
        exec(compile(self.source, str(self.path), "exec"), module.__dict__)


def _run_tests(module: str, path: Path, source: str | None, pytest_args: list[str], timeout_s: float) -> str:
    """Run the tests in a forked child (with ``source`` for ``module`` if given): failed/timeout/passed."""
    pid = os.fork()
    if pid == 0:  # the child: quiet, the mutated module first in line, then pytest
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        if source is not None:
            sys.meta_path.insert(0, _MutatedModule(module, path, source))
        import pytest

        code = pytest.main(["-x", "-q", "-p", "no:cacheprovider", *pytest_args])
        os._exit(int(code))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return "passed" if os.waitstatus_to_exitcode(status) == 0 else "failed"
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "timeout"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path, help="the module to mutate, e.g. attribution/text.py")
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="stop starting mutants after")
    parser.add_argument("--only", type=int, nargs="*", help="run these mutant indices only")
    parser.add_argument("--json", type=Path, help="write every outcome here")
    parser.add_argument(
        "--preload",
        nargs="*",
        default=list(PRELOAD),
        help="third-party modules the parent imports (never the project's own: they are mutated)",
    )
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])  # first, so that --help answers
    if split == len(argv):
        parser.error("give the tests to run after --")
    pytest_args = argv[split + 1 :]
    path = (ROOT / args.file).resolve()
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    source = path.read_text()
    sys.path.insert(0, str(ROOT))
    for name in args.preload:  # imported once here, inherited by every child: most of a run's start-up
        importlib.import_module(name)

    start = time.monotonic()
    baseline = _run_tests(module, path, None, pytest_args, 3600)
    base_s = time.monotonic() - start
    if baseline != "passed":
        print(f"the tests fail on the unmutated code ({baseline}): nothing to measure", file=sys.stderr)
        return 2
    timeout_s = max(30.0, 5 * base_s)
    print(f"# {module}: baseline {base_s:.1f} s, timeout {timeout_s:.0f} s", flush=True)
    todo = mutants(source)
    if args.only is not None:
        todo = [m for m in todo if m.index in args.only]
    outcomes: list[Outcome] = []
    for mutant in todo:
        if time.monotonic() - start > args.budget_s:
            break
        t0 = time.monotonic()
        try:
            text = mutated_source(source, mutant.index)
        except (ValueError, TypeError):  # e.g. a mutation ast.unparse cannot write: not a mutant
            continue
        how = _run_tests(module, path, text, pytest_args, timeout_s)
        outcome = Outcome(
            mutant, how != "passed", time.monotonic() - t0, "survived" if how == "passed" else how
        )
        outcomes.append(outcome)
        mark = "SURVIVED" if not outcome.killed else how
        print(f"{mutant.index:4d} line {mutant.line:4d} {mutant.change:28s} {mark}", flush=True)
    killed = sum(o.killed for o in outcomes)
    total = len(todo)
    row = {
        "module": module,
        "mutants": total,
        "run": len(outcomes),
        "killed": killed,
        "survived": len(outcomes) - killed,
        "score": killed / len(outcomes) if outcomes else float("nan"),
        "seconds": time.monotonic() - start,
    }
    print("| module | mutants | run | killed | survived | score | seconds |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {row['module']} | {total} | {row['run']} | {killed} | {row['survived']} | "
        f"{row['score']:.2f} | {row['seconds']:.0f} |"
    )
    for o in outcomes:
        if not o.killed:
            print(f"survivor: line {o.mutant.line}: {o.mutant.change}")
    if args.json:
        args.json.write_text(json.dumps({"row": row, "outcomes": [asdict(o) for o in outcomes]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
