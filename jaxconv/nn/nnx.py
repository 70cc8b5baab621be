"""``flax.nnx`` with its convolutions and max pooling computed by jaxconv.

Porting an nnx model is changing its import::

    from flax import nnx               ->  from jaxconv.nn import nnx

``Conv``, ``ConvTranspose`` and ``max_pool`` here are :class:`jaxconv.nn.Conv2d`,
:class:`jaxconv.nn.ConvTranspose2d` and :func:`jaxconv.nn.max_pool` (same constructors,
parameters and initialization as Flax's); every other name (``Module``, ``Rngs``,
``BatchNorm``, ``Linear``, ``relu``, ``Optimizer``, ...) is ``flax.nnx``'s own object. nnx
names parameters after attributes, not classes, so the state tree is Flax's as it is.
``MaxPool`` is :func:`max_pool` as a module (nnx has none).

Differences from Flax: see :mod:`jaxconv.nn`.
"""

from __future__ import annotations

from typing import Any

from flax import nnx as flax_nnx

from . import Conv2d as Conv
from . import ConvTranspose2d as ConvTranspose
from . import MaxPool2d as MaxPool
from . import max_pool

__all__ = ["Conv", "ConvTranspose", "MaxPool", "max_pool"]


def __getattr__(name: str) -> Any:
    """Every other name is flax.nnx's (``from jaxconv.nn import nnx`` ports a model)."""
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(flax_nnx, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(dir(flax_nnx)))
