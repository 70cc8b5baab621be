"""Running Python in a child process, for tests that need a fresh interpreter (crash isolation,
8 host devices, environment switches, a clean import).

The child starts in the tests directory, never in the repository root: `python -c` and
`python -m` put their working directory first on sys.path, and from the root that would import
the unbuilt source checkout of jaxconv instead of the installed package. Starting here also
makes the test modules and reference.py importable in the child.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent


def run_python(
    *args: str, env: dict | None = None, cwd: Path | str = TESTS_DIR, timeout: float = 300
) -> subprocess.CompletedProcess:
    """`python *args` with `env` added to this process's environment; output captured as text."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
