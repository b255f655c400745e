"""The docs say what the code does: every `digitlab` command and flag, `make` target,
`mlflow run` entry point and parameter, and repository file that README.md and docs/ name
exists, and docs/configuration.md is what the experiment dataclasses generate.

The docs are parsed, not grepped: fenced code blocks (a line continued with `\\` is one
command, a shell comment is not code), inline code spans (which may wrap onto the next
line), and option tables (`| option | ...`), whose flags belong to the `digitlab` command
named last before the table. Each problem is reported as `file:line: what is wrong`.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import yaml
from docs import config_reference

from digitlab.cli_parser import build_parser
from tests.conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
GLOBAL_FLAGS = {"-h", "--help", "-v", "--verbose"}
# Files of the repository that the docs name by path (generated files are left out: they
# hold a placeholder, or a name the commands write, such as benchmarks/results.json).
REPO_PATH = re.compile(r"(?<![\w/.-])((?:src|tests|benchmarks|docs|experiments|search|registry)"
                       r"/[a-z0-9_./-]*\.(?:py|yaml|md|png))(?![\w/-])")
GENERATED = {"benchmarks/results.json"}


def code_snippets(text: str) -> list[tuple[int, str, bool]]:
    """(line number, code, is an option-table row) for every command line of a fenced
    block, every inline code span and the first cell of every option-table row."""
    out: list[tuple[int, str, bool]] = []
    lines = text.splitlines()
    fence, pending, pending_at = None, "", 0
    paragraph: list[tuple[int, str]] = []

    def spans(block: list[tuple[int, str]]) -> None:
        if not block:
            return
        first, joined = block[0][0], "\n".join(line for _, line in block)
        option_table = None
        for number, line in block:
            if line.lstrip().startswith("|"):
                cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
                if option_table is None:
                    option_table = bool(cells) and cells[0].lower() in {"option", "flag"}
                elif option_table and cells and not set(cells[0]) <= set("-: "):
                    out.extend((number, s, True) for s in re.findall(r"`([^`]+)`", cells[0]))
        for match in re.finditer(r"(`+)(.+?)\1", joined, re.S):
            number = first + joined.count("\n", 0, match.start())
            out.append((number, " ".join(match.group(2).split()), False))

    for number, line in enumerate(lines, start=1):
        opening = re.match(r"\s*(```+|~~~+)", line)
        if fence is None and opening:
            spans(paragraph)
            paragraph, fence = [], opening.group(1)
            continue
        if fence is not None:
            if line.strip().startswith(fence):
                fence = None
                continue
            code = re.split(r"(?:^|\s)#(?!\w)", line)[0].rstrip()  # not the shell comment
            if not pending:
                pending_at = number
            pending += " " + code.rstrip("\\").strip()
            if not code.endswith("\\"):
                out.append((pending_at, pending.strip(), False))
                pending = ""
            continue
        if not line.strip():
            spans(paragraph)
            paragraph = []
        else:
            paragraph.append((number, line))
    spans(paragraph)
    return sorted(out, key=lambda item: item[0])


def commands() -> dict[str, set[str]]:
    """digitlab's commands -> their option strings, read from the real parser."""
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {name: {s for a in p._actions for s in a.option_strings} for name, p in sub.choices.items()}


def make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w-]*)\s*:(?!=)", (REPO / "Makefile").read_text(), re.M))


def entry_points() -> dict[str, set[str]]:
    project = yaml.safe_load((REPO / "MLproject").read_text())
    return {name: set(e.get("parameters") or {}) for name, e in project["entry_points"].items()}


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def link_problems(text: str, where: str) -> list[str]:
    """Relative links (and their #anchors) that lead nowhere; `where` is the file's path."""
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            path, _, fragment = target.partition("#")
            file = (REPO / where).parent / path if path else REPO / where
            if not file.exists():
                found.append(f"{where}:{number}: the link {target} leads to no file")
            elif fragment and file.suffix == ".md":
                headings = re.findall(r"^#+\s+(.+)$", file.read_text(), re.M)
                if fragment not in {anchor(h) for h in headings}:
                    found.append(f"{where}:{number}: the link {target}: {path or where} has no such heading")
    return found


def script_options(path: str) -> set[str] | None:
    """The options a script of benchmarks/ declares (its argparse calls), None if no such file."""
    file = REPO / path
    if not file.is_file():
        return None
    return set(re.findall(r"""add_argument\(\s*["'](--?[\w-]+)["']""", file.read_text())) | GLOBAL_FLAGS


def flags_in(words: list[str]) -> list[str]:
    return re.findall(r"(?<![\w/.=:-])(--?[a-zA-Z][\w-]*)", " ".join(words))


def problems(text: str, where: str) -> list[str]:
    """What `text` names that the parser, the Makefile, MLproject or the repository does not have."""
    known, targets, entries = commands(), make_targets(), entry_points()
    every_parameter = set().union(*entries.values())
    found: list[str] = link_problems(text, where)
    last_command = None  # the option table's command: the last one named before it
    for number, code, option_row in code_snippets(text):
        at = f"{where}:{number}:"
        if option_row:
            if last_command is None:
                found.append(f"{at} an option table with no `digitlab <command>` named before it")
                continue
            found += [f"{at} `digitlab {last_command}` has no {flag} (option table)"
                      for flag in flags_in(code.split()[:1]) if flag not in known[last_command] | GLOBAL_FLAGS]
            continue
        for path in REPO_PATH.findall(code):
            if path not in GENERATED and not (REPO / path).exists():
                found.append(f"{at} {path} does not exist")
        for segment in re.split(r"&&|\|\||;|(?<!\\)\|(?![\w\\])", code):
            words = segment.split()
            program = [i for i, w in enumerate(words) if w == "digitlab" or w.endswith("/digitlab")]
            if program:
                rest = words[program[0] + 1:]
                while rest and rest[0] in GLOBAL_FLAGS:
                    rest = rest[1:]
                if rest and re.fullmatch(r"[a-z][\w-]*", rest[0]):
                    command = rest[0]
                    if command not in known:
                        found.append(f"{at} `digitlab {command}` is not a command")
                        continue
                    last_command = command
                    found += [f"{at} `digitlab {command}` has no {flag}"
                              for flag in flags_in(rest[1:]) if flag not in known[command] | GLOBAL_FLAGS]
            script = next((i for i, w in enumerate(words[1:], 1)
                           if words[i - 1].startswith("python") and w.startswith("benchmarks/")), None)
            if script is not None:
                options = script_options(words[script])
                if options is None:
                    found.append(f"{at} {words[script]} does not exist")
                else:
                    found += [f"{at} {words[script]} has no {flag}"
                              for flag in flags_in(words[script + 1:]) if flag not in options]
            if words[:1] == ["make"]:
                for target in (w for w in words[1:] if re.fullmatch(r"[a-z][\w-]*", w)):
                    if target not in targets:
                        found.append(f"{at} the Makefile has no target {target!r}")
            run = next((i for i in range(len(words) - 1) if words[i:i + 2] == ["mlflow", "run"]), None)
            parameters = [(words[i + 1] if w in ("-P", "--param-list") else w[2:]).split("=", 1)[0]
                          for i, w in enumerate(words)
                          if (w in ("-P", "--param-list") and i + 1 < len(words))
                          or (w.startswith("-P") and len(w) > 2)]
            if run is not None:
                args = words[run + 2:]
                entry = "main"
                for i, w in enumerate(args):
                    if w in ("-e", "--entry-point") and i + 1 < len(args):
                        entry = args[i + 1]
                    elif w.startswith("--entry-point="):
                        entry = w.split("=", 1)[1]
                if entry not in entries:
                    found.append(f"{at} MLproject has no entry point {entry!r}")
                    continue
                found += [f"{at} entry point {entry} has no parameter {name!r}"
                          for name in parameters if name not in entries[entry]]
            else:  # `-P name=value` in prose: some entry point must take it
                found += [f"{at} no MLproject entry point has a parameter {name!r}"
                          for name in parameters if name not in every_parameter]
    return sorted(found, key=lambda problem: int(problem.split(":")[1]))  # in the file's order


def test_every_command_flag_target_entry_point_and_file_the_docs_name_exists():
    found = [p for path in DOCS for p in problems(path.read_text(), path.relative_to(REPO).as_posix())]
    assert not found, "the docs name what does not exist:\n" + "\n".join(found)


def test_the_check_reads_every_kind_of_code_and_fails_on_what_is_wrong():
    text = """\
Run `digitlab search --space quick --no-such-flag 3`, then:

```bash
digitlab promote --ensemble 3 --tta --quickly   # a comment --not-checked
make tests
mlflow run . -e search -P spaces=quick
mlflow run . -e serve
python benchmarks/run.py --only train --fast
digitlab deploy
digitlab server --host 0.0.0.0 \\
    --auth-db-url sqlite:///auth.db
```

A span may wrap: `digitlab submit
--model --output x.csv` and `-P max_epoch=1`; see `src/digitlab/nothing.py`.
[Searching](docs/searching.md#engines), [gone](docs/nothing.md), [no heading](docs/ui.md#nothing).

| option | meaning |
| --- | --- |
| `--output PATH` | the CSV |
| `--outptu PATH` | a typo |
"""
    assert problems(text, "x.md") == [
        "x.md:1: `digitlab search` has no --no-such-flag",
        "x.md:4: `digitlab promote` has no --quickly",
        "x.md:5: the Makefile has no target 'tests'",
        "x.md:6: entry point search has no parameter 'spaces'",
        "x.md:7: MLproject has no entry point 'serve'",
        "x.md:8: benchmarks/run.py has no --fast",
        "x.md:9: `digitlab deploy` is not a command",
        "x.md:10: `digitlab server` has no --auth-db-url",
        "x.md:14: `digitlab submit` has no --model",
        "x.md:15: no MLproject entry point has a parameter 'max_epoch'",
        "x.md:15: src/digitlab/nothing.py does not exist",
        "x.md:16: the link docs/nothing.md leads to no file",
        "x.md:16: the link docs/ui.md#nothing: docs/ui.md has no such heading",
        "x.md:21: `digitlab submit` has no --outptu (option table)",
    ]
    right = """\
`digitlab search --space quick --folds 5` and `make test-slow`, `mlflow run . -e promote
-P tta=true -P force=true`, `.venv/bin/digitlab -v ui --host 0.0.0.0`, `-P kaggle_submit=true`,
`python -m digitlab train --set model.dropout=0.3` (src/digitlab/config.py),
`python benchmarks/studies/recipes.py --arms base --seeds 3`.
"""
    assert problems(right, "y.md") == []


def test_configuration_page_is_what_the_dataclasses_generate():
    page = (REPO / "docs" / "configuration.md").read_text()
    assert page == config_reference.render(), (
        "docs/configuration.md is stale: python docs/config_reference.py > docs/configuration.md")


def test_configuration_page_covers_every_key_with_a_meaning():
    from digitlab import config

    flat = set(config.ExperimentConfig(model=config.ModelConfig(
        blocks=[config.ConvBlock(filters=[8])])).flat())
    listed = {key for key, *_ in config_reference.rows()}
    blocks = {k for k in listed if k.startswith("model.blocks.N.")}
    missing = flat - {"model.blocks"} - listed
    assert not missing, f"keys of the experiment dataclasses not in docs/configuration.md: {missing}"
    assert blocks == {"model.blocks.N.filters", "model.blocks.N.kernel_size", "model.blocks.N.pool"}
    assert len(listed) >= 35
    undocumented = [key for key, _, _, meaning in config_reference.rows() if not meaning]
    assert not undocumented, f"fields without a comment in config.py: {undocumented}"
    page = (REPO / "docs" / "configuration.md").read_text()
    for key in listed:
        assert f"| `{key}` |" in page, f"docs/configuration.md has no row for {key}"
    # The search file's keys, from its dataclasses: every section expanded, each with a meaning.
    from digitlab.search import search_file

    search_rows = config_reference.rows(search_file.StudyFile)
    assert {"experiments", "objective.metric", "budget.minutes", "optuna.pruner", "kerastuner.tuner",
            "validation", "space", "start"} <= {key for key, *_ in search_rows}
    assert "path" not in {key for key, *_ in search_rows}  # set by the loader, not a key
    undocumented = [key for key, _, _, meaning in search_rows if not meaning]
    assert not undocumented, f"fields without a comment in search/search_file.py: {undocumented}"
    search_part = page.split("## Search files", 1)[1]
    for key, *_ in search_rows:
        assert f"| `{key}` |" in search_part, f"docs/configuration.md has no row for search key {key}"
    assert "experiments/NAME.yaml" in page and "`digit-recognizer`" in page  # both "experiments"
    assert Path(REPO / "README.md").read_text().count("docs/configuration.md") >= 1


def test_the_search_file_example_loads_and_shows_every_key(workdir):
    """docs/searching.md's example is a real search file, and it shows every key the
    dataclasses have, so the example and the generated table cannot drift apart."""
    from digitlab.search import search_file

    page = (REPO / "docs" / "searching.md").read_text()
    section = page.split("## The search file", 1)[1]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    path = workdir / "example.yaml"
    path.write_text(example)
    study_file = search_file.load(path)
    assert study_file.validator.command_options() == ["--validation", "kfold:folds=5"]
    assert study_file.budget.minutes == 90
    assert study_file.final.models == 2 and study_file.final.passes == 16
    shown = {key for key, *_ in config_reference.rows(search_file.StudyFile)
             if f"{key.rsplit('.', 1)[-1]}:" in example}
    assert shown == {key for key, *_ in config_reference.rows(search_file.StudyFile)}


FIGURE = re.compile(r"\d[\d,.]*\s*(?:%|min|s|GB|MB|images/s|rows/s)(?![\w])")


def figure_problems(readme: str, performance: str) -> list[str]:
    """Each figure of the README's Performance table must be in docs/performance.md, the one
    place figures are recorded: a README row whose figure the page does not state (or states
    otherwise) is a problem, named by its line."""
    problems = []
    section = readme.split("## Performance", 1)[1].split("\n## ", 1)[0]
    start = readme[: readme.index("## Performance")].count("\n") + 1
    for offset, line in enumerate(section.splitlines()):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not line.lstrip().startswith("|") or cells[0] in ("measure", "") \
                or set(cells[0]) <= set("-: "):
            continue
        for figure in FIGURE.findall(cells[1]):
            if figure not in performance:
                problems.append(f"README.md:{start + offset}: {figure} ({cells[0]}) is not what "
                                "docs/performance.md records")
    return problems


def test_every_readme_figure_is_the_one_docs_performance_records():
    readme = (REPO / "README.md").read_text()
    performance = (REPO / "docs" / "performance.md").read_text()
    assert not figure_problems(readme, performance)
    # and the check can fail: a figure the page does not state is named with its line
    wrong = readme.replace("| training throughput", "| training throughput (was 1,234 images/s)", 1)
    wrong = re.sub(r"(\| training throughput[^|]*\| )", r"\g<1>1,234 images/s; ", wrong, count=1)
    problems = figure_problems(wrong, performance)
    assert problems and "1,234 images/s (training throughput" in problems[0]
