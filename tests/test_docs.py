"""The documentation says true things about the repository.

- Every repository file or folder that README.md, docs/*.md and benchmarks/README.md name
  exists, and every bare source file name they use (`winograd.cc`) is some file's name
  (renaming or removing a file without its docs fails here).
- Every environment variable the code reads (getenv in ffi/, $ENV{} in the CMake files,
  os.environ / os.getenv in jaxconv/ and tests/conftest.py) is a row of README's
  "Environment variables" table, and every row names a variable the repository uses.
- The README's Python examples run, in order, in a fresh interpreter (as a user would paste them).

These read text files only (the examples aside) and take well under a second.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path

import pytest

from child import run_python

ROOT = Path(__file__).resolve().parent.parent

# CHANGELOG.md is history: the files it names may since have gone.
DOCS = [
    ROOT / "README.md",
    ROOT / "benchmarks" / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
]

# A path the docs name: under one of the repository's top-level folders, or a top-level file.
# A leading "../" is relative to the document's own folder (Markdown links); anything else is
# relative to the repository root, as the docs write paths.
_TOP_DIRS = ("ffi", "jaxconv", "tests", "benchmarks", "docs", "tools", ".ci")
_DIR_PATH = re.compile(
    r"(?<![\w./-])((?:\.\./)*(?:" + "|".join(map(re.escape, _TOP_DIRS)) + r")/[\w./*-]*)"
)
_TOP_FILES = (
    "README.md",
    "CHANGELOG.md",
    "LICENSE",
    "pyproject.toml",
    "CMakeLists.txt",
    ".pre-commit-config.yaml",
    ".clang-format",
)
_FILE_PATH = re.compile(r"(?<![\w./-])(" + "|".join(map(re.escape, _TOP_FILES)) + r")(?![\w-])")
# Where commands write their output: named by the docs, never committed.
_GENERATED = ("docs/_build",)


def _named_paths(doc: Path) -> set[str]:
    text = doc.read_text()
    found = set()
    for m in (*_DIR_PATH.finditer(text), *_FILE_PATH.finditer(text)):
        # A path that runs into a shell placeholder ($OUT, $(date ...), <tag>, {x}) is a pattern,
        # not a file.
        if text[m.end() : m.end() + 1] not in ("$", "<", "{"):
            found.add(m.group(1).rstrip("."))
    return found


def _resolve(doc: Path, named: str) -> Path:
    return (doc.parent if named.startswith("../") else ROOT) / named


def test_every_documented_path_exists():
    assert len(DOCS) >= 3 and all(d.is_file() for d in DOCS), DOCS
    missing = []
    checked = 0
    for doc in DOCS:
        for named in sorted(_named_paths(doc)):
            path = _resolve(doc, named)
            if ROOT not in path.resolve().parents and path.resolve() != ROOT:
                continue  # outside the repository (e.g. ../shared/...)
            if any(str(path.relative_to(ROOT)).startswith(g) for g in _GENERATED):
                continue
            checked += 1
            exists = glob.glob(str(path)) if "*" in named else path.exists()
            if not exists:
                missing.append(f"{doc.relative_to(ROOT)} names {named}")
    assert checked > 30, f"only {checked} paths found: is the path pattern still right?"
    assert not missing, "documented paths that do not exist:\n  " + "\n  ".join(missing)


_BARE_SOURCE = re.compile(r"(?<![\w./-])([\w-]+\.(?:cc|h|cu|cuh|inc|py|sh))(?![\w-])")


def test_every_documented_source_file_name_exists():
    """design.md writes `winograd.cc` for ffi/cpu/winograd.cc: such a name must still be a file."""
    names = {
        p.name
        for top in ("ffi", "jaxconv", "tests", "benchmarks", "tools", "docs", ".ci")
        for p in (ROOT / top).rglob("*")
        if p.is_file()
    }
    missing = []
    for doc in DOCS:
        for bare in sorted(set(_BARE_SOURCE.findall(doc.read_text()))):
            if bare not in names:
                missing.append(f"{doc.relative_to(ROOT)} names {bare}")
    assert not missing, "documented source files that do not exist:\n  " + "\n  ".join(missing)


# --------------------------------------------------------------------------------------------
# Environment variables.

_C_GETENV = re.compile(r"\bgetenv\(\s*([^)]*?)\s*\)")
_CMAKE_ENV = re.compile(r"\$ENV\{(\w+)\}|ENV\{(\w+)\}")
_PY_ENV = re.compile(
    r"\bos\.(?:environ\.get|getenv)\(\s*([^,)]+)|\bos\.environ\[\s*([^]]+)\]"
    r"|([\"']\w+[\"'])\s+(?:not\s+)?in\s+os\.environ"
)


def _c_sources() -> list[Path]:
    return sorted(p for ext in ("*.h", "*.cc", "*.cu", "*.cuh") for p in (ROOT / "ffi").rglob(ext))


def _string_constant(name: str, sources: list[Path]) -> str:
    """The value of a C++ string constant `name` (`... name[] = "VALUE";`) in `sources`."""
    pattern = re.compile(rf"\b{re.escape(name)}(?:\[\])?\s*=\s*\"(\w+)\"")
    values = {m for src in sources for m in pattern.findall(src.read_text())}
    assert len(values) == 1, f"getenv({name}): cannot tell which variable it reads ({values})"
    return values.pop()


def _literal(arg: str, where: Path) -> str:
    m = re.fullmatch(r"[\"'](\w+)[\"']", arg.strip())
    assert m, (
        f"{where.relative_to(ROOT)} reads the environment variable named by {arg!r}: "
        "write the name as a literal so this test (and a reader) can find it"
    )
    return m.group(1)


def code_environment_variables() -> dict[str, str]:
    """{variable: the first file that reads it} for every variable the code reads."""
    found: dict[str, str] = {}
    c_sources = _c_sources()
    for src in c_sources:
        for arg in _C_GETENV.findall(src.read_text()):
            name = arg[1:-1] if arg.startswith('"') else _string_constant(arg, c_sources)
            found.setdefault(name, str(src.relative_to(ROOT)))
    for cmake in (ROOT / "CMakeLists.txt", *sorted((ROOT / "ffi").rglob("CMakeLists.txt"))):
        for groups in _CMAKE_ENV.findall(cmake.read_text()):
            found.setdefault(next(g for g in groups if g), str(cmake.relative_to(ROOT)))
    for py in (*sorted((ROOT / "jaxconv").rglob("*.py")), ROOT / "tests" / "conftest.py"):
        for groups in _PY_ENV.findall(py.read_text()):
            arg = next(g for g in groups if g)
            found.setdefault(_literal(arg, py), str(py.relative_to(ROOT)))
    return found


def readme_environment_table() -> set[str]:
    """The variables in the first column of README's "Environment variables" table."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^## Environment variables\n(.*?)(?=^## )", text, re.M | re.S)
    assert m, "README.md has no '## Environment variables' section"
    names = set()
    for line in m.group(1).splitlines():
        cells = line.split("|")
        if line.startswith("|") and len(cells) > 2:
            names |= set(re.findall(r"`([A-Z][A-Z0-9_]*)`", cells[1]))
    return names


def test_code_environment_variables_are_found():
    """The scan itself works: it finds the variables known to be read, by their constants too."""
    found = code_environment_variables()
    assert {
        "JAXCONV_CPU_CONV_ALGO",
        "JAXCONV_CPU_CAPABILITY",
        "CUDA_VISIBLE_DEVICES",
        "JAXCONV_CUDA_ARCHITECTURES",
        "JAXCONV_TEST_BACKENDS",
    } <= set(found), found


def test_every_environment_variable_the_code_reads_is_in_the_readme():
    table = readme_environment_table()
    missing = {
        name: where for name, where in code_environment_variables().items() if name not in table
    }
    assert not missing, (
        "environment variables read by the code but missing from README's "
        f"'Environment variables' table: {missing}"
    )


def test_every_readme_environment_variable_is_used():
    """A row for a variable nothing reads any more is stale."""
    sources = [
        p
        for top in ("ffi", "jaxconv", "tests", "benchmarks", ".ci", "tools")
        for p in (ROOT / top).rglob("*")
        if p.is_file() and p.suffix != ".md" and "__pycache__" not in p.parts
    ]
    sources += [ROOT / "CMakeLists.txt", ROOT / "pyproject.toml"]
    text = "\n".join(p.read_text(errors="replace") for p in sources)
    unused = sorted(n for n in readme_environment_table() if not re.search(rf"\b{n}\b", text))
    assert not unused, f"README's environment table names variables nothing uses: {unused}"


# --------------------------------------------------------------------------------------------
# The README's examples.


def readme_python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.M | re.S)


def test_readme_python_examples_run():
    """Each ```python block of the README, in order, in one fresh interpreter (jax's defaults,
    float32), as a user pasting them would run them; the results are then checked against lax."""
    pytest.importorskip("flax")
    blocks = readme_python_blocks()
    assert len(blocks) >= 2, "README.md should show its quick start as ```python blocks"
    check = """
import numpy as np
from jax import lax
ref = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)))
np.testing.assert_allclose(y, ref(x, w), rtol=1e-5, atol=1e-5)  # the export block's result
assert dw.shape == w.shape and per_example.shape == (8, *w.shape), (dw.shape, per_example.shape)
np.testing.assert_allclose(per_example.sum(0), dw, rtol=1e-4)
print("README examples ok")
"""
    result = run_python("-c", "\n".join(blocks) + check, timeout=600)
    assert result.returncode == 0 and "README examples ok" in result.stdout, (
        result.stdout[-3000:] + result.stderr[-3000:]
    )
