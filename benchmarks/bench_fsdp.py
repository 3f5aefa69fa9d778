"""Per-rank memory and time of ``analyze --fsdp``'s work (FSDP2-sharded parameters, sharded
Lanczos vectors, finite-difference products) on GPT-2 small, over 1 and 2 ranks.

Run by hand from the repository root (it launches ``torchrun`` itself, once per rank count)::

    python benchmarks/bench_fsdp.py [--workload gpt2|qwen2-0.5b] [--ranks 1,2] [--batch 8]
        [--length 128] [--products 6] [--device cpu|cuda] [--loading sharded,whole]
        [--load-only | --save] [--out FILE]

The workload of ``bench_scale.py`` (random init from a config, seed 0) and its batch are written
once as a save_pretrained folder (safetensors) and a ``.pt``. Every rank loads the folder as
``analyze --fsdp`` does (``--loading sharded``: its parameters on the meta device, sharded, then
each rank's rows read from the file) or as it did before (``whole``: the whole model built and
loaded, then sharded), both with ``analyze``'s ``shard_model`` (``fully_shard`` per block, then
the root), and takes its contiguous share of the ``--batch`` sequences. Then (not with
``--load-only``), each phase's peak measured on its own (the resident set's high-water mark,
reset before the phase through ``/proc/self/clear_refs``, on the CPU; allocated memory on a GPU):

- ``step``: one SGD training step of the sharded model (forward, backward, ``optimizer.step``),
  the reference;
- ``solve``: a gradient, a product (their seconds: the second of each), then a top-1 Lanczos
  solve (``max_basis`` 4, the least ``analyze --top-k 1`` takes) stopped after ``--products``
  products, redone once its finite-difference step is chosen again on v₁, as ``analyze`` solves.

With ``--save``, after loading, ``finetune --fsdp``'s write of the whole weights as
``model.safetensors`` in place of the work, each way's peak on its own: ``streamed`` (one
gathered tensor at a time, rank 0 writing it) and ``gathered`` (the whole state gathered to rank
0's CPU, then written: the write before), each also as its rise over the memory held before it;
their data bytes are compared.

The figures are per rank (the largest over the ranks). ``load`` is the peak of loading the
folder and sharding the model (from the same reset: the imports are held before it). λ_max over
the rank counts must agree: one process's sums in another order.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sharpscope.curvature.sharded import ShardedHessianOperator

HERE = Path(__file__).resolve().parent
SOLVE_BASIS = 4


def status_mib(field: str) -> float:
    """A memory ``field`` of /proc/self/status (VmRSS: resident now, VmHWM: its high-water mark
    since the last :func:`reset_peak`), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status: the CPU figures need Linux")


def resident_mib(device: torch.device) -> float:
    """The memory held now (MiB): allocated GPU memory, or the CPU's resident set."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return status_mib("VmRSS")


def reset_peak(device: torch.device) -> None:
    """Start a phase's peak afresh."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")


def phase_peak(device: torch.device) -> float:
    """The phase's peak (MiB): allocated GPU memory, or the CPU's resident set."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    return status_mib("VmHWM")


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _product_seconds(op: ShardedHessianOperator, device: torch.device) -> float:
    """The seconds of ``op``'s second product on one seeded vector (the same whatever the rank
    count; the first product searches the step); the vector is freed before the solve."""
    from sharpscope.curvature.shards import draw

    v = draw(op, 1, torch.Generator().manual_seed(0))[0]
    op.matvec(v)
    return _seconds(lambda: op.matvec(v), device)


def worker(args: argparse.Namespace) -> None:
    """One rank's measurements, written as JSON to ``--result``.RANK."""

    from sharpscope import distributed, lanczos
    from sharpscope.analysis.fsdp import shard_model
    from sharpscope.curvature import Objective, SolveSettings
    from sharpscope.curvature.hvp import refined
    from sharpscope.curvature.sharded import ShardedHessianOperator
    from sharpscope.io.checkpoints import Placement, load_model
    from sharpscope.io.losses import loss_name, resolve_loss

    distributed.init_from_env()
    rank, ranks = distributed.rank(), distributed.world_size()
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if args.device == "cuda" else "cpu")
    row: dict[str, float | int | str | bool] = {"rank": rank}
    share = slice(rank * args.batch // ranks, (rank + 1) * args.batch // ranks)
    inputs, ids = torch.load(Path(args.checkpoint) / "batch.pt")
    batches = [({k: v[share].to(device) for k, v in inputs.items()}, ids[share].to(device))]
    reset_peak(device)
    if args.loading == "sharded":
        placement = Placement(shard_model, device, torch.float32)
        model, _ = load_model(args.checkpoint, placement=placement)
    else:
        model = shard_model(load_model(args.checkpoint)[0].to(device))
    row["load_peak_mib"] = phase_peak(device)
    row["sharded_mib"] = resident_mib(device)
    local = [p.to_local() for p in model.parameters()]
    row["params"] = sum(p.numel() for p in model.parameters())
    row["local_params"] = sum(t.numel() for t in local)
    row["local_param_mib"] = sum(t.numel() * t.element_size() for t in local) / 2**20
    if args.save:
        row.update(save_peaks(model, device, Path(args.result).parent))
    if args.load_only or args.save:
        Path(f"{args.result}.{rank}").write_text(json.dumps(row))
        distributed.barrier()
        distributed.teardown()
        return
    loss_fn = resolve_loss(loss_name("auto", model))

    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the weights stay for the solve
    ((inputs, ids),) = batches

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(**inputs), ids).backward()
        opt.step()

    step()  # FSDP2's lazy set-up and the first gathers out of the measured step
    opt.zero_grad(set_to_none=True)
    reset_peak(device)
    row["step_s"] = _seconds(step, device)
    row["step_peak_mib"] = phase_peak(device)
    opt.zero_grad(set_to_none=True)

    reset_peak(device)
    op = ShardedHessianOperator(Objective(model, loss_fn, batches))
    op.gradient()
    row["gradient_s"] = _seconds(op.gradient, device)
    row["product_s"] = _product_seconds(op, device)
    settings = SolveSettings(max_iter=args.products, max_basis=SOLVE_BASIS)
    result = refined(op, lambda: lanczos(op, 1, settings=settings), settings.tol)
    row["solve_peak_mib"] = phase_peak(device)
    row["lambda_max"] = float(result.eigenvalues[0])
    row["converged"] = bool(result.converged[0])
    row["products"] = op.n_products
    row["fd_error"] = float(op.fd_error) if op.fd_error is not None else float("nan")
    Path(f"{args.result}.{rank}").write_text(json.dumps(row))
    distributed.barrier()
    distributed.teardown()


def save_peaks(model: torch.nn.Module, device: torch.device, folder: Path) -> dict:
    """The peaks and rises (MiB) of writing the sharded ``model``'s whole weights into ``folder``
    streamed and gathered (see the module's doc), and on rank 0 whether their data is the same."""
    from sharpscope import distributed
    from sharpscope.io.checkpoints import checkpoint_metadata, save_checkpoint
    from sharpscope.io.models import ModelSpec
    from sharpscope.training.sharded_state import full_state, stream_full_state

    spec, main, row = ModelSpec("bench_scale:gpt2", {}), distributed.is_main(), {}
    paths = {way: folder / f"{way}.safetensors" for way in ("streamed", "gathered")}
    for way, path in paths.items():
        distributed.barrier()
        before = resident_mib(device)
        reset_peak(device)
        if way == "streamed":
            stream_full_state(path if main else None, model, checkpoint_metadata(spec))
        else:
            weights = full_state(model)
            if main:
                save_checkpoint(path, model, spec, None, weights)
            del weights
        row[f"save_{way}_peak_mib"] = phase_peak(device)
        row[f"save_{way}_rise_mib"] = row[f"save_{way}_peak_mib"] - before
    if main:
        row["same_data"] = _data_sha(paths["streamed"]) == _data_sha(paths["gathered"])
    return row


def _data_sha(path: Path) -> str:
    """The sha256 of a safetensors file's bytes after its header (whose metadata keys
    safetensors orders at random)."""
    import hashlib

    with path.open("rb") as f:
        f.seek(8 + int.from_bytes(f.read(8), "little"))
        digest = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_workload(args: argparse.Namespace, folder: Path) -> None:
    """The workload's model as a save_pretrained folder, with its batch as ``batch.pt``."""
    import bench_scale

    bench_scale.SHAPE.update(batch=args.batch, length=args.length)
    model, ((inputs, ids),) = bench_scale.build(args.workload, "cpu")
    model.save_pretrained(folder, safe_serialization=True)
    torch.save((inputs, ids), folder / "batch.pt")


def launch(
    args: argparse.Namespace, ranks: int, loading: str, checkpoint: Path
) -> list[dict] | str:
    """Run the workers over ``ranks`` processes, loading ``checkpoint`` as ``loading`` says; their
    rows, or why they failed."""
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "rank"
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={ranks}", str(Path(__file__).resolve()), "--worker",
            f"--result={result}", f"--batch={args.batch}", f"--products={args.products}",
            f"--device={args.device}", f"--loading={loading}", f"--checkpoint={checkpoint}",
            *(["--load-only"] if args.load_only else []), *(["--save"] if args.save else []),
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])}
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // ranks))
        # glibc returns every freed block above 1 MiB to the system at once (its threshold
        # otherwise grows to 32 MiB as blocks are freed, and a freed whole model would stay in
        # the resident set that the peaks count)
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**20))
        out = subprocess.run(command, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            tail = out.stderr.strip().splitlines()[-3:]
            return f"exit {out.returncode}: {' / '.join(tail)[:300]}"
        return [json.loads(Path(f"{result}.{r}").read_text()) for r in range(ranks)]


Runs = dict[tuple[int, str], list[dict] | str]
"""The workers' rows per rank count and loading, or why they failed."""


def table(args: argparse.Namespace, runs: Runs) -> list[str]:
    """The markdown rows: per rank count and loading, the largest per-rank figures (the work's
    left empty with ``--load-only``; with ``--save``, the save's)."""
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    if args.save:
        return save_table(args, where, runs)
    caption = (
        f"torch {torch.__version__}, {where}, {args.workload}, batch {args.batch} × "
        f"{args.length} tokens over the ranks, top-1 Lanczos (max_basis {SOLVE_BASIS}) stopped "
        f"after {args.products} products, finite differences, float32; per-rank peaks (the "
        "largest over the ranks)"
    )
    columns = (
        "| ranks | loading | params / rank (MiB) | load peak MiB | held after sharding MiB | "
        "step peak MiB | solve peak MiB | solve / step | step s | gradient s | product s | "
        "products | λ_max | FD error |"
    )

    def cells(ranks: int, loading: str, rows: list[dict]) -> str:
        def most(key: str) -> float:
            return max(float(r[key]) for r in rows)

        loaded = (
            f"| {ranks} | {loading} | {most('local_param_mib'):.0f} | "
            f"{most('load_peak_mib'):.0f} | {most('sharded_mib'):.0f} |"
        )
        if args.load_only:
            return loaded + " |" * 9
        return (
            f"{loaded} {most('step_peak_mib'):.0f} | {most('solve_peak_mib'):.0f} | "
            f"{most('solve_peak_mib') / most('step_peak_mib'):.2f} | {most('step_s'):.2f} | "
            f"{most('gradient_s'):.2f} | {most('product_s'):.2f} | {rows[0]['products']} | "
            f"{rows[0]['lambda_max']:.6g} | {rows[0]['fd_error']:.1e} |"
        )

    return markdown(caption, columns, runs, cells)


def save_table(args: argparse.Namespace, where: str, runs: Runs) -> list[str]:
    """The markdown rows of ``--save``: per rank count, the largest per-rank peaks and rises of
    writing model.safetensors streamed and gathered."""
    caption = (
        f"torch {torch.__version__}, {where}, {args.workload}, model.safetensors of the sharded "
        "model written by rank 0; per-rank peaks (the largest over the ranks)"
    )
    columns = (
        "| ranks | loading | params / rank (MiB) | held before MiB | streamed peak MiB | "
        "streamed rise MiB | gathered peak MiB | gathered rise MiB | same data |"
    )

    def cells(ranks: int, loading: str, rows: list[dict]) -> str:
        most = {k: max(float(r[k]) for r in rows) for k in rows[0] if k.endswith("_mib")}
        return (
            f"| {ranks} | {loading} | {most['local_param_mib']:.0f} | "
            f"{most['sharded_mib']:.0f} | {most['save_streamed_peak_mib']:.0f} | "
            f"{most['save_streamed_rise_mib']:.0f} | {most['save_gathered_peak_mib']:.0f} | "
            f"{most['save_gathered_rise_mib']:.0f} | {rows[0]['same_data']} |"
        )

    return markdown(caption, columns, runs, cells)


def markdown(
    caption: str, columns: str, runs: Runs, cells: Callable[[int, str, list[dict]], str]
) -> list[str]:
    """A markdown table under ``caption``: a row of ``cells`` per run, or why it failed."""
    count = columns.count("|") - 1
    lines = [caption, "", columns, "|" + " ---: |" * count]
    for (ranks, loading), rows in runs.items():
        if isinstance(rows, str):
            lines.append(f"| {ranks} | {loading} | {rows} |" + " |" * (count - 3))
        else:
            lines.append(cells(ranks, loading, rows))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="gpt2", choices=("gpt2", "qwen2-0.5b"))
    parser.add_argument("--ranks", default="1,2", help="rank counts, comma-separated")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--products", type=int, default=6)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--loading", default="sharded", help="sharded, whole or both (comma-separated)"
    )
    parser.add_argument("--load-only", action="store_true", help="measure the loading alone")
    parser.add_argument("--save", action="store_true", help="measure writing model.safetensors")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    counts = [int(n) for n in args.ranks.split(",")]
    if any(args.batch % n for n in counts):
        parser.error(f"--batch {args.batch} must divide over every rank count {counts}")
    loadings = args.loading.split(",")
    if not set(loadings) <= {"sharded", "whole"}:
        parser.error(f"--loading {args.loading}: sharded, whole or both")
    runs: Runs = {}
    with tempfile.TemporaryDirectory() as folder:
        write_workload(args, Path(folder))
        for ranks in counts:
            for loading in loadings:
                print(f"bench_fsdp: {ranks} rank(s), {loading} ...", file=sys.stderr, flush=True)
                runs[ranks, loading] = launch(args, ranks, loading, Path(folder))
    lines = table(args, runs)
    print("\n".join(lines))
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
