"""The ``.npz`` members a run reads, each checked against a memory cap before it is read: a
compressed member may expand a thousandfold (a 411 kB file held 410 MB of zeros).

The size of a member is the larger of its zip header's and its ``.npy`` header's (shape times
item size: numpy allocates that before reading). The cap is half the memory free when the file is
opened (Linux's MemAvailable, else half the physical memory), or the bytes that the environment
variable :data:`CAP_VARIABLE` names.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from sharpscope.analysis.plan import available_memory, sizes
from sharpscope.errors import InputError

CAP_VARIABLE = "SHARPSCOPE_DATA_MEMORY"
"""Bytes the arrays of one ``.npz`` file may take when read (default: half the free memory)."""
FREE_SHARE = 0.5
_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


class BoundedNpz(Mapping[str, Any]):
    """The members of an open ``numpy.load`` archive by name; reading one whose size would take
    the arrays read so far past the cap is an :class:`InputError` naming the sizes."""

    def __init__(self, npz: np.lib.npyio.NpzFile, name: str) -> None:
        self.npz, self.name = npz, name
        self.cap = memory_cap()
        self.taken = 0

    def __getitem__(self, key: str) -> Any:
        size = self._size(key)
        if self.cap is not None and self.taken + size > self.cap:
            read = f" with the {sizes(self.taken)} read before it" if self.taken else ""
            raise InputError(
                f"{self.name}: {key!r} expands to {sizes(size)} when read{read}, more than the "
                f"{sizes(self.cap)} allowed ({_cap_source()}); save smaller arrays, or set "
                f"{CAP_VARIABLE} to the bytes to allow"
            )
        self.taken += size
        return self.npz[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.npz.files)

    def __len__(self) -> int:
        return len(self.npz.files)

    def _size(self, key: str) -> int:
        """The bytes the member takes when read, from its headers alone (a member that is not
        a ``.npy`` array is read as bytes: its zip header's size)."""
        names = self.npz.zip.namelist()
        member = f"{key}.npy" if f"{key}.npy" in names else key
        info = self.npz.zip.getinfo(member)
        if not member.endswith(".npy"):
            return info.file_size
        with self.npz.zip.open(info) as f:
            try:
                read_header = _HEADER_READERS.get(np.lib.format.read_magic(f))
                if read_header is None:
                    raise ValueError("a .npy format version numpy.savez does not write")
                shape, _, dtype = read_header(f)
            except (ValueError, zipfile.BadZipFile, EOFError) as exc:
                raise InputError(f"{self.name}: {key!r} is not a numpy array ({exc})") from exc
        return max(info.file_size, math.prod(shape) * dtype.itemsize)


def memory_cap() -> int | None:
    """The cap in bytes: :data:`CAP_VARIABLE`, else half the free memory; None where neither is
    known."""
    given = os.environ.get(CAP_VARIABLE)
    if given is not None:
        try:
            return int(given)
        except ValueError:
            raise InputError(f"{CAP_VARIABLE} must be a number of bytes, got {given!r}") from None
    free = available_memory(torch.device("cpu")) or _physical_memory()
    return None if free is None else int(FREE_SHARE * free)


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cap_source() -> str:
    return CAP_VARIABLE if CAP_VARIABLE in os.environ else "half the free memory"
