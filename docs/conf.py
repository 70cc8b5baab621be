"""Sphinx configuration of jaxconv's API reference, built from the docstrings.

    pip install -e ".[docs]" && sphinx-build -W -b html docs docs/_build/html

-W (as .ci/run builds it) turns every warning into an error: a docstring whose markup breaks, or
a cross-reference that resolves nowhere, fails the build. autodoc imports jaxconv, so the
package must be installed (built) first.
"""

from __future__ import annotations

import jaxconv

project = "jaxconv"
author = "jaxconv authors"
copyright = "2026, jaxconv authors"
version = release = jaxconv.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # Google-style Args: / Returns: / Raises: sections
]
# The Markdown documents (design.md, gpu.md) are read on the repository's pages, not built here.
exclude_patterns = ["_build", "*.md"]
root_doc = "index"

# Google style only; the guarantees live in the docstrings' prose and sections.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": False}

# Every cross-reference must resolve ...
nitpicky = True
# ... except to the libraries jaxconv's signatures name, whose inventories would need the
# network (intersphinx): their names are left as plain text.
nitpick_ignore_regex = [
    ("py:.*", r"(jax|jaxlib|numpy|np|jnp|flax|nnx|linen|typing|collections\.abc)(\..*)?"),
    ("py:.*", r"(Any|Array|ArrayLike|DTypeLike|Callable|Sequence|Mapping|Iterable|PRNGKey)"),
    ("py:.*", r"(Precision|PrecisionLike|Initializer|Dtype|Shape|PaddingLike|LaxPadding)"),
]

html_theme = "alabaster"
html_title = f"jaxconv {release}"
html_static_path: list[str] = []


def _drop_module_docstrings(app, what, name, obj, options, lines):
    """The reference documents members; a module's own docstring (written for readers of the
    source, with plain-text tables that are not reST) is left out of the page."""
    if what == "module":
        lines[:] = []


def setup(app):
    app.connect("autodoc-process-docstring", _drop_module_docstrings)
