"""The CIFAR-10/100 python batch files, read by an unpickler that builds exactly what those files
hold and nothing else.

An official batch is a dict of byte-string keys: ``data``, an N x 3072 uint8 array, lists of int
labels and of byte-string file names, a byte-string batch label (the meta files: lists of class
names, ints). numpy writes an array as ``_reconstruct(ndarray, (0,), b'b')`` whose state holds a
``numpy.dtype`` and the raw bytes (``_frombuffer`` with pickle protocol 5; Python 3 writes bytes
through ``_codecs.encode`` with protocol 2). Each of these is replaced by a stand-in that checks
its arguments: integer dtypes with numpy's own state only (a state could give an item more bytes
than the buffer holds, and reading it would run past the buffer); arrays whose shape
times item size is exactly the bytes the file gave; no other global. So nothing the file holds
allocates more than the file's own size.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from sharpscope.errors import InputError
from sharpscope.io.user_code import one_line

DTYPES = frozenset({"u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8"})
"""The array types a CIFAR file may hold: integers (the pixels are ``u1``)."""
MAX_DIMS = 4


class _Refused(Exception):
    """Something no CIFAR file holds; the message says what."""


def load_cifar_pickle(path: Path) -> dict[str, Any]:
    """A CIFAR pickle as a dict with str keys (numpy arrays, lists, bytes and ints as values)."""
    try:
        with path.open("rb") as f:
            loaded = _CifarUnpickler(f, path.stat().st_size).load()
        if not isinstance(loaded, dict):
            raise InputError(f"{path} is not a CIFAR file (it holds a {type(loaded).__name__})")
        return {_key(k): _value(v) for k, v in loaded.items()}
    except _Refused as exc:
        raise InputError(
            f"refusing to unpickle {path}: it asks for {exc}, which a CIFAR file never holds; use "
            "CIFAR files from a trusted source"
        ) from None
    except InputError:
        raise
    except Exception as exc:
        raise InputError(
            f"cannot read {path} as a CIFAR pickle ({one_line(exc)}); re-extract the archive"
        ) from exc


class _CifarUnpickler(pickle.Unpickler):
    """Byte strings stay bytes (``encoding="bytes"``, as Python 2 wrote them); the globals are
    the stand-ins below, given the file's size as the budget of what they may allocate."""

    def __init__(self, file: Any, size: int) -> None:
        super().__init__(file, encoding="bytes")
        self.budget = size

    def find_class(self, module: str, name: str) -> Any:
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return _Global(_Array)
        if name == "_frombuffer" and module in ("numpy.core.numeric", "numpy._core.numeric"):
            return _Global(_from_buffer)
        if (module, name) == ("numpy", "ndarray"):
            return _NDARRAY
        if (module, name) == ("numpy", "dtype"):
            return _Global(_Dtype)
        if (module, name) == ("_codecs", "encode"):
            return _Global(self._latin1)
        if module in ("builtins", "__builtin__") and name == "bytes":
            return _Global(_empty_bytes)
        raise _Refused(f"{module}.{name}")

    def _latin1(self, text: Any, encoding: Any = "utf-8") -> bytes:
        """``_codecs.encode(text, "latin1")``: how Python 3 writes bytes with protocol 2; all
        such bytes together may not outgrow the file."""
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise _Refused(f"_codecs.encode of a {type(text).__name__} as {encoding!r}")
        self.budget -= len(text)
        if self.budget < 0:
            raise _Refused("more bytes than the file's own size")
        return text.encode("latin-1")


class _Global:
    """A global the file may call, and nothing else: pickle's BUILD cannot set its attributes."""

    __slots__ = ("call",)

    def __init__(self, call: Any) -> None:
        self.call = call

    def __call__(self, *args: Any) -> Any:
        return self.call(*args)

    def __setstate__(self, state: Any) -> None:
        raise _Refused("a state for a function")


_NDARRAY = _Global(None)
"""What ``numpy.ndarray`` stands for: only the first argument of ``_reconstruct``."""


def _empty_bytes(*args: Any) -> bytes:
    """``bytes()``: how Python 3 writes an empty byte string with protocol 2 (and nothing
    else: ``bytes(n)`` would allocate ``n`` bytes)."""
    if args:
        raise _Refused(f"bytes({args[0]!r:.20})")
    return b""


class _Dtype:
    """``numpy.dtype(spec, align, copy)``: an integer type of :data:`DTYPES`, whose state must be
    numpy's own for it (only the byte order may vary). The array gets a dtype built from that, so
    a second state given to this stand-in later changes nothing already built."""

    def __init__(self, spec: Any, align: Any = False, copy: Any = True) -> None:
        name = _text(spec)
        if name not in DTYPES or align not in (0, False) or copy not in (1, True):
            raise _Refused(f"the array type {name!r}")
        self.dtype: np.dtype | None = None
        self.name = name

    def __setstate__(self, state: Any) -> None:
        usual = np.dtype(self.name).__reduce__()[2]
        order = _text(state[1]) if isinstance(state, tuple) and len(state) > 1 else None
        orders = ("|",) if usual[1] == "|" else ("<", ">")
        if order not in orders or state[2:] != usual[2:]:
            raise _Refused(f"the array type {self.name!r} with the state {state!r:.80}")
        self.dtype = np.dtype(self.name).newbyteorder(order)


class _Array:
    """``_reconstruct(ndarray, (0,), b"b")``, then its state ``(1, shape, dtype, fortran,
    raw bytes)``: the array over exactly those bytes."""

    def __init__(self, kind: Any, shape: Any, code: Any) -> None:
        if kind is not _NDARRAY or shape != (0,) or _text(code) != "b":
            raise _Refused("an array subclass")
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) != 5:
            raise _Refused("an array state that numpy does not write")
        version, shape, dtype, fortran, raw = state
        if version != 1 or fortran not in (0, 1):
            raise _Refused("an array state that numpy does not write")
        self.array = _over(raw, dtype, shape, "F" if fortran else "C")


def _from_buffer(raw: Any, dtype: Any, shape: Any, order: Any) -> _Array:
    """``_frombuffer(raw, dtype, shape, order)``: how numpy writes arrays with protocol 5."""
    array = _Array(_NDARRAY, (0,), "b")
    array.array = _over(raw, dtype, shape, _text(order))
    return array


def _over(raw: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    """A read-only array over ``raw``, refused unless ``shape`` and the (built) ``dtype`` take
    exactly its bytes."""
    if not isinstance(dtype, _Dtype) or dtype.dtype is None:
        raise _Refused("an array without a numpy integer type")
    ok_shape = isinstance(shape, tuple) and len(shape) <= MAX_DIMS
    if not ok_shape or not all(type(n) is int and n >= 0 for n in shape) or order not in ("C", "F"):
        raise _Refused(f"an array of shape {shape!r:.80}")
    size = math.prod(shape) * dtype.dtype.itemsize
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != size:
        raise _Refused(f"an array of shape {shape} whose bytes do not match it")
    return np.frombuffer(raw, dtype.dtype).reshape(shape, order=order)


def _text(value: Any) -> str:
    """A name as Python 2 (bytes) or Python 3 (str) wrote it."""
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return value if isinstance(value, str) else repr(value)


def _key(key: Any) -> str:
    return key.decode("latin-1") if isinstance(key, bytes) else str(key)


def _value(value: Any) -> Any:
    """A dict value, or the items of a list value, with the stand-ins replaced by their arrays."""
    return [_built(v) for v in value] if isinstance(value, list) else _built(value)


def _built(value: Any) -> Any:
    if isinstance(value, _Array):
        if value.array is None:
            raise _Refused("an array without its bytes")
        return value.array
    if isinstance(value, _Dtype):
        raise _Refused("a bare numpy type")
    return value
