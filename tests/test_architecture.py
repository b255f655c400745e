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


def test_only_the_validation_module_branches_on_the_way_of_validating():
    """`folds` appears outside digitlab.validation, the K-fold trainer (folds.py) and the
    CLI parser only as the search file's own field and its checks, never in a branch."""
    import re

    allowed = {"validation.py", "folds.py", "cli_parser.py"}
    branches = []
    for path in SRC.rglob("*.py"):
        if path.name in allowed:
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            code = line.split("#")[0]
            if re.search(r"\bfolds?\b", code) and re.search(r"\b(if|elif|else)\b", code):
                branches.append(f"{path.relative_to(SRC)}:{number}: {line.strip()}")
    assert not branches, "\n".join(branches)


def test_a_trial_reaches_train_run_through_its_validation_not_a_function_passed_in():
    import inspect

    from digitlab import tracked, validation

    assert "fit" not in inspect.signature(tracked.tracked_run).parameters
    assert "folds" not in inspect.signature(tracked.tracked_run).parameters
    assert "train.run(" in inspect.getsource(validation.Holdout.fit)
    assert "train.run(" in inspect.getsource(__import__("digitlab.folds").folds.FoldTrainer.__call__)
