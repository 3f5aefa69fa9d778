"""Attention under Hessian-vector products: kernels with second derivatives, and one line when a
kernel has none.

The default kernels of ``F.scaled_dot_product_attention`` (flash, memory-efficient, cuDNN) have
a first derivative only: differentiating their backward raises ``derivative for
aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented``, and forward-mode
AD through them is not implemented either. The math kernel is written in differentiable torch
operations, so it has both. ``nn.MultiheadAttention`` and the ``nn.Transformer*`` layers call
``F.scaled_dot_product_attention`` too, as do Hugging Face models with
``attn_implementation="sdpa"``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from sharpscope.errors import InputError

_NO_SECOND = (
    re.compile(r"derivative for (\S+) is not implemented"),
    re.compile(r"Trying to backward through (\S+) but no autograd formula was registered"),
)
_NO_FORWARD = re.compile(r"Trying to use forward AD with (\S+) that does not support it")
_NO_FUNC = re.compile(r"custom autograd\.Function|autograd\.Function with functorch")
_ZERO_TENSORS = re.compile(r"ZeroTensors are immutable")
"""torch.func's forward-over-reverse fails so on some losses' backward (mse_loss on torch 2.13)."""
_ATTENTION = re.compile(r"attention|attn|sdp", re.IGNORECASE)
_BACKEND_FIX = "`backend` forward-over-reverse needs one; use `backend` double-backward"


@contextlib.contextmanager
def python_layers() -> Iterator[None]:
    """Run the ``nn.Transformer*`` layers on their Python path, so a forward computes the same
    function with or without autograd recording; the previous setting comes back afterwards.

    Without grad, ``nn.TransformerEncoder`` in eval mode otherwise takes a fast path that zeroes
    padded positions (a different loss than the one differentiated). Attention keeps the kernel
    torch (or the caller's ``sdpa_kernel``) picks: what products of first derivatives only
    (finite differences) run under.
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


@contextlib.contextmanager
def twice_differentiable() -> Iterator[None]:
    """:func:`python_layers`, with scaled-dot-product attention on its math kernel, which has
    second derivatives; the previous settings come back afterwards."""
    with python_layers(), sdpa_kernel(SDPBackend.MATH):
        yield


def missing_derivative(exc: RuntimeError) -> InputError | None:
    """The one-line :class:`InputError` for an operation of the model that has no second (or, for
    forward-over-reverse, no forward-mode) derivative; None when ``exc`` is about something else."""
    text = str(exc)
    for pattern in _NO_SECOND:
        if found := pattern.search(text):
            return InputError(
                f"the model's `{found.group(1)}` has no second derivative in torch; "
                + _second_fix(found.group(1))
            )
    if found := _NO_FORWARD.search(text):
        return InputError(
            f"the model's `{found.group(1)}` has no forward-mode derivative in torch; "
            + _BACKEND_FIX
        )
    if _ZERO_TENSORS.search(text):
        return InputError(
            "torch.func cannot take the forward-over-reverse product through this model and loss "
            '("ZeroTensors are immutable", a torch.func error, e.g. with mse_loss); '
            "use `backend` double-backward"
        )
    if _NO_FUNC.search(text):
        first = text.splitlines()[0]
        return InputError(
            f"torch.func cannot differentiate a custom autograd.Function of the model ({first}); "
            + _BACKEND_FIX
        )
    return None


def _second_fix(op: str) -> str:
    """How to avoid ``op``, which has no second derivative: attention has twice-differentiable
    implementations, other layers must be rewritten."""
    if _ATTENTION.search(op):
        return (
            "use an attention implementation built on torch's scaled_dot_product_attention, "
            "or eager attention"
        )
    return "write that layer in differentiable torch operations"


@contextlib.contextmanager
def derivatives_explained() -> Iterator[None]:
    """Turn a missing derivative raised inside (see :func:`missing_derivative`) into its one-line
    :class:`InputError`; every other error passes unchanged."""
    try:
        yield
    except RuntimeError as exc:
        error = missing_derivative(exc)
        if error is None:
            raise
        raise error from exc
