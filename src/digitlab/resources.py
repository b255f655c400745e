"""Where experiment, search and registry files are found.

The working directory first (a user's own `experiments/`, `search/` and
`registry/` win), then the copies shipped inside the package, so an installed
`digitlab` works from any folder. A name (`basic_cnn`, `quick`) is looked up in
both places; an existing path is taken as it is; a relative path that starts with
the folder's name (`search/quick.yaml`, the MLproject default) falls back to the
shipped copy when the working directory has none.
"""

from __future__ import annotations

from pathlib import Path

from digitlab.errors import ConfigError

# Symbolic links to the repository's top-level folders in a checkout; real copies in a wheel.
SHIPPED = Path(__file__).resolve().parent / "defaults"
KINDS = {"experiments": "experiment", "search": "search file", "registry": "registry file"}


def places(kind: str) -> list[Path]:
    """The folders looked in for `kind`, in order."""
    return [Path(kind), SHIPPED / kind]


def available(kind: str) -> list[str]:
    """Names (file stems) that `find` resolves, from every place."""
    return sorted({p.stem for folder in places(kind) for p in folder.glob("*.yaml")})


def find(kind: str, name_or_path: str) -> Path:
    """The file for a name or a path; ConfigError lists the places and the names available."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        candidates = [path]
        if not path.is_absolute() and path.parts[0] == kind:
            candidates.append(SHIPPED / path)
    else:
        candidates = [folder / f"{name_or_path}.yaml" for folder in places(kind)]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    known = ", ".join(available(kind)) or "none"
    raise ConfigError(f"{KINDS[kind]} {name_or_path!r} not found (looked for {looked}; "
                      f"available: {known})")


def optional(kind: str, filename: str) -> Path | None:
    """The first `kind/filename` that exists (the working directory's, else the shipped one)."""
    return next((folder / filename for folder in places(kind) if (folder / filename).is_file()), None)
