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


VALIDATION = SRC / "validation"
KIND_CLASSES = {"Holdout", "KFold", "RepeatedHoldout", "AllImages", "Validation"}
# a parser is one long list of options; splitting it would scatter one command's flags
LONG_FUNCTIONS = {("cli_parser.py", "build_parser")}


def outside_validation():
    for path in sorted(SRC.rglob("*.py")):
        if VALIDATION not in path.parents:
            yield path, ast.parse(path.read_text())


def kind_questions(tree: ast.AST, name: str) -> list[str]:
    """Where code asks which kind of validation it holds: an isinstance against a kind, a
    comparison of a kind with a kind's name, a kind's own tag read, a folds count passed."""
    from digitlab import validation

    names, found = set(validation.KINDS), []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and getattr(node.func, "id", "") == "isinstance"
                and any(getattr(n, "id", getattr(n, "attr", "")) in KIND_CLASSES
                        for n in ast.walk(node.args[1]))):
            found.append(f"{name}:{node.lineno}: isinstance against a kind")
        inside = list(ast.walk(node))
        if isinstance(node, ast.Compare) and any(
                isinstance(n, ast.Constant) and n.value in names for n in inside) and any(
                getattr(n, "attr", None) == "kind" or getattr(n, "value", None) == "validation"
                for n in inside):
            found.append(f"{name}:{node.lineno}: compares with a kind's name")
        if isinstance(node, ast.Constant) and node.value in ("validation_folds", "validation_fraction"):
            found.append(f"{name}:{node.lineno}: reads a kind's tag {node.value}")
        if isinstance(node, ast.arg) and node.arg == "folds":
            found.append(f"{name}:{node.lineno}: a folds parameter")
        if isinstance(node, ast.keyword) and node.arg == "folds":
            found.append(f"{name}:{node.lineno}: a folds keyword")
        # the --folds shorthand is read in one place, into validation.from_option
        if isinstance(node, ast.Attribute) and node.attr == "folds" and name != "cli.py":
            found.append(f"{name}:{node.lineno}: .folds")
    return found


def test_no_module_outside_the_validation_package_asks_which_kind_it_holds():
    """A new kind is one class in validation/: nothing else asks which kind it holds."""
    found = [q for path, tree in outside_validation()
             for q in kind_questions(tree, str(path.relative_to(SRC)))]
    assert not found, "\n".join(found)


def test_the_kind_check_finds_each_question():
    code = """
def f(scheme, run, folds):
    if isinstance(scheme, validation.KFold): pass
    if scheme.kind == "kfold": pass
    if run.data.tags["validation"] == "repeated": pass
    k = run.data.tags.get("validation_folds")
    make(folds=3)
    return settings.folds
"""
    found = kind_questions(ast.parse(code), "x.py")
    assert sorted(q.split(": ", 1)[1] for q in found) == sorted([
        "a folds parameter", "isinstance against a kind", "compares with a kind's name",
        "compares with a kind's name", "reads a kind's tag validation_folds", "a folds keyword", ".folds"])
    # prose and other comparisons are not questions
    assert not kind_questions(ast.parse("x = pruner != 'none'\ny = 'split' in text"), "y.py")


def test_the_kinds_of_validation_are_one_class_each_in_one_registry():
    from digitlab import validation

    for kind, cls in validation.KINDS.items():
        assert cls.kind == kind and issubclass(cls, validation.Validation)
        module = SRC / "validation" / f"{cls.__module__.rsplit('.', 1)[1]}.py"
        defined = [n.name for n in ast.parse(module.read_text()).body if isinstance(n, ast.ClassDef)]
        assert defined == [cls.__name__], f"{module.name} defines {defined}"


def package_of(module: str) -> str | None:
    """The import graph's node of a module: a subpackage, or a top-level module."""
    parts = module.split(".")
    if parts[0] != "digitlab" or len(parts) < 2:
        return None
    return f"digitlab.{parts[1]}"


def import_graph(src=SRC) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in src.rglob("*.py"):
        rel = path.relative_to(src).parts
        source = f"digitlab.{rel[0] if len(rel) > 1 else path.stem}"
        for target in imports(path):
            node = package_of(target)
            if node and node not in (source, "digitlab.__init__"):
                graph.setdefault(source, set()).add(node)
    return graph


def test_no_import_cycle_between_packages():
    """Inline imports count too: an import inside a function is still an arrow."""
    graph = import_graph()
    assert "digitlab.validation" in graph["digitlab.training_run"]  # the graph is built

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(f"{a} -> {b} -> ... -> {a}" for a in graph for b in graph[a] if a in reach(b))
    assert not cycles, "\n".join(cycles)


def test_the_graph_sees_an_import_inside_a_function(tmp_path):
    pkg = tmp_path / "digitlab"
    (pkg / "search").mkdir(parents=True)
    (pkg / "refit.py").write_text("from digitlab.search import x\n")
    (pkg / "search" / "x.py").write_text("def f():\n    from digitlab import refit\n")
    graph = import_graph(pkg)
    assert graph == {"digitlab.refit": {"digitlab.search"}, "digitlab.search": {"digitlab.refit"}}


def test_no_function_over_60_lines():
    long = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60 and (path.name, node.name) not in LONG_FUNCTIONS:
                    long.append(f"{path.relative_to(SRC)}: {node.name} has {lines} lines")
    assert not long, "\n".join(long)


def test_a_trial_reaches_train_run_through_its_validation_not_a_function_passed_in():
    import inspect

    from digitlab import training_run
    from digitlab.validation import fitter

    assert "fit" not in inspect.signature(training_run.tracked_run).parameters
    assert "folds" not in inspect.signature(training_run.tracked_run).parameters
    assert "train.run(" in inspect.getsource(fitter.fit)


def test_every_module_says_what_it_owns():
    missing = [str(p.relative_to(SRC)) for p in sorted(SRC.rglob("*.py"))
               if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, missing
