"""Argument normalization and validation shared by conv and pool.

Every public function calls into here once, at trace time, and gets back plain Python integers
in small frozen records. Errors name the argument and the offending values.
"""
from __future__ import annotations

import dataclasses
import enum
import operator
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

FLOAT_DTYPES = (jnp.float32, jnp.float64, jnp.float16, jnp.bfloat16)


class Layout(enum.IntEnum):
    """Where the channels sit in an activation. The values are the `layout` FFI attribute and
    match C++'s `enum Layout` in ffi/geometry.h (kNCHW = 0, kNHWC = 1)."""
    NCHW = 0
    NHWC = 1


def layout_code(layout: Any) -> Layout:
    """The public `layout` argument ('NCHW' / 'NHWC', any case) -> Layout."""
    if not isinstance(layout, str) or layout.upper() not in Layout.__members__:
        raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
    return Layout[layout.upper()]


# Every integer argument ends up as an FFI attribute or in int32 index math (pool indices are
# int32 flat offsets), so all of them must fit in int32; ffi/geometry.h enforces the same bound
# (kMaxAttr) on the attributes it receives, which keeps its int64 shape arithmetic overflow-free.
INT32_MAX = 2**31 - 1


def integer(value: Any, name: str, what: str = "an int") -> int:
    """A Python or NumPy integer (not a bool) that fits in int32 -> int."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be {what}, got {value!r}")
    try:
        out = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be {what}, got {value!r}") from None
    if abs(out) > INT32_MAX:
        raise ValueError(f"{name} must fit in int32, got {value!r}")
    return out


def flag(value: Any, name: str) -> bool:
    """A Python or NumPy bool (or the ints 0 / 1) -> bool; anything else is a TypeError."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {value!r}")


_PAIR = "an int or a pair of ints"


def pair(value: Any, name: str, *, minimum: int | None = 1) -> tuple[int, int]:
    """An int or a length-2 sequence of ints -> (a, b), each >= minimum."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
        out = (integer(value[0], name, _PAIR), integer(value[1], name, _PAIR))
    else:
        v = integer(value, name, _PAIR)
        out = (v, v)
    if minimum is not None and min(out) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return out


Padding = tuple[tuple[int, int], tuple[int, int]]


def padding(value: Any, name: str, *, in_hw: Sequence[int], kernel_eff: Sequence[int],
            stride: Sequence[int], allow_string: bool = True) -> Padding:
    """Normalizes padding to ((top, bottom), (left, right)).

    Accepts an int, (ph, pw), ((top, bottom), (left, right)), or 'SAME'/'VALID' in any case.
    SAME follows lax: output = ceil(in / stride), total = max((out-1)*stride + k_eff - in, 0),
    with total // 2 before and the rest after.
    """
    if isinstance(value, str):
        if not allow_string:
            raise ValueError(f"{name} must be an int or a pair of ints here, got {value!r}")
        mode = value.upper()
        if mode == "VALID":
            return ((0, 0), (0, 0))
        if mode == "SAME":
            pads = []
            for i, k, s in zip(in_hw, kernel_eff, stride):
                out = -(-i // s)
                total = max((out - 1) * s + k - i, 0)
                pads.append((total // 2, total - total // 2))
            return (pads[0], pads[1])
        raise ValueError(f"{name} string must be 'SAME' or 'VALID', got {value!r}")
    try:
        if isinstance(value, (list, tuple)) and len(value) == 2 and all(
                isinstance(v, (list, tuple)) for v in value):
            top_bottom = pair(value[0], name, minimum=None)
            left_right = pair(value[1], name, minimum=None)
            pads = (top_bottom, left_right)
        else:
            ph, pw = pair(value, name, minimum=None)
            pads = ((ph, ph), (pw, pw))
    except TypeError:  # name the whole argument, not the element that failed
        raise TypeError(f"{name} must be an int, (ph, pw), ((top, bottom), (left, right))"
                        f"{' or SAME/VALID' if allow_string else ''}, got {value!r}") from None
    if min(min(p) for p in pads) < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return pads


def check_float(x: Any, name: str) -> np.dtype:
    try:
        dtype = jnp.result_type(x)
    except TypeError:  # e.g. a nested Python list
        raise TypeError(f"{name} must be an array, got {type(x).__name__}") from None
    if not any(dtype == d for d in FLOAT_DTYPES):
        raise TypeError(
            f"{name} must have dtype float32, float64, float16 or bfloat16, got {dtype}")
    return dtype


def check_rank4(x: Any, name: str, what: str) -> tuple[int, ...]:
    shape = tuple(np.shape(x))
    if len(shape) != 4:
        raise ValueError(f"{name} must be a 4-d array {what}, got shape {shape}")
    return shape


# PyTorch's unbatched inputs: one example without its N axis, (C, H, W) for NCHW and (H, W, C)
# for NHWC. The public functions run them as a batch of one and drop the axis again, so
# gradients and vmap need nothing of their own.


def unbatched(x: Any) -> bool:
    """Whether an activation is a single example without its N axis (3-d)."""
    return np.ndim(x) == 3


def add_batch_axis(x: Any):
    return jnp.asarray(x)[None]


def drop_batch_axis(out: Any):
    """Removes the N axis of one result or of each of a tuple of results."""
    return tuple(a[0] for a in out) if isinstance(out, tuple) else out[0]


def activation_form(layout: "Layout", channels: str = "C") -> str:
    """How an activation is described in errors: '(N, C, H, W) or unbatched (C, H, W)'."""
    if layout == Layout.NCHW:
        return f"(N, {channels}, H, W) or 3-d ({channels}, H, W)"
    return f"(N, H, W, {channels}) or 3-d (H, W, {channels})"


# `precision` has lax's meaning and accepted values. jaxconv turns it into one bit, the
# `allow_tf32` attribute of every conv target: whether float32 operands may be rounded to TF32
# on tensor cores. XLA's GPU convolutions allow TF32 exactly when every operand precision is at
# most HIGH (its conv autotuner: `precision <= PrecisionConfig::HIGH`), so DEFAULT and HIGH
# ('fastest', 'bfloat16', 'tensorfloat32', 'bfloat16_3x', ...) give 1 and HIGHEST ('highest',
# 'float32') gives 0. None follows jax.default_matmul_precision at trace time, as lax does. The
# CPU kernels ignore the bit and always compute in full float32.
def allow_tf32(precision: Any) -> int:
    """The `precision` argument (None, a string, a lax.Precision, or a pair of them, one per
    operand) -> the allow_tf32 attribute (1 or 0)."""
    if precision is None:
        default = jax.config.jax_default_matmul_precision
        if default is None:
            return 1
        try:
            levels = [_precision_level(default)]
        except ValueError:
            raise ValueError(f"jax_default_matmul_precision must be None or one of "
                             f"{_PRECISION_NAMES} for jaxconv's convolutions, got {default!r}"
                             ) from None
    elif isinstance(precision, (list, tuple)):
        if len(precision) != 2:
            raise ValueError(_precision_error(precision))
        levels = [_precision_level(p, precision) for p in precision]
    else:
        levels = [_precision_level(precision)]
    return int(all(level.value <= lax.Precision.HIGH.value for level in levels))


_PRECISION_NAMES = ("default", "fastest", "bfloat16", "high", "tensorfloat32", "bfloat16_3x",
                    "highest", "float32")


def _precision_level(value: Any, whole: Any = None) -> lax.Precision:
    if isinstance(value, lax.Precision):
        return value
    if whole is None and value is lax.DotAlgorithmPreset.DEFAULT:
        return lax.Precision.DEFAULT  # lax accepts it for convolutions: the backend's default
    if isinstance(value, str) and value in _PRECISION_NAMES:
        return lax.Precision(value)
    raise ValueError(_precision_error(value if whole is None else whole))


def _precision_error(value: Any) -> str:
    return (f"precision must be None, one of {_PRECISION_NAMES}, a lax.Precision, or a pair of "
            f"them (one per operand), got {value!r} (of the dot algorithms only "
            "lax.DotAlgorithmPreset.DEFAULT applies to jaxconv's convolutions)")


def out_size(in_size: int, k: int, stride: int, dilation: int, lo: int, hi: int) -> int:
    return (in_size + lo + hi - dilation * (k - 1) - 1) // stride + 1


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """One convolution y = x (*) w, described by plain integers.

    in_hw is x's spatial size, kernel_hw w's, out_hw y's. Pads may be negative here only when
    produced internally (transposed conv with output_padding crops the bottom/right).
    """
    layout: Layout
    in_hw: tuple[int, int]
    kernel_hw: tuple[int, int]
    out_hw: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pads: Padding
    groups: int
    allow_tf32: int  # 1: float32 operands may be rounded to TF32 (see allow_tf32 below)

    def attrs(self) -> dict[str, int]:
        """The FFI attributes of every conv target."""
        (pt, pb), (pl, pr) = self.pads
        return dict(stride_h=self.stride[0], stride_w=self.stride[1],
                    dilation_h=self.dilation[0], dilation_w=self.dilation[1],
                    pad_top=pt, pad_bottom=pb, pad_left=pl, pad_right=pr,
                    groups=self.groups, layout=int(self.layout), allow_tf32=self.allow_tf32)


@dataclasses.dataclass(frozen=True)
class PoolGeometry:
    layout: Layout
    in_hw: tuple[int, int]
    kernel_hw: tuple[int, int]
    out_hw: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pads: Padding
    ceil_mode: bool

    def attrs(self) -> dict[str, int]:
        (pt, pb), (pl, pr) = self.pads
        return dict(kernel_h=self.kernel_hw[0], kernel_w=self.kernel_hw[1],
                    stride_h=self.stride[0], stride_w=self.stride[1],
                    dilation_h=self.dilation[0], dilation_w=self.dilation[1],
                    pad_top=pt, pad_bottom=pb, pad_left=pl, pad_right=pr,
                    ceil_mode=int(self.ceil_mode), layout=int(self.layout))


# Axis positions of (N, C, H, W) in an activation and of (O, I, KH, KW) in conv weights.
ACT_AXES = {Layout.NCHW: (0, 1, 2, 3), Layout.NHWC: (0, 3, 1, 2)}
WEIGHT_AXES = {Layout.NCHW: (0, 1, 2, 3), Layout.NHWC: (3, 2, 0, 1)}


def act_dims(shape: Sequence[int], layout: Layout) -> tuple[int, int, int, int]:
    """Logical (N, C, H, W) of an activation shape."""
    return tuple(shape[a] for a in ACT_AXES[layout])  # type: ignore[return-value]


def act_shape(n: int, c: int, h: int, w: int, layout: Layout) -> tuple[int, int, int, int]:
    return (n, c, h, w) if layout == Layout.NCHW else (n, h, w, c)


def weight_dims(shape: Sequence[int], layout: Layout) -> tuple[int, int, int, int]:
    """Logical (O, I, KH, KW) of a conv weight shape (OIHW or HWIO)."""
    return tuple(shape[a] for a in WEIGHT_AXES[layout])  # type: ignore[return-value]


def weight_shape(o: int, i: int, kh: int, kw: int, layout: Layout) -> tuple[int, int, int, int]:
    return (o, i, kh, kw) if layout == Layout.NCHW else (kh, kw, i, o)


def act_channel_axis(layout: Layout) -> int:
    """Axis of C in an activation."""
    return 1 if layout == Layout.NCHW else 3


def act_spatial_axes(layout: Layout) -> tuple[int, int]:
    """Axes of H and W in an activation."""
    return (2, 3) if layout == Layout.NCHW else (1, 2)


def weight_out_axis(layout: Layout) -> int:
    """Axis of O in conv weights (OIHW or HWIO)."""
    return 0 if layout == Layout.NCHW else 3
