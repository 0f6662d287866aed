"""Nothing in the package can run code from a file: no pickle, no torch.load without weights_only=True,
no eval/exec/compile, no dynamic import of a name that comes from data. Checked on the AST of every
module in plugin/ and integrations/; the scanner itself is tested on snippets that must be caught."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("plugin", "integrations")
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
UNSAFE_BUILTINS = {"eval", "exec", "compile", "__import__"}
# Dynamic imports whose name is not data: (file, function) -> why it is allowed.
ALLOWED_DYNAMIC_IMPORTS = {
    ("integrations/kohya/network.py", "import_base_network"):
        "the module name comes from sd-scripts' own --network_args on the trainer's command line, the same "
        "trust as sd-scripts' --network_module, which sd-scripts itself imports with importlib",
}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""  # a method of a computed object, e.g. f().eval()
    return ""


class Scanner(ast.NodeVisitor):
    """Collects (line, problem) for every unsafe construct in one module."""

    def __init__(self, relpath: str) -> None:
        self.relpath = relpath
        self.problems: list[tuple[int, str]] = []
        self.aliases: dict[str, str] = {}  # local name -> module or module.attr it stands for
        self.function: list[str] = []

    def _flag(self, node: ast.AST, problem: str) -> None:
        self.problems.append((getattr(node, "lineno", 0), problem))

    def visit_FunctionDef(self, node) -> None:
        self.function.append(node.name)
        self.generic_visit(node)
        self.function.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            if a.name.split(".")[0] in UNSAFE_MODULES:
                self._flag(node, f"imports {a.name}")
            self.aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if module.split(".")[0] in UNSAFE_MODULES:
            self._flag(node, f"imports from {module}")
        for a in node.names:
            self.aliases[a.asname or a.name] = f"{module}.{a.name}"
            if module == "torch" and a.name == "load":
                self._flag(node, "imports torch.load by name (calls cannot be checked)")
        self.generic_visit(node)

    def _resolve(self, func: ast.AST) -> str:
        name = _dotted(func)
        head, _, rest = name.partition(".")
        if head in self.aliases:
            return self.aliases[head] + ("." + rest if rest else "")
        return name

    def visit_Call(self, node: ast.Call) -> None:
        name = self._resolve(node.func)
        kwargs = {k.arg: k.value for k in node.keywords if k.arg}
        if name in UNSAFE_BUILTINS or name in {f"builtins.{b}" for b in UNSAFE_BUILTINS}:
            self._flag(node, f"calls {name}()")
        elif name == "torch.load":
            flag = kwargs.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                self._flag(node, "calls torch.load without weights_only=True")
        elif name in ("numpy.load", "np.load"):
            flag = kwargs.get("allow_pickle")
            if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                self._flag(node, "calls numpy.load with allow_pickle")
        elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
            self._flag(node, f"calls {name} (use yaml.safe_load)")
        elif name in ("os.system", "os.popen") or (
                name.startswith("subprocess.") and isinstance(kwargs.get("shell"), ast.Constant)
                and kwargs["shell"].value is True):
            self._flag(node, f"runs a shell via {name}")
        elif name in ("importlib.import_module", "importlib.__import__", "runpy.run_path", "runpy.run_module"):
            where = (self.relpath, self.function[-1] if self.function else "")
            constant = node.args and isinstance(node.args[0], ast.Constant)
            if not constant and where not in ALLOWED_DYNAMIC_IMPORTS:
                self._flag(node, f"imports a module named at run time via {name}")
        elif _dotted(node.func).endswith(".__reduce__") or _dotted(node.func).endswith("pickle.loads"):
            self._flag(node, "unpickles")
        self.generic_visit(node)


def scan_source(source: str, relpath: str = "<snippet>") -> list[tuple[int, str]]:
    scanner = Scanner(relpath)
    scanner.visit(ast.parse(source))
    return scanner.problems


def _package_files() -> list[Path]:
    files = sorted(p for d in SCANNED for p in (ROOT / d).rglob("*.py"))
    assert len(files) >= 10, f"expected the package's modules under {SCANNED}, found {len(files)}"
    return files


def test_package_has_no_unsafe_calls():
    problems = []
    for path in _package_files():
        rel = path.relative_to(ROOT).as_posix()
        problems += [f"{rel}:{line}: {what}" for line, what in scan_source(path.read_text(encoding="utf-8"), rel)]
    assert not problems, "unsafe constructs:\n" + "\n".join(problems)


def test_allowed_dynamic_imports_still_exist():
    """Each allow-list entry must name a real function that calls importlib (a stale entry would hide nothing)."""
    for (rel, function), _why in ALLOWED_DYNAMIC_IMPORTS.items():
        tree = ast.parse((ROOT / rel).read_text(encoding="utf-8"))
        funcs = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function]
        assert funcs, f"{rel}: no function {function}"
        assert "importlib.import_module" in ast.unparse(funcs[0])


@pytest.mark.parametrize("snippet, problem", [
    ("import pickle\npickle.loads(b'')", "imports pickle"),
    ("from pickle import loads", "imports from pickle"),
    ("import dill as d", "imports dill"),
    ("import torch\ntorch.load('x.pt')", "without weights_only=True"),
    ("import torch\ntorch.load('x.pt', weights_only=False)", "without weights_only=True"),
    ("import torch as t\nt.load(path, map_location='cpu')", "without weights_only=True"),
    ("from torch import load", "imports torch.load by name"),
    ("eval(user_text)", "calls eval()"),
    ("exec(code)", "calls exec()"),
    ("compile(src, 'f', 'exec')", "calls compile()"),
    ("__import__(name)", "calls __import__()"),
    ("import builtins\nbuiltins.eval('1')", "calls builtins.eval()"),
    ("import importlib\nimportlib.import_module(meta['module'])", "imports a module named at run time"),
    ("import numpy as np\nnp.load('a.npy', allow_pickle=True)", "allow_pickle"),
    ("import subprocess\nsubprocess.run(cmd, shell=True)", "runs a shell"),
    ("import os\nos.system(cmd)", "runs a shell"),
    ("import yaml\nyaml.load(text)", "yaml.safe_load"),
])
def test_scanner_catches(snippet, problem):
    found = scan_source(snippet)
    assert any(problem in what for _, what in found), found


@pytest.mark.parametrize("snippet", [
    "import torch\ntorch.load('x.pt', weights_only=True)",
    "from safetensors.torch import load_file\nload_file('x.safetensors')",
    "import importlib\nimportlib.import_module('json')",
    "model.eval()",
    "copy.deepcopy(unet).requires_grad_(False).eval()",
    "import numpy as np\nnp.load('a.npy')",
    "import subprocess\nsubprocess.run(['ls'])",
])
def test_scanner_allows(snippet):
    assert scan_source(snippet) == []
