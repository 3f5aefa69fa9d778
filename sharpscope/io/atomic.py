"""Atomic file writes: a temporary file (or folder) in the same folder, then a rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from sharpscope.errors import InputError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, else delete it.

    Readers never see a half-written file, and an interrupted write leaves the old file intact.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder ``.NAME.*.tmp`` beside ``path``; on success rename it to
    ``path`` (which must not exist), else delete it. Readers never see a half-written folder."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    """The process umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike[str], writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and move the result to ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def check_can_create(path: str | os.PathLike[str], what: str, folder: bool = False) -> None:
    """Raise an :class:`InputError` naming ``what`` (e.g. ``"`junit`"``) unless ``path`` can be
    written: a file path that is not a folder (with ``folder``, a folder path that is not a
    file), where a probe file can be created and deleted (in the folder ``path`` with ``folder``,
    else in its parent; missing folders are made for the probe and removed again). Meant for
    before long work, so that an unwritable output fails in one line instead of after it."""
    target = Path(path)
    if folder and target.is_file():
        raise InputError(f"{what} {target} is a file, not a folder; choose a folder path")
    if not folder and target.is_dir():
        raise InputError(f"{what} {target} is a folder; give a file path")
    parent = target if folder and target.exists() else target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{what} {target}: {parent} is a file, so nothing can be written under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{what} {target}: the folder {parent} is not writable")
    _probe(target if folder else target.parent, f"{what} {target}")


def _probe(folder: Path, what: str) -> None:
    """Create and delete a file in ``folder``, making the missing folders on its path for it and
    removing them again; an :class:`InputError` starting with ``what`` if that fails. Ranks of a
    torchrun launch probe the same folder at once: one may remove a folder it made while another
    probes in it, so a folder vanishing under the probe is tried again."""
    for attempt in range(_PROBE_TRIES):
        try:
            _probe_once(folder)
            return
        except FileNotFoundError as exc:
            if attempt == _PROBE_TRIES - 1:
                raise InputError(f"{what}: cannot write there ({exc.strerror or exc})") from None
        except OSError as exc:
            raise InputError(f"{what}: cannot write there ({exc.strerror or exc})") from None


_PROBE_TRIES = 5
"""How often :func:`_probe` tries when a folder on its path vanishes under it."""


def _probe_once(folder: Path) -> None:
    """One try of :func:`_probe`; the folders it made are removed again whatever happens."""
    made: list[Path] = []
    try:
        for missing in reversed([folder, *folder.parents]):
            if not missing.exists():
                with contextlib.suppress(FileExistsError):  # made by another rank meanwhile
                    missing.mkdir()
                    made.append(missing)
        fd, probe = tempfile.mkstemp(prefix=".sharpscope-probe.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    finally:
        for created in reversed(made):
            with contextlib.suppress(OSError):
                created.rmdir()
