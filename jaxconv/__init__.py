"""jaxconv: conv2d, conv_transpose2d and max_pool2d for JAX, computed by custom CPU and CUDA
kernels registered with XLA as FFI targets, differentiable to any order.

The functions (:func:`conv2d`, :func:`conv_transpose2d`, :func:`max_pool2d`,
:func:`max_unpool2d`) have PyTorch's semantics with a ``layout`` argument ("NCHW" or "NHWC")
and work under ``jit``, reverse-mode ``grad``, ``vmap``, sharding (one or several processes)
and ``jax.export`` (:func:`export_safety_checks`). :mod:`jaxconv.nn` holds Flax layers, under
Flax's own names in :mod:`jaxconv.nn.linen` and :mod:`jaxconv.nn.nnx`. Importing jaxconv
registers its kernels with XLA.
"""

from . import _ffi  # noqa: F401  (registers the FFI targets on import)
from ._ffi import export_safety_checks
from .conv import conv2d, conv_transpose2d
from .pool import max_pool2d, max_unpool2d

__all__ = ["conv2d", "conv_transpose2d", "export_safety_checks", "max_pool2d", "max_unpool2d"]
__version__ = "0.1.0"
