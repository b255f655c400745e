"""docs/configuration.md, generated from the experiment dataclasses in `config.py` and the
search file's in `search/search_file.py`.

Every key is listed in the dotted form that `--set`, experiment files and search spaces
use, with its type, its default and its meaning: the comment on (or just above) the
field, so the page and the code cannot say different things.
`python docs/config_reference.py > docs/configuration.md` regenerates it, and a test fails
when the checked-in page differs from what this prints. A docs build tool, not part of the
installed package.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import sys
import tokenize
import typing

from digitlab import config, typed, validation
from digitlab.search import search_file

HEADER = """\
# Experiment configuration

*Generated from the dataclasses in `src/digitlab/config.py` and
`src/digitlab/search/search_file.py` and their comments by
`python docs/config_reference.py > docs/configuration.md`: edit the comments there and
run that command, not this page (a test fails when the two differ).*

Two things are called an *experiment* here:

- **An experiment file** (a recipe): `experiments/NAME.yaml`, looked up in the working
  directory first, then in the copies shipped with digitlab. It holds only what differs
  from the defaults below; `digitlab train --experiment NAME` trains it, and a search file
  names the experiments its trials start from.
- **The MLflow experiment**: the folder of runs in the tracking store (`mlflow.db` in the
  working directory, or `MLFLOW_TRACKING_URI`) where every run lands: `digit-recognizer`,
  unless `MLFLOW_EXPERIMENT_NAME` (or `mlflow run --experiment-name`) names another.
  `digitlab ui` opens it. Training the experiment file `basic_cnn` makes a run named
  `basic_cnn` in the MLflow experiment `digit-recognizer`.

Every key below can be set in an experiment file (nested YAML), overridden with
`--set KEY=VALUE` (e.g. `--set model.dropout=0.3`), fixed or searched in a search file
(`fixed:` / `space:`, e.g. `model.dropout: {type: float, low: 0.1, high: 0.5}`). An
unknown key or a value of the wrong type is an error, never ignored. A list of conv
blocks is addressed by position: `model.blocks.0.filters`.

```yaml
description: Basic CNN - Conv 32 and Conv 64 (ReLU, 3x3), max pooling, Dense 128, dropout 0.5.
model:
  blocks:
    - {filters: [32, 64], kernel_size: 3, pool: max}
  dense_units: [128]
  dropout: 0.5
training:
  epochs: 10
```

| key | type | default | meaning |
| --- | --- | --- | --- |
"""


SEARCH_HEADER = """
## Search files

A search file (`search/NAME.yaml`, looked up like an experiment file; `digitlab search
--space NAME`) is built the same way: nested sections, every one optional but
`experiments`, an unknown key or a wrong type an error. docs/searching.md shows a whole
file and what each engine does with it.

| key | type | default | meaning |
| --- | --- | --- | --- |
"""

VALIDATION_HEADER = """
### Validation kinds

The search file's `validation:` section names a kind and its parameters, e.g.
`validation: {kind: kfold, folds: 5}` (`digitlab search --validation kfold:folds=5`, or
`--folds 5`). Without it, every trial holds out its experiment's own split
(`training.validation_fraction`).
"""


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> its comment: the trailing `# ...` on its line, else the comment lines
    directly above it."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    out = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for number, line in enumerate(lines, start=1):
        name = line.strip().split(":", 1)[0]
        if name not in names or not line.startswith("    ") or line.startswith("     "):
            continue
        if not line.strip().startswith("#") and number in comments:
            out[name] = comments[number]
            continue
        above, k = [], number - 1
        while k >= 1 and lines[k - 1].strip().startswith("#"):
            above.insert(0, comments[k])
            k -= 1
        if above:
            out[name] = " ".join(above)
    return out


def _type_text(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        return f"list of {_type_text(item)}"
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return " or ".join("null" if a is type(None) else _type_text(a) for a in typing.get_args(tp))
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"' if value == "" else value
    return str(value)


def rows(cls: type = config.ExperimentConfig, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, meaning) for every leaf field, nested ones expanded."""
    out = []
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get(typed.NOT_A_KEY):
            continue
        key, tp = f"{prefix}{f.name}", hints[f.name]
        meaning = comments.get(f.name, "")
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if dataclasses.is_dataclass(tp):
            out += rows(tp, f"{key}.")
        elif item is not None and dataclasses.is_dataclass(item):
            out.append((key, f"list of {item.__name__}", _default_text(f), meaning))
            out += rows(item, f"{key}.N.")
        else:
            out.append((key, _type_text(tp), _default_text(f), meaning))
    return out


def render() -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    def table(cls: type) -> str:
        return "".join(f"| `{k}` | {cell(t)} | `{d}` | {cell(m)} |\n" for k, t, d, m in rows(cls))

    kinds = "".join(
        f"\n**`{kind}`**: {' '.join(sys.modules[cls.__module__].__doc__.split())}\n\n"
        + ("| key | type | default | meaning |\n| --- | --- | --- | --- |\n"
           + "".join(f"| `validation.{k}` | {cell(t)} | `{d}` | {cell(m)} |\n" for k, t, d, m in rows(cls))
           if rows(cls) else "")
        for kind, cls in validation.KINDS.items() if cls.holds_out)
    return (HEADER + table(config.ExperimentConfig) + SEARCH_HEADER + table(search_file.StudyFile)
            + VALIDATION_HEADER + kinds)


if __name__ == "__main__":
    print(render(), end="")
