"""Time sharpscope's Hessian engine against PyHessian 0.1 and, when installed, curvlinops.

Run by hand from the repository root::

    python benchmarks/bench_engine.py [--repeats N] [--workload mlp|cnn|all]
        [--device auto|cpu|cuda] [--out FILE]

Two workloads: a small tanh MLP on scikit-learn's digits, and a CIFAR-shaped ResNet-style CNN
with BatchNorm (eval mode) on synthetic data. For each, a float64 Lanczos run gives the
reference top-5 eigenvalues; every float32 run is timed (median over ``--repeats``) and scored
by its relative error against that reference. Peers that are not installed are skipped with a
note. The models are trained on the CPU, then measured on ``--device``. The Markdown report goes
to stdout (and to ``--out``); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.metadata
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import sharpscope
from sharpscope import HessianOperator, lanczos
from sharpscope.cli.loading import resolve_device
from sharpscope.curvature import Objective, SolveSettings
from sharpscope.errors import InputError

LOSS = F.cross_entropy
SHARPSCOPE_TOLS = (1e-3, 1e-4)
PYHESSIAN_TOLS = (1e-3, 1e-6)  # PyHessian's default, and the one that reaches ~1e-4 accuracy
MATCHED_TOL = 1e-6
DEFAULT_TOL = 1e-3
BACKENDS = ("double-backward", "forward-over-reverse")
CALLS_PER_TIMING = 5
SECONDS_PER_TIMING = 0.2
REFERENCE_TOL = 1e-10
REFERENCE_K = 5

warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")


def fmt_tol(tol: float) -> str:
    """A tolerance as ``1e-4`` rather than Python's ``0.0001`` or ``1e-04``."""
    mantissa, exponent = f"{tol:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def log(message: str) -> None:
    """Print a progress line to stderr."""
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- peers


@dataclass
class PyHessian:
    """PyHessian 0.1, with its HVP function patched to count calls."""

    hessian: Any
    module: ModuleType
    hvp: Callable[..., Any]
    calls: int = 0

    @contextmanager
    def counting(self) -> Iterator[None]:
        """Count, from zero, the HVPs PyHessian's eigensolver makes while the block runs."""
        self.calls = 0
        original = self.module.hessian_vector_product

        def counted(*args: Any) -> Any:
            self.calls += 1
            return original(*args)

        self.module.hessian_vector_product = counted
        try:
            yield
        finally:
            self.module.hessian_vector_product = original


@dataclass
class Curvlinops:
    """curvlinops' Hessian operator and SciPy's ARPACK wrapper."""

    operator: Any
    scipy_linop: Any
    eigsh: Callable[..., Any]


@dataclass
class Peers:
    """The peers that could be imported (None where not)."""

    pyhessian: PyHessian | None
    curvlinops: Curvlinops | None


def load_pyhessian() -> tuple[PyHessian | None, str]:
    """PyHessian if importable, and a line for the report header."""
    try:
        package = importlib.import_module("pyhessian")
        module = importlib.import_module("pyhessian.hessian")
        utils = importlib.import_module("pyhessian.utils")
    except ImportError as exc:
        return None, f"PyHessian: not installed, skipped ({exc})"
    version = importlib.metadata.version("pyhessian")
    return PyHessian(package.hessian, module, utils.hessian_vector_product), f"PyHessian {version}"


def load_curvlinops() -> tuple[Curvlinops | None, str]:
    """curvlinops if importable, and a line for the report header."""
    try:
        curvlinops = importlib.import_module("curvlinops")
        linalg = importlib.import_module("scipy.sparse.linalg")
    except ImportError as exc:
        return None, f"curvlinops: not importable, skipped ({exc})"
    version = importlib.metadata.version("curvlinops-for-pytorch")
    return Curvlinops(curvlinops.HessianLinearOperator, linalg.LinearOperator, linalg.eigsh), (
        f"curvlinops {version} (HessianLinearOperator, check_deterministic=False, "
        "+ scipy eigsh which='LA')"
    )


# ----------------------------------------------------------------------- workloads


@dataclass
class Workload:
    """A model in eval mode and the one batch whose mean-loss Hessian is measured."""

    key: str
    title: str
    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    setup: str

    @property
    def batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The one batch, as a list of ``(inputs, targets)``."""
        return [(self.inputs, self.targets)]

    @property
    def params(self) -> list[nn.Parameter]:
        """The trainable parameters, in ``model.parameters()`` order."""
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def n_params(self) -> int:
        """Number of trainable scalars."""
        return sum(p.numel() for p in self.params)

    @property
    def device(self) -> torch.device:
        """Where the model and its batch are."""
        return self.inputs.device

    def to(self, device: torch.device) -> Workload:
        """The workload with its model and batch moved to ``device``."""
        return replace(
            self,
            model=self.model.to(device),
            inputs=self.inputs.to(device),
            targets=self.targets.to(device),
        )


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that wall times are the work's."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_mlp() -> Workload:
    """MLP 64-128-128-10 (tanh) trained 100 full-batch Adam steps on digits; batch = first 512."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        optimizer.zero_grad()
        LOSS(model(x), y).backward()
        optimizer.step()
    model.eval()
    return Workload(
        "mlp",
        "MLP 64-128-128-10 (tanh) on load_digits",
        model,
        x[:512],
        y[:512],
        "trained 100 full-batch Adam steps (lr 1e-2, seed 0) on all 1797 digits, inputs in "
        "[0, 1]; Hessian of the mean cross-entropy over the first 512 samples",
    )


class Block(nn.Module):
    """A basic residual block: two 3x3 conv+BatchNorm, a 1x1 conv shortcut when shapes change."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Conv2d(cin, cout, 1, stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual forward pass."""
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def build_cnn(stem_stride: int = 2) -> Workload:
    """ResNet-style CNN (16/32/64 channels, BatchNorm), 128 synthetic 3x32x32 images, eval mode;
    the stem's stride 2 (16x16 maps) keeps a whole run to minutes, stride 1 keeps 32x32 maps."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, stem_stride, 1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        Block(16, 16, 1),
        Block(16, 32, 2),
        Block(32, 64, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )
    x = torch.randn(128, 3, 32, 32)
    y = torch.randint(0, 10, (128,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(10):
        optimizer.zero_grad()
        LOSS(model(x), y).backward()
        optimizer.step()
    model.eval()
    return Workload(
        "cnn",
        "ResNet-style CNN with BatchNorm, 3x32x32 inputs, 10 classes",
        model,
        x,
        y,
        f"stem conv 3->16 (stride {stem_stride}) + BN, residual blocks 16->16, 16->32 "
        "(stride 2), 32->64 (stride 2), global average pool, linear; synthetic randn inputs and "
        "random labels (seed 0), batch 128; 10 SGD steps (lr 0.05, momentum 0.9) in train mode, "
        "then eval mode",
    )


WORKLOADS: dict[str, Callable[[], Workload]] = {"mlp": build_mlp, "cnn": build_cnn}


# ------------------------------------------------------------------- measurements


@dataclass
class Outcome:
    """One eigensolver run: wall seconds, Hessian-vector products, eigenvalues found."""

    seconds: float
    products: int
    eigenvalues: list[float]
    converged: bool | None


@dataclass
class Config:
    """One eigensolver configuration of one tool, and its outcomes so far."""

    tool: str
    settings: str
    tol: float
    run: Callable[[int], Outcome]
    outcomes: list[Outcome] = field(default_factory=list)

    def median(self, attribute: str) -> float:
        """Median over the outcomes of ``seconds`` or ``products``."""
        return statistics.median(getattr(o, attribute) for o in self.outcomes)


def flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate parameter-shaped tensors into a flat vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def relative_error(values: Sequence[float], reference: Sequence[float]) -> float:
    """Max relative error of ``values`` (sorted descending) against the top of ``reference``."""
    ordered = sorted(values, reverse=True)
    return max(abs(v - r) / abs(r) for v, r in zip(ordered, reference, strict=True))


def pyhessian_operator(pyh: PyHessian, w: Workload) -> Any:
    """PyHessian's hessian object; its constructor runs the first (create_graph) backward."""
    # That backward accumulates into .grad: callers set the model's gradients to None first.
    cuda = w.device.type == "cuda"
    return pyh.hessian(w.model, LOSS, data=(w.inputs, w.targets), cuda=cuda)


def curvlinops_operator(cl: Curvlinops, w: Workload) -> Any:
    """curvlinops' HessianLinearOperator over the workload's batch."""
    return cl.operator(
        w.model,
        nn.CrossEntropyLoss(),
        w.params,
        w.batches,
        check_deterministic=False,
        num_data=len(w.targets),
    )


def calls_per_timing(fn: Callable[[], Any], device: torch.device) -> int:
    """Warm ``fn`` up with one call; return how many calls make one timing of it."""
    start = time.perf_counter()
    fn()
    sync(device)
    elapsed = time.perf_counter() - start
    return max(CALLS_PER_TIMING, math.ceil(SECONDS_PER_TIMING / elapsed))


def seconds_per_call(fn: Callable[[], Any], calls: int, device: torch.device) -> float:
    """Mean seconds per call of ``fn`` over ``calls`` calls."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - start) / calls


def product_costs(
    w: Workload, exact_hv: torch.Tensor, v: torch.Tensor, repeats: int, peers: Peers
) -> list[str]:
    """Markdown table: milliseconds per gradient and per HVP, also as multiples of one gradient."""
    params = w.params

    def gradient() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(LOSS(w.model(w.inputs), w.targets), params)

    # (label, one timed call, the call's result as a flat HVP or None for the gradient)
    rows: list[tuple[str, Callable[[], Any], Callable[[Any], torch.Tensor] | None]] = [
        ("gradient (forward + backward)", gradient, None)
    ]
    for label, options in [
        ("sharpscope double-backward, cached graph (steady state)", {}),
        ("sharpscope double-backward, graph built fresh", {"cache_graph": False}),
        ("sharpscope forward-over-reverse", {"backend": "forward-over-reverse"}),
    ]:
        op = HessianOperator(Objective(w.model, LOSS, w.batches), **options)
        rows.append((label, partial(op.matvec, v), torch.Tensor.detach))
    if peers.pyhessian is not None:
        pyh = peers.pyhessian
        w.model.zero_grad(set_to_none=True)
        h = pyhessian_operator(pyh, w)
        vs = [
            t.view_as(p) for t, p in zip(v.split([p.numel() for p in params]), params, strict=True)
        ]
        rows.append(
            (
                "PyHessian hessian_vector_product on cached gradsH",
                partial(pyh.hvp, h.gradsH, h.params, vs),
                flat,
            )
        )
    if peers.curvlinops is not None:
        op = curvlinops_operator(peers.curvlinops, w)
        rows.append(
            ("curvlinops HessianLinearOperator @ v", partial(op.__matmul__, v), torch.Tensor.detach)
        )

    lines = [
        f"Cost of one product: median over {repeats} interleaved timings, each the mean of at "
        f"least {CALLS_PER_TIMING} calls and {SECONDS_PER_TIMING:g} s, after one warm-up call; "
        "HVP error is relative to the float64 HVP of the same vector.",
        "",
        "| operation | ms | × gradient | HVP rel. error |",
        "| --- | ---: | ---: | ---: |",
    ]
    # Timings of the rows are interleaved so that a burst of load elsewhere hits all rows alike.
    calls = []
    for label, fn, _ in rows:
        log(f"[{w.key}] warm-up: {label}")
        calls.append(calls_per_timing(fn, w.device))
    timings: list[list[float]] = [[] for _ in rows]
    for repeat in range(repeats):
        log(f"[{w.key}] timing products, repeat {repeat + 1}/{repeats}")
        for (_, fn, _), n, times in zip(rows, calls, timings, strict=True):
            times.append(seconds_per_call(fn, n, w.device))
    gradient_ms = 1e3 * statistics.median(timings[0])
    for (label, fn, as_flat), times in zip(rows, timings, strict=True):
        ms = 1e3 * statistics.median(times)
        error = "–"
        if as_flat is not None:
            hv = as_flat(fn()).double()
            error = f"{float(torch.linalg.vector_norm(hv - exact_hv) / exact_hv.norm()):.1e}"
        lines.append(f"| {label} | {ms:.2f} | {ms / gradient_ms:.2f} | {error} |")
    w.model.zero_grad(set_to_none=True)
    return lines


# ---------------------------------------------------------------------- eigensolvers


def sharpscope_config(w: Workload, k: int, tol: float, backend: str) -> Config:
    """sharpscope: build a HessianOperator, run lanczos."""

    def run(seed: int) -> Outcome:
        start = time.perf_counter()
        op = HessianOperator(Objective(w.model, LOSS, w.batches), backend=backend)
        result = lanczos(op, k, settings=SolveSettings(tol=tol, seed=seed))
        sync(w.device)
        seconds = time.perf_counter() - start
        return Outcome(
            seconds, result.n_products, result.eigenvalues.tolist(), result.all_converged
        )

    return Config("sharpscope", f"lanczos k={k}, tol {fmt_tol(tol)}, {backend}", tol, run)


def pyhessian_config(pyh: PyHessian, w: Workload, k: int, tol: float) -> Config:
    """PyHessian: construct ``hessian`` (its first backward) and call ``eigenvalues``."""

    def run(seed: int) -> Outcome:
        w.model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        with pyh.counting():
            start = time.perf_counter()
            values, _ = pyhessian_operator(pyh, w).eigenvalues(top_n=k, tol=tol)
            sync(w.device)
            seconds = time.perf_counter() - start
        w.model.zero_grad(set_to_none=True)
        return Outcome(seconds, pyh.calls, values, None)

    default = " (default)" if tol == DEFAULT_TOL else ""
    return Config("PyHessian", f"eigenvalues(top_n={k}, tol={fmt_tol(tol)}){default}", tol, run)


def curvlinops_config(cl: Curvlinops, w: Workload, k: int, tol: float) -> Config:
    """curvlinops: build a HessianLinearOperator, run SciPy's eigsh on it, counting matvecs."""

    def run(seed: int) -> Outcome:
        calls = 0
        v0 = np.random.default_rng(seed).standard_normal(w.n_params).astype(np.float32)
        start = time.perf_counter()
        op = curvlinops_operator(cl, w).to_scipy(np.float32)

        def matvec(x: np.ndarray) -> np.ndarray:
            nonlocal calls
            calls += 1
            return op.matvec(x)

        counted = cl.scipy_linop(op.shape, matvec=matvec, dtype=np.float32)
        values = cl.eigsh(counted, k=k, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
        seconds = time.perf_counter() - start
        # eigsh raises ArpackNoConvergence rather than return unconverged values
        return Outcome(seconds, calls, [float(x) for x in values], True)

    return Config("curvlinops", f"eigsh k={k}, which='LA', tol {fmt_tol(tol)}", tol, run)


def eigen_configs(w: Workload, k: int, peers: Peers) -> list[Config]:
    """Every tool's configurations for the top ``k`` eigenvalues."""
    configs = []
    if peers.pyhessian is not None:
        configs += [pyhessian_config(peers.pyhessian, w, k, tol) for tol in PYHESSIAN_TOLS]
    configs += [
        sharpscope_config(w, k, tol, backend) for backend in BACKENDS for tol in SHARPSCOPE_TOLS
    ]
    if peers.curvlinops is not None:
        configs += [curvlinops_config(peers.curvlinops, w, k, tol) for tol in SHARPSCOPE_TOLS]
    return configs


def eigen_table(
    w: Workload, k: int, reference: list[float], repeats: int, peers: Peers
) -> list[str]:
    """Run every configuration ``repeats`` times (interleaved) and tabulate the medians."""
    configs = eigen_configs(w, k, peers)
    for seed in range(repeats):
        for c in configs:
            log(f"[{w.key}] top-{k} repeat {seed + 1}/{repeats}: {c.tool} {c.settings}")
            c.outcomes.append(c.run(seed))
    baseline = {c.tol: c.median("seconds") for c in configs if c.tool == "PyHessian"}
    what = "top eigenvalue" if k == 1 else f"top-{k} eigenvalues (max relative error over the {k})"
    lines = [
        f"Top-{k}: {what}; wall time includes building the operator; median over {repeats} "
        "repeats with start-vector seeds 0, 1, …",
        "",
        "| tool | configuration | wall s | HVPs | rel. error | converged "
        f"| ÷ PyHessian tol {fmt_tol(MATCHED_TOL)} | ÷ PyHessian tol {fmt_tol(DEFAULT_TOL)} |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in configs:
        seconds = c.median("seconds")
        errors = statistics.median(relative_error(o.eigenvalues, reference) for o in c.outcomes)
        flags = [o.converged for o in c.outcomes]
        converged = "–" if None in flags else f"{sum(flags)}/{len(flags)}"
        ratios = [
            f"{seconds / baseline[t]:.2f}" if t in baseline else "–"
            for t in (MATCHED_TOL, DEFAULT_TOL)
        ]
        lines.append(
            f"| {c.tool} | {c.settings} | {seconds:.3f} | {c.median('products'):g} | {errors:.1e} "
            f"| {converged} | {' | '.join(ratios)} |"
        )
    return lines


# ----------------------------------------------------------------------------- report


def bench_workload(w: Workload, repeats: int, peers: Peers, eigen: bool = True) -> list[str]:
    """The Markdown section of one workload: reference, product costs, and (with ``eigen``) the
    top-1 and top-5 tables."""
    log(f"[{w.key}] float64 reference")
    model64 = copy.deepcopy(w.model).double()
    op64 = HessianOperator(Objective(model64, LOSS, [(w.inputs.double(), w.targets)]))
    ref = lanczos(op64, REFERENCE_K, settings=SolveSettings(tol=REFERENCE_TOL, max_iter=500))
    reference = ref.eigenvalues.tolist()
    v = torch.randn(w.n_params, generator=torch.Generator().manual_seed(1)).to(w.device)
    exact_hv = op64.matvec(v.double())
    with torch.no_grad():
        loss = float(LOSS(w.model(w.inputs), w.targets))
    lines = [
        f"## {w.title}",
        "",
        f"- {w.n_params:,} parameters; batch {len(w.targets)}; mean cross-entropy {loss:.4f}",
        f"- setup: {w.setup}",
        f"- float64 reference (sharpscope lanczos k={REFERENCE_K}, tol {fmt_tol(REFERENCE_TOL)}, "
        f"{ref.n_products} products, {ref.seconds:.1f} s): top-{REFERENCE_K} eigenvalues "
        + ", ".join(f"{x:.6g}" for x in reference)
        + f"; converged {ref.converged.tolist()}",
        "",
        *product_costs(w, exact_hv, v, repeats, peers),
    ]
    for k in (1, REFERENCE_K) if eigen else ():
        lines += ["", *eigen_table(w, k, reference[:k], repeats, peers)]
    return [*lines, ""]


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, or platform's guess."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    """Parse arguments, run the chosen workloads, print (and optionally write) the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement")
    parser.add_argument("--workload", choices=[*WORKLOADS, "all"], default="all")
    parser.add_argument("--out", type=Path, help="also write the Markdown report here")
    parser.add_argument(
        "--stem-stride", type=int, choices=[1, 2], default=2, help="the CNN stem's stride"
    )
    parser.add_argument(
        "--products-only", action="store_true", help="time the products, not the eigensolvers"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    try:
        device = resolve_device(args.device)
    except InputError as exc:
        parser.error(str(exc))
    began = time.perf_counter()
    pyhessian, pyhessian_note = load_pyhessian()
    curvlinops, curvlinops_note = load_curvlinops()
    peers = Peers(pyhessian, curvlinops)
    lines = [
        "# sharpscope engine benchmark",
        "",
        f"- command: `{shlex.join(['python', *sys.argv])}`",
        f"- torch {torch.__version__}, {torch.get_num_threads()} CPU threads "
        f"({os.cpu_count()} logical CPUs, {cpu_name()}); Python {platform.python_version()} "
        f"({sys.executable}); "
        f"sharpscope {sharpscope.__version__}; device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        f"- peers: {pyhessian_note}; {curvlinops_note}",
        "- float32 runs; times are time.perf_counter wall times, medians over "
        f"{args.repeats} repeats; errors are relative to a float64 sharpscope Lanczos run on a "
        "float64 copy of the model and data",
        "",
    ]
    keys = list(WORKLOADS) if args.workload == "all" else [args.workload]
    for key in keys:
        log(f"[{key}] building workload")
        workload = build_cnn(args.stem_stride) if key == "cnn" else WORKLOADS[key]()
        lines += bench_workload(
            workload.to(device), args.repeats, peers, eigen=not args.products_only
        )
    lines.append(f"Total run time: {time.perf_counter() - began:.0f} s.")
    report = "\n".join(lines) + "\n"
    print(report, end="")
    if args.out is not None:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
