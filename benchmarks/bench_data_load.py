"""Taking a subset of a large ``.pt`` tensor file: memory-mapped (sharpscope's reader) or not.

Run by hand from the repository root (under a minute; writes a temporary file of about 1.5 GB)::

    python benchmarks/bench_data_load.py [--samples-in-file 500000] [--take 1024]

Each variant runs in a fresh process, twice in turn (the page cache is warm after the first
write): wall time of ``load_data(FILE, samples=TAKE)`` and the process's peak resident set
(VmHWM, which counts mapped file pages too). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CHILD = """
import sys, time
import torch
from sharpscope.io import data_files
from sharpscope.io.data import load_data
if sys.argv[2] == "read whole":
    load = torch.load
    data_files.torch.load = lambda *a, **k: load(*a, **{**k, "mmap": False})
start = time.perf_counter()
bundle = load_data(sys.argv[1], samples=int(sys.argv[3]))
seconds = time.perf_counter() - start
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(f"{seconds:.3f} {peak // 1024} {len(bundle)}")
"""


def main() -> None:
    """Write the file, time both readers in fresh processes, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples-in-file", type=int, default=500_000)
    parser.add_argument("--take", type=int, default=1024)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.pt"
        generator = torch.Generator().manual_seed(0)
        inputs = torch.randn(args.samples_in_file, 3, 32, 8, generator=generator)
        targets = torch.randint(0, 10, (args.samples_in_file,), generator=generator)
        torch.save({"inputs": inputs, "targets": targets}, path)
        size_gb = path.stat().st_size / 1e9
        del inputs, targets
        print(
            f"{args.samples_in_file:,} samples of 3x32x8 float32 ({size_gb:.2f} GB), take "
            f"{args.take}; torch {torch.__version__}\n"
        )
        print("| reader | run | seconds | peak RSS (MB) |")
        print("| --- | ---: | ---: | ---: |")
        for run in (1, 2):
            for reader in ("memory-mapped", "read whole"):
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, str(path), reader, str(args.take)],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout.split()
                print(f"| {reader} | {run} | {out[0]} | {out[1]} |")


if __name__ == "__main__":
    main()
