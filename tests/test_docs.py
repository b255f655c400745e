"""The docs say what the code does: every `digitlab` command and flag, `make` target and
`mlflow run` entry point and parameter that README.md and docs/ name exists, and
docs/configuration.md is what the experiment dataclasses generate."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import yaml

from digitlab import config_reference
from digitlab.cli_parser import build_parser
from tests.conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
GLOBAL_FLAGS = {"-h", "--help", "-v", "--verbose"}


def code_lines(text: str) -> list[tuple[int, str]]:
    """(line number, code) for every fenced block line and every inline code span."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            out.append((number, line.split(" #")[0]))  # not the shell comment after it
        else:
            out += [(number, span) for span in re.findall(r"`([^`]+)`", line)]
    return out


def commands() -> dict[str, set[str]]:
    """digitlab's commands -> their option strings, read from the real parser."""
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {name: {s for a in p._actions for s in a.option_strings} for name, p in sub.choices.items()}


def make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w-]*):", (REPO / "Makefile").read_text(), re.M))


def entry_points() -> dict[str, set[str]]:
    project = yaml.safe_load((REPO / "MLproject").read_text())
    return {name: set(e.get("parameters", {})) for name, e in project["entry_points"].items()}


def problems(text: str, where: str) -> list[str]:
    """What `text` names that the parser, the Makefile or MLproject does not have."""
    known, targets, entries = commands(), make_targets(), entry_points()
    found = []
    for number, code in code_lines(text):
        for segment in re.split(r"&&|\|\||;|\|(?!\w)", code):
            words = segment.split()
            if "digitlab" in words:
                at = words.index("digitlab")
                rest = words[at + 1:]
                while rest and rest[0] in GLOBAL_FLAGS:
                    rest = rest[1:]
                if not rest or rest[0].startswith(("-", "<", "[", "COMMAND")):
                    continue
                command = rest[0]
                if command not in known:
                    if re.fullmatch(r"[a-z]+", command):
                        found.append(f"{where}:{number}: `digitlab {command}` is not a command")
                    continue
                for flag in re.findall(r"(?<![\w/.-])(--?[a-z][\w-]*)", " ".join(rest[1:])):
                    if flag not in known[command] | GLOBAL_FLAGS:
                        found.append(f"{where}:{number}: `digitlab {command}` has no {flag}")
            if words[:1] == ["make"] and len(words) > 1 and not words[1].startswith("-"):
                for target in (w for w in words[1:] if re.fullmatch(r"[a-z][\w-]*", w)):
                    if target not in targets:
                        found.append(f"{where}:{number}: the Makefile has no target {target!r}")
            if words[:2] == ["mlflow", "run"]:
                entry = words[words.index("-e") + 1] if "-e" in words else "main"
                if entry not in entries:
                    found.append(f"{where}:{number}: MLproject has no entry point {entry!r}")
                    continue
                for i, word in enumerate(words):
                    if word == "-P" and i + 1 < len(words):
                        name = words[i + 1].split("=", 1)[0]
                        if name not in entries[entry]:
                            found.append(f"{where}:{number}: entry point {entry} has no parameter {name!r}")
    return found


def test_every_command_flag_target_and_entry_point_the_docs_name_exists():
    found = [p for path in DOCS for p in problems(path.read_text(), path.relative_to(REPO).as_posix())]
    assert not found, "\n".join(found)


def test_the_check_fails_on_a_wrong_flag_target_or_parameter():
    text = """
Run `digitlab search --space quick --no-such-flag 3`, then:

```bash
digitlab promote --ensemble 3 --tta --quickly   # a comment --not-checked
make tests
mlflow run . -e search -P spaces=quick
mlflow run . -e serve
digitlab deploy
```
"""
    assert problems(text, "x.md") == [
        "x.md:2: `digitlab search` has no --no-such-flag",
        "x.md:5: `digitlab promote` has no --quickly",
        "x.md:6: the Makefile has no target 'tests'",
        "x.md:7: entry point search has no parameter 'spaces'",
        "x.md:8: MLproject has no entry point 'serve'",
        "x.md:9: `digitlab deploy` is not a command",
    ]
    right = "`digitlab search --space quick --folds 5` and `make test-slow`, `mlflow run . -e promote -P tta=true`"
    assert problems(right, "y.md") == []


def test_configuration_page_is_what_the_dataclasses_generate():
    page = (REPO / "docs" / "configuration.md").read_text()
    assert page == config_reference.render(), (
        "docs/configuration.md is stale: python -m digitlab.config_reference > docs/configuration.md")


def test_configuration_page_covers_every_key_with_a_meaning():
    from digitlab import config

    flat = set(config.ExperimentConfig(model=config.ModelConfig(
        blocks=[config.ConvBlock(filters=[8])])).flat())
    listed = {key for key, *_ in config_reference.rows()}
    blocks = {k for k in listed if k.startswith("model.blocks.N.")}
    assert flat - {"model.blocks"} <= listed | {"model.blocks"}  # blocks: a whole list param
    assert blocks == {"model.blocks.N.filters", "model.blocks.N.kernel_size", "model.blocks.N.pool"}
    assert len(listed) >= 35
    undocumented = [key for key, _, _, meaning in config_reference.rows() if not meaning]
    assert not undocumented, f"fields without a comment in config.py: {undocumented}"
    page = (REPO / "docs" / "configuration.md").read_text()
    for key in listed:
        assert f"| `{key}` |" in page, key
    assert Path(REPO / "README.md").read_text().count("docs/configuration.md") >= 1
