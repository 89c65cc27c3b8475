"""Every public definition of hhbench says what it does: module-level functions and classes whose name does not
start with "_", and the public methods (properties included) of those classes. Nested functions and the
methods of private classes are implementation, and dunders are Python's."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hhbench"
DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def undocumented(source: str, where: str) -> list[str]:
    """'path:line name' of each public definition in `source` without a docstring."""
    missing = []
    for node in ast.parse(source).body:
        if not isinstance(node, DEFINITIONS) or node.name.startswith("_"):
            continue
        members = [node]
        if isinstance(node, ast.ClassDef):
            members += [m for m in node.body if isinstance(m, DEFINITIONS) and not m.name.startswith("_")]
        for member in members:
            if ast.get_docstring(member) is None:
                name = member.name if member is node else f"{node.name}.{member.name}"
                missing.append(f"{where}:{member.lineno} {name}")
    return missing


def test_checker_finds_what_lacks_a_docstring():
    source = '''
def bare(): pass
def told():
    """Told."""
def _private(): pass
class Shown:
    """Shown."""
    def method(self): pass
    @property
    def size(self): return 1
    def _helper(self): pass
    def __len__(self): return 0
class _Hidden:
    def method(self): pass
def outer():
    """Outer."""
    def inner(): pass
'''
    assert undocumented(source, "x.py") == ["x.py:2 bare", "x.py:8 Shown.method", "x.py:10 Shown.size"]


def test_public_definitions_have_docstrings():
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        missing += undocumented(path.read_text(), str(path.relative_to(PACKAGE.parent)))
    assert not missing, "public definitions without a docstring:\n" + "\n".join(missing)
