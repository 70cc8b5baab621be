"""Argument normalization and validation for every public op.

Each public function calls exactly one function here, at trace time, with its raw arguments:
`conv2d_geometry`, `conv_transpose2d_geometry`, `max_pool2d_geometry` or
`max_unpool2d_geometry` (at the end of this file). It gets back plain Python integers in a small
frozen record, or a ValueError / TypeError that names the argument and the offending values.
The helpers above them (`pair`, `padding`, `flag`, ...) are the argument forms those four share
with jaxconv.nn.
"""

from __future__ import annotations

import dataclasses
import enum
import operator
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

FLOAT_DTYPES = (jnp.float32, jnp.float64, jnp.float16, jnp.bfloat16)

# The types of the public arguments, as the signatures name them.
IntPair = int | Sequence[int]
"""An int ``k`` (meaning ``(k, k)``) or a pair ``(k_h, k_w)``."""
PaddingLike = int | Sequence[int] | Sequence[Sequence[int]] | str
"""An int, ``(ph, pw)``, ``((top, bottom), (left, right))``, or ``"SAME"`` / ``"VALID"``."""
LayoutName = Literal["NCHW", "NHWC"]
"""Where the channels sit: ``"NCHW"`` (PyTorch's) or ``"NHWC"`` (Flax's / TensorFlow's); the
functions accept either in any case."""
PrecisionLike = None | str | lax.Precision | Sequence[str | lax.Precision]
"""lax's ``precision``: None, a name such as ``"highest"``, a ``lax.Precision``, or a pair."""


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


def padding_pairs(
    value: Any,
    name: str,
    *,
    in_hw: Sequence[int],
    kernel_eff: Sequence[int],
    stride: Sequence[int],
    allow_string: bool = True,
) -> Padding:
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
            same = []
            for i, k, s in zip(in_hw, kernel_eff, stride):
                out = -(-i // s)
                total = max((out - 1) * s + k - i, 0)
                same.append((total // 2, total - total // 2))
            return (same[0], same[1])
        raise ValueError(f"{name} string must be 'SAME' or 'VALID', got {value!r}")
    try:
        if (
            isinstance(value, (list, tuple))
            and len(value) == 2
            and all(isinstance(v, (list, tuple)) for v in value)
        ):
            top_bottom = pair(value[0], name, minimum=None)
            left_right = pair(value[1], name, minimum=None)
            pads = (top_bottom, left_right)
        else:
            ph, pw = pair(value, name, minimum=None)
            pads = ((ph, ph), (pw, pw))
    except TypeError:  # name the whole argument, not the element that failed
        raise TypeError(
            f"{name} must be an int, (ph, pw), ((top, bottom), (left, right))"
            f"{' or SAME/VALID' if allow_string else ''}, got {value!r}"
        ) from None
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
            f"{name} must have dtype float32, float64, float16 or bfloat16, got {dtype}"
        )
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


def add_batch_axis(x: Any) -> jax.Array:
    return jnp.asarray(x)[None]


def drop_batch_axis(out: Any) -> Any:
    """Removes the N axis of one result or of each of a tuple of results."""
    return tuple(a[0] for a in out) if isinstance(out, tuple) else out[0]


def activation_form(layout: Layout, channels: str = "C") -> str:
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
        # (set through jax.config.update or the jax.default_matmul_precision context; the
        # attribute is made at run time, and only some jax versions declare it to type checkers,
        # so it is read through getattr)
        default = getattr(jax.config, "jax_default_matmul_precision")  # noqa: B009
        if default is None:
            return 1
        try:
            levels = [_precision_level(default)]
        except ValueError:
            raise ValueError(
                f"jax_default_matmul_precision must be None or one of "
                f"{_PRECISION_NAMES} for jaxconv's convolutions, got {default!r}"
            ) from None
    elif isinstance(precision, (list, tuple)):
        if len(precision) != 2:
            raise ValueError(_precision_error(precision))
        levels = [_precision_level(p, precision) for p in precision]
    else:
        levels = [_precision_level(precision)]
    return int(all(level.value <= lax.Precision.HIGH.value for level in levels))


_PRECISION_NAMES = (
    "default",
    "fastest",
    "bfloat16",
    "high",
    "tensorfloat32",
    "bfloat16_3x",
    "highest",
    "float32",
)


def _precision_level(value: Any, whole: Any = None) -> lax.Precision:
    if isinstance(value, lax.Precision):
        return value
    if whole is None and value is lax.DotAlgorithmPreset.DEFAULT:
        return lax.Precision.DEFAULT  # lax accepts it for convolutions: the backend's default
    if isinstance(value, str) and value in _PRECISION_NAMES:
        return lax.Precision(value)
    raise ValueError(_precision_error(value if whole is None else whole))


def _precision_error(value: Any) -> str:
    return (
        f"precision must be None, one of {_PRECISION_NAMES}, a lax.Precision, or a pair of "
        f"them (one per operand), got {value!r} (of the dot algorithms only "
        "lax.DotAlgorithmPreset.DEFAULT applies to jaxconv's convolutions)"
    )


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
        return dict(
            stride_h=self.stride[0],
            stride_w=self.stride[1],
            dilation_h=self.dilation[0],
            dilation_w=self.dilation[1],
            pad_top=pt,
            pad_bottom=pb,
            pad_left=pl,
            pad_right=pr,
            groups=self.groups,
            layout=int(self.layout),
            allow_tf32=self.allow_tf32,
        )


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
        return dict(
            kernel_h=self.kernel_hw[0],
            kernel_w=self.kernel_hw[1],
            stride_h=self.stride[0],
            stride_w=self.stride[1],
            dilation_h=self.dilation[0],
            dilation_w=self.dilation[1],
            pad_top=pt,
            pad_bottom=pb,
            pad_left=pl,
            pad_right=pr,
            ceil_mode=int(self.ceil_mode),
            layout=int(self.layout),
        )


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


# ----------------------------------------------------------------------------------------------
# One function per public op: the raw public arguments in, the geometry out (or an error).
# Each check runs in a fixed order, so that an argument with several faults always reports the
# same one first. The unbatched (3-d) form is handled by the public function before this.


def _check_operands(
    x: Any, w: Any, bias: Any, *, x_what: str, w_what: str
) -> tuple[tuple[int, ...], tuple[int, ...], np.dtype]:
    """Ranks and dtypes of a convolution's operands -> (x shape, w shape, dtype)."""
    xs = check_rank4(x, "x", x_what)
    ws = check_rank4(w, "w", w_what)
    xdt = check_float(x, "x")
    wdt = check_float(w, "w")
    if xdt != wdt:
        raise TypeError(f"x and w must have the same dtype, got x: {xdt} and w: {wdt}")
    if bias is not None:
        bdt = check_float(bias, "bias")
        if bdt != xdt:
            raise TypeError(f"bias must have the dtype of x ({xdt}), got {bdt}")
    return xs, ws, xdt


def _check_groups(groups: Any, channels: int, channels_name: str) -> int:
    groups = integer(groups, "groups")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    if channels % groups:
        raise ValueError(
            f"groups={groups} must divide the input channels {channels_name}={channels}"
        )
    return groups


def _check_bias_shape(bias: Any, channels: int) -> None:
    if bias is not None and tuple(np.shape(bias)) != (channels,):
        raise ValueError(f"bias must have shape ({channels},), got {tuple(np.shape(bias))}")


def conv2d_geometry(
    x: Any,
    w: Any,
    bias: Any,
    *,
    stride: Any,
    padding: Any,
    dilation: Any,
    groups: Any,
    layout: Any,
    precision: Any,
) -> ConvGeometry:
    """conv2d's arguments (x batched, 4-d) -> its ConvGeometry; raises what conv2d documents."""
    lc = layout_code(layout)
    xs, ws, _ = _check_operands(
        x,
        w,
        bias,
        x_what=activation_form(lc),
        w_what="(O, I, KH, KW)" if lc == Layout.NCHW else "(KH, KW, I, O)",
    )
    _, c, h, wd = act_dims(xs, lc)
    o, i, kh, kw = weight_dims(ws, lc)
    groups = _check_groups(groups, c, "C")
    if o % groups:
        raise ValueError(f"groups={groups} must divide the output channels O={o}")
    if i * groups != c:
        raise ValueError(
            f"w has {i} input channels per group but x has C={c} channels with groups={groups} "
            f"(expected {c // groups}; layout {lc.name}, x shape {xs}, w shape {ws})"
        )
    if min(kh, kw) < 1:
        raise ValueError(f"w must have a non-empty kernel, got shape {ws}")
    if min(c, h, wd) < 1:
        raise ValueError(f"x must have non-empty channel and spatial dims, got shape {xs}")
    stride_hw = pair(stride, "stride")
    dilation_hw = pair(dilation, "dilation")
    keff = ((kh - 1) * dilation_hw[0] + 1, (kw - 1) * dilation_hw[1] + 1)
    pads = padding_pairs(padding, "padding", in_hw=(h, wd), kernel_eff=keff, stride=stride_hw)
    out_hw = (
        out_size(h, kh, stride_hw[0], dilation_hw[0], *pads[0]),
        out_size(wd, kw, stride_hw[1], dilation_hw[1], *pads[1]),
    )
    if min(out_hw) < 1:
        raise ValueError(
            f"output size would be {out_hw} for input {(h, wd)}, kernel {(kh, kw)}, stride "
            f"{stride_hw}, dilation {dilation_hw}, padding {pads}: the dilated kernel is larger "
            "than the padded input"
        )
    geom = ConvGeometry(
        lc, (h, wd), (kh, kw), out_hw, stride_hw, dilation_hw, pads, groups, allow_tf32(precision)
    )
    _check_bias_shape(bias, o)
    return geom


def conv_transpose2d_geometry(
    x: Any,
    w: Any,
    bias: Any,
    *,
    stride: Any,
    padding: Any,
    output_padding: Any,
    groups: Any,
    dilation: Any,
    layout: Any,
    precision: Any,
) -> ConvGeometry:
    """conv_transpose2d's arguments (x batched, 4-d) -> the ConvGeometry of the convolution
    that it inverts (its in_hw is the transposed convolution's output size); raises what
    conv_transpose2d documents."""
    lc = layout_code(layout)
    xs, ws, _ = _check_operands(
        x,
        w,
        bias,
        x_what=activation_form(lc, "C_in"),
        w_what=(
            "(C_in, C_out/groups, KH, KW)" if lc == Layout.NCHW else "(KH, KW, C_out/groups, C_in)"
        ),
    )
    _, c_in, h, wd = act_dims(xs, lc)
    # In the equivalent convolution, w's "O" is our C_in and its "I" is C_out / groups.
    w_cin, cout_g, kh, kw = weight_dims(ws, lc)
    groups = _check_groups(groups, c_in, "C_in")
    if w_cin != c_in:
        raise ValueError(
            f"w must have C_in={c_in} as its "
            f"{'first' if lc == Layout.NCHW else 'last'} dim, got shape {ws}"
        )
    if min(kh, kw, cout_g) < 1:
        raise ValueError(f"w must have non-empty dims, got shape {ws}")
    if min(c_in, h, wd) < 1:
        raise ValueError(f"x must have non-empty channel and spatial dims, got shape {xs}")
    stride_hw = pair(stride, "stride")
    dilation_hw = pair(dilation, "dilation")
    pads = padding_pairs(
        padding, "padding", in_hw=(h, wd), kernel_eff=(kh, kw), stride=stride_hw, allow_string=False
    )
    out_pad = pair(output_padding, "output_padding", minimum=0)
    if any(op >= max(s, d) for op, s, d in zip(out_pad, stride_hw, dilation_hw)):
        raise ValueError(
            f"output_padding must be smaller than stride or dilation, got output_padding="
            f"{output_padding} with stride={stride_hw}, dilation={dilation_hw}"
        )
    # PyTorch's output size: (H - 1)*stride - pad_top - pad_bottom + dilation*(KH - 1)
    # + output_padding + 1.
    out_h, out_w = (
        (i - 1) * s - lo - hi + d * (k - 1) + op + 1
        for i, s, (lo, hi), d, k, op in zip(
            (h, wd), stride_hw, pads, dilation_hw, (kh, kw), out_pad
        )
    )
    if min(out_h, out_w) < 1:
        raise ValueError(
            f"output size would be {(out_h, out_w)}: padding {pads} is too large "
            f"for input {(h, wd)} and kernel {(kh, kw)}"
        )
    # The convolution this inverts reads an out_hw input with pads (lo, hi - output_padding):
    # (out + lo + hi - op - d*(k-1) - 1) / s + 1 = h exactly.
    (pt, pb), (pl, pr) = pads
    conv_pads = ((pt, pb - out_pad[0]), (pl, pr - out_pad[1]))
    geom = ConvGeometry(
        lc,
        (out_h, out_w),
        (kh, kw),
        (h, wd),
        stride_hw,
        dilation_hw,
        conv_pads,
        groups,
        allow_tf32(precision),
    )
    _check_bias_shape(bias, cout_g * groups)
    return geom


def max_pool2d_geometry(
    x: Any,
    kernel_size: Any,
    stride: Any,
    padding: Any,
    dilation: Any,
    ceil_mode: Any,
    return_indices: Any,
    layout: Any,
) -> tuple[PoolGeometry, bool]:
    """max_pool2d's arguments (x batched, 4-d) -> (its PoolGeometry, return_indices); raises
    what max_pool2d documents."""
    lc = layout_code(layout)
    xs = check_rank4(x, "x", activation_form(lc))
    check_float(x, "x")
    _, _, h, w = act_dims(xs, lc)
    if min(h, w) < 1:
        raise ValueError(f"x must have non-empty spatial dims, got shape {xs}")
    _check_plane(h, w, "x")
    kernel = pair(kernel_size, "kernel_size")
    stride_hw = kernel if stride is None else pair(stride, "stride")
    dilation_hw = pair(dilation, "dilation")
    keff = ((kernel[0] - 1) * dilation_hw[0] + 1, (kernel[1] - 1) * dilation_hw[1] + 1)
    pads = padding_pairs(padding, "padding", in_hw=(h, w), kernel_eff=keff, stride=stride_hw)
    for (lo, hi), ke in zip(pads, keff):
        if max(lo, hi) > ke // 2:
            raise ValueError(
                f"padding must be at most half the effective kernel size, got padding="
                f"{padding!r} with kernel_size={kernel_size!r}, dilation={dilation_hw} "
                f"(effective kernel {keff})"
            )
    ceil = flag(ceil_mode, "ceil_mode")
    out_hw = (
        pool_out_size(h, kernel[0], stride_hw[0], dilation_hw[0], *pads[0], ceil),
        pool_out_size(w, kernel[1], stride_hw[1], dilation_hw[1], *pads[1], ceil),
    )
    if min(out_hw) < 1:
        raise ValueError(
            f"output size would be {out_hw} for input {(h, w)} with kernel_size="
            f"{kernel}, stride={stride_hw}, dilation={dilation_hw}, padding={pads}"
        )
    geom = PoolGeometry(lc, (h, w), kernel, out_hw, stride_hw, dilation_hw, pads, ceil)
    return geom, flag(return_indices, "return_indices")


@dataclasses.dataclass(frozen=True)
class UnpoolGeometry:
    """One max_unpool2d: x's logical (N, C) and spatial size, and the output's spatial size."""

    layout: Layout
    batch: int
    channels: int
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]


def max_unpool2d_geometry(
    x: Any, indices: Any, kernel_size: Any, stride: Any, padding: Any, output_size: Any, layout: Any
) -> UnpoolGeometry:
    """max_unpool2d's arguments (x and indices batched, 4-d) -> its UnpoolGeometry; raises what
    max_unpool2d documents."""
    lc = layout_code(layout)
    xs = check_rank4(x, "x", activation_form(lc))
    check_float(x, "x")
    idt = jnp.result_type(indices)
    if idt not in (jnp.int32, jnp.int64):
        raise TypeError(f"indices must be int32 or int64, got {idt}")
    if tuple(np.shape(indices)) != xs:
        raise ValueError(f"indices must have the shape of x {xs}, got {tuple(np.shape(indices))}")
    n, c, h, w = act_dims(xs, lc)
    kernel = pair(kernel_size, "kernel_size")
    stride_hw = kernel if stride is None else pair(stride, "stride")
    pads = padding_pairs(
        padding, "padding", in_hw=(h, w), kernel_eff=kernel, stride=stride_hw, allow_string=False
    )
    # PyTorch's default: (H - 1)*stride - pad_top - pad_bottom + kernel_size.
    default = (
        (h - 1) * stride_hw[0] - sum(pads[0]) + kernel[0],
        (w - 1) * stride_hw[1] - sum(pads[1]) + kernel[1],
    )
    if output_size is None:
        out_hw = default
    else:
        if not isinstance(output_size, (list, tuple)):
            raise TypeError(f"output_size must be (H, W) or a 4-d shape, got {output_size!r}")
        size = tuple(integer(v, "output_size") for v in output_size)
        if len(size) == 4:
            size = act_dims(size, lc)[2:]
        if len(size) != 2:
            raise ValueError(f"output_size must be (H, W) or a 4-d shape, got {output_size!r}")
        for got, d, s in zip(size, default, stride_hw):
            if not d - s < got < d + s:
                raise ValueError(
                    f"output_size {tuple(size)} must be within stride {stride_hw} "
                    f"of the default size {default}"
                )
        out_hw = (size[0], size[1])
    if min(out_hw) < 1:
        raise ValueError(
            f"output size would be {out_hw} for input {(h, w)} with kernel_size="
            f"{kernel}, stride={stride_hw}, padding={pads}"
        )
    _check_plane(*out_hw, "the output")
    return UnpoolGeometry(lc, n, c, (h, w), out_hw)


def _check_plane(h: int, w: int, what: str) -> None:
    """Indices are int32 flat offsets h * W + w into a plane, so a plane must fit in int32."""
    if h * w > INT32_MAX:
        raise ValueError(
            f"{what} has a {h}x{w} plane: int32 indices cannot address more than 2**31 - 1 cells"
        )


def pool_out_size(
    in_size: int, k: int, stride: int, dilation: int, lo: int, hi: int, ceil_mode: bool
) -> int:
    """PyTorch's pooled length; mirrors pool_out_size in ffi/geometry.h."""
    span = in_size + lo + hi - dilation * (k - 1) - 1
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and out > 0 and (out - 1) * stride >= in_size + lo:
        out -= 1
    return out
