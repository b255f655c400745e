"""The dependency rules that keep one place per concern, checked on the source."""

import ast

from tests.conftest import REPO

SRC = REPO / "src" / "digitlab"


def imports(path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_the_search_does_not_import_the_registry():
    """The search ranks its trials (search.ranking); the registry imports that, never the
    reverse."""
    offenders = {p.name: sorted(i for i in imports(p) if i.startswith("digitlab.registry"))
                 for p in (SRC / "search").glob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}
    assert "digitlab.search.ranking" in imports(SRC / "registry" / "selection.py")
