"""Attention under Hessian-vector products: kernels with second derivatives.

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
from collections.abc import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


@contextlib.contextmanager
def twice_differentiable() -> Iterator[None]:
    """Run scaled-dot-product attention on its math kernel, which has second derivatives, and the
    ``nn.Transformer*`` layers on their Python path, so a forward computes the same function with
    or without autograd recording; the previous settings come back afterwards.

    Without grad, ``nn.TransformerEncoder`` in eval mode otherwise takes a fast path that zeroes
    padded positions (a different loss than the one differentiated).
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
