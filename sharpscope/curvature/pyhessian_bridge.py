"""Run PyHessian 0.1's own routines on a sharpscope operator's model, data and loss."""

from __future__ import annotations

import contextlib
import importlib
import math
import time
from collections.abc import Iterator
from typing import Any

import torch

from sharpscope.curvature.attention import twice_differentiable
from sharpscope.curvature.hvp import HessianOperator
from sharpscope.curvature.operator import CurvatureOperator
from sharpscope.curvature.results import EigenResult, TraceResult
from sharpscope.curvature.vectors import norm, unit_rows
from sharpscope.errors import InputError


@contextlib.contextmanager
def _counting(module: Any) -> Iterator[list[int]]:
    """Count PyHessian's Hessian-vector products, on its single-batch and its dataloader path."""
    count = [0]
    originals = (module.hessian_vector_product, module.hessian.dataloader_hv_product)

    def counted(function: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            count[0] += 1
            return function(*args, **kwargs)

        return wrapper

    module.hessian_vector_product = counted(originals[0])
    module.hessian.dataloader_hv_product = counted(originals[1])
    try:
        yield count
    finally:
        module.hessian_vector_product, module.hessian.dataloader_hv_product = originals


def _pyhessian(op: CurvatureOperator) -> Any:
    try:
        from pyhessian import hessian
    except ImportError as exc:
        raise InputError("`method` pyhessian needs PyHessian: pip install pyhessian==0.1") from exc
    if not isinstance(op, HessianOperator):
        raise InputError(
            f"`method` pyhessian computes the Hessian only, not the {op.curvature}; use "
            "`method` lanczos or power"
        )
    if op.dtype != torch.float32:
        raise InputError(
            "`method` pyhessian needs `dtype` float32 (PyHessian draws float32 vectors)"
        )
    if list(op.space.names) != [n for n, p in op.model.named_parameters() if p.requires_grad]:
        raise InputError("`method` pyhessian works on all trainable parameters; drop `params`")
    if op.batch_stats:
        raise InputError("`method` pyhessian always uses eval mode; drop `batch_stats`")
    data = op.batches[0] if len(op.batches) == 1 else None
    loader = None if data is not None else op.batches
    model = op.model
    mode = model.training
    try:
        # PyHessian puts the model in eval mode and fills .grad; undo both afterwards.
        with twice_differentiable():
            return hessian(
                model, op.loss_fn, data=data, dataloader=loader, cuda=op.device.type == "cuda"
            )
    finally:
        model.train(mode)


def _flat(vectors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in vectors])


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """PyHessian draws from torch's global generator: seed it, and leave the caller's untouched."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def pyhessian_eigs(
    op: CurvatureOperator, k: int, tol: float, max_iter: int, seed: int = 0
) -> EigenResult:
    """PyHessian's top-``k`` power iteration; residuals and flags measured with ``op``."""
    module = importlib.import_module("pyhessian.hessian")
    start = time.perf_counter()
    grads = [p.grad for p in op.model.parameters()]
    engine = _pyhessian(op)
    with _counting(module) as count, _seeded(seed, op.device), twice_differentiable():
        values, vectors = engine.eigenvalues(maxIter=max_iter, tol=tol, top_n=k)
    for p, g in zip(op.model.parameters(), grads, strict=True):
        p.grad = g
    flat = unit_rows(torch.stack([_flat(v).to(op.dtype) for v in vectors]))
    eig = torch.tensor(values, dtype=torch.float64)
    residuals = torch.tensor(
        [norm(op.matvec(v) - float(e) * v) for v, e in zip(flat, eig, strict=True)],
        dtype=torch.float64,
    )
    return EigenResult(
        eigenvalues=eig,
        eigenvectors=flat,
        residuals=residuals,
        converged=residuals <= tol * eig.abs().max(),
        n_products=count[0],
        n_iterations=count[0],
        seconds=time.perf_counter() - start,
        method="pyhessian",
        which="largest",
    )


def pyhessian_trace(
    op: CurvatureOperator, tol: float, max_samples: int, seed: int = 0
) -> TraceResult:
    """PyHessian's Hutchinson trace, with the standard error of its samples."""
    start = time.perf_counter()
    engine = _pyhessian(op)
    with _seeded(seed, op.device), twice_differentiable():
        samples = torch.tensor(engine.trace(maxIter=max_samples, tol=tol), dtype=torch.float64)
    for p in op.model.parameters():
        p.grad = None
    n = len(samples)
    return TraceResult(
        estimate=float(samples.mean()),
        std_error=float(samples.std()) / math.sqrt(n) if n > 1 else math.inf,
        n_samples=n,
        n_products=n,
        seconds=time.perf_counter() - start,
        method="pyhessian-hutchinson",
        converged=n < max_samples,
        samples=samples,
    )
