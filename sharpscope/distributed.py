"""torch.distributed helpers for runs launched by ``torchrun``; all no-ops in one process.

A command calls :func:`launched` once: when torchrun's environment variables are present it
initialises the default process group (NCCL when CUDA is available, else Gloo) with a timeout on
every collective, and destroys it at the end. Everything else asks :func:`is_distributed`.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import math
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn

from sharpscope.errors import InputError
from sharpscope.launch import DEFAULT_TIMEOUT_S, launched_by_torchrun


class RankError(InputError):
    """An error that every rank raised together (so rank 0 alone needs to print it)."""


def is_distributed() -> bool:
    """True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 in one process)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes (1 in one process)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0, the one that prints, draws progress and writes files."""
    return rank() == 0


def init_from_env(timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Initialise the process group from torchrun's variables; True if this call did so.

    The backend is NCCL when CUDA is available (each rank on ``cuda:LOCAL_RANK``), else Gloo;
    a collective that waits longer than ``timeout_s`` raises instead of hanging.
    """
    if is_distributed() or not launched_by_torchrun():
        return False
    if not (timeout_s > 0 and math.isfinite(timeout_s)):
        raise InputError(f"`timeout_s` must be positive and finite, got {timeout_s}")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return True


def teardown() -> None:
    """Destroy the process group, if any."""
    if is_distributed():
        dist.destroy_process_group()


@contextlib.contextmanager
def launched(timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[None]:
    """Run the body in the process group torchrun asked for (if any), destroyed afterwards.

    After a body that succeeded, the ranks meet at a barrier first, so that none tears down its
    connections while another still uses them.
    """
    started = init_from_env(timeout_s)
    try:
        yield
        if started:
            barrier()
    finally:
        if started:
            teardown()


def exit_now(code: int | str | None) -> NoReturn:
    """End a torchrun worker process: run the exit handlers, flush stdout and stderr, and exit
    with ``code`` (as :class:`SystemExit` reads it) without the interpreter's finalisation.

    Under torchrun, Gloo's worker threads free finished collectives some time after they
    complete; a tensor they free whose Python object is still alive needs the GIL, and during
    finalisation a thread that asks for the GIL is killed, which aborts the process (SIGABRT,
    "terminate called without an active exception"). Call it once every file is closed.
    """
    if isinstance(code, str):
        print(code, file=sys.stderr)
    status = 0 if code is None else code if isinstance(code, int) else 1
    atexit._run_exitfuncs()  # what finalisation would run first, while the interpreter is whole
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place, and return it (unchanged in one process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather(value: Any) -> list[Any]:
    """Every rank's ``value`` (any picklable object), in rank order; ``[value]`` in one process."""
    if not is_distributed():
        return [value]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def shard(n_items: int) -> range:
    """This rank's contiguous block of ``range(n_items)``: disjoint, deterministic, and in rank
    order their union is ``range(n_items)``; block sizes differ by at most one."""
    size = world_size()
    if n_items < size:
        raise RankError(
            f"{n_items} batch(es) cannot be shared by {size} processes: every rank needs at "
            "least one; use a smaller --batch-size, more --samples or fewer processes"
        )
    return block(n_items)


def block(n_items: int) -> range:
    """This rank's contiguous block of ``range(n_items)``, as :func:`shard` has it, but empty
    when there are fewer items than ranks (for work, such as grid points, a rank may lack)."""
    size, me = world_size(), rank()
    return range(n_items * me // size, n_items * (me + 1) // size)


@contextlib.contextmanager
def together(what: str) -> Iterator[None]:
    """Run the body on every rank; if it failed on any rank, raise on all of them.

    A rank that fails alone would leave the others waiting in their next collective; here every
    rank learns of the failure (the first failing rank's message) and raises :class:`RankError`.
    """
    error: BaseException | None = None
    try:
        yield
    except Exception as exc:
        if not is_distributed():
            raise
        error = exc
    messages = all_gather(None if error is None else f"{type(error).__name__}: {error}")
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        first, message = failed[0]
        raise RankError(f"{what} failed on rank {first} of {len(messages)}: {message}") from error


def check_same(what: str, value: str) -> None:
    """Raise :class:`RankError` on every rank unless all ranks hold the same ``value``."""
    values = all_gather(value)
    odd = [r for r, v in enumerate(values) if v != values[0]]
    if odd:
        ranks = ", ".join(map(str, odd))
        raise RankError(
            f"the ranks disagree on {what}: rank(s) {ranks} differ from rank 0 "
            f"({values[odd[0]]} vs {values[0]}); every rank must load the same {what}"
        )


def fingerprint(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A short hash of named tensors: names, shapes, dtypes and values."""
    digest = hashlib.sha256()
    for name, tensor in tensors:
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> str:
    """:func:`fingerprint` of a model's parameters and buffers."""
    return fingerprint((name, t) for name, t in [*model.named_parameters(), *model.named_buffers()])


def _collective_device() -> torch.device:
    """Where the backend wants tensors: this rank's CUDA device with NCCL, else the CPU."""
    nccl = is_distributed() and dist.get_backend() == "nccl"
    return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")


def sum_floats(values: Sequence[float]) -> list[float]:
    """Each of ``values`` summed over all ranks (float64, one all-reduce); unchanged in one
    process."""
    if not is_distributed():
        return list(values)
    local = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    return all_reduce_sum(local).tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (``flag`` in one process)."""
    return sum_floats([float(flag)])[0] > 0


def main_value(value: Any) -> Any:
    """Rank 0's ``value`` (any picklable object) on every rank; ``value`` in one process."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
