"""The attack suite's harness (conftest.py registers its fixtures): every test here runs with
the network cut (any attempt fails the test), and gets helpers to prove that no code ran (a marker
file) and no user file changed.

Each attack is an input built by hand, as a hostile contributor or a careless user would; a test
asserts what the trust model in docs/security.md promises: one ``error:`` line and exit 2 naming
the opt-in (or exit 0 where the input is legitimately usable), no marker, no network, no file
outside ``--out`` touched.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from typer.testing import CliRunner

from sharpscope.cli.app import app

NETWORK_LOG = "SHARPSCOPE_TEST_NETWORK_LOG"
"""Environment variable naming the file a subprocess's socket guard appends its calls to."""

_SITE_GUARD = f"""\
import os, socket

def _refuse(name):
    def refuse(*args, **kwargs):
        with open(os.environ[{NETWORK_LOG!r}], "a") as log:
            log.write(name + " " + repr(args[:2]) + "\\n")
        raise OSError("network use in a test: " + name)
    return refuse

socket.getaddrinfo = _refuse("getaddrinfo")
socket.create_connection = _refuse("create_connection")
socket.socket.connect = _refuse("connect")
socket.socket.connect_ex = _refuse("connect_ex")
"""


@dataclass
class NetworkGuard:
    """Records every attempt to resolve a name or open a connection (each one also fails)."""

    calls: list[str] = field(default_factory=list)
    log: Path | None = None

    def attempts(self) -> list[str]:
        """In-process attempts, then those of subprocesses started with :meth:`env`."""
        logged = self.log.read_text().splitlines() if self.log and self.log.exists() else []
        return [*self.calls, *logged]

    def env(self, **extra: str) -> dict[str, str]:
        """An environment for a subprocess whose sockets are guarded the same way."""
        assert self.log is not None
        path = [str(self.log.parent / "site"), os.environ.get("PYTHONPATH", "")]
        return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p),
                NETWORK_LOG: str(self.log), **extra}  # fmt: skip


@pytest.fixture(autouse=True)
def no_network(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NetworkGuard]:
    """Cut the network for the test (and, through :meth:`NetworkGuard.env`, its subprocesses);
    any attempt fails the test at teardown, even one that the code under test caught."""
    guard = NetworkGuard()
    folder = tmp_path_factory.mktemp("network")
    (folder / "site").mkdir()
    (folder / "site" / "sitecustomize.py").write_text(_SITE_GUARD)
    guard.log = folder / "attempts.log"

    def refuse(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            guard.calls.append(f"{name} {args[:2]!r}")
            raise OSError(f"network use in a test: {name}")

        return call

    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect_ex"))
    yield guard
    assert guard.attempts() == [], f"the network was used: {guard.attempts()}"


class Snapshot:
    """The sha256 of every file (and the target of every link) under some folders, to prove
    afterwards that none was changed, added or removed."""

    def __init__(self, *roots: Path) -> None:
        self.roots = roots
        self.before = self._take()

    def _take(self) -> dict[str, str]:
        seen: dict[str, str] = {}
        for root in self.roots:
            paths = [root] if not root.is_dir() or root.is_symlink() else sorted(root.rglob("*"))
            for path in paths:
                if path.is_symlink():
                    seen[str(path)] = "link -> " + os.readlink(path)
                elif path.is_file():
                    seen[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
                elif path.is_dir():
                    seen[str(path)] = "folder"
        return seen

    def changes(self) -> dict[str, tuple[str | None, str | None]]:
        """Path -> (before, after) for every path that differs."""
        after = self._take()
        keys = set(self.before) | set(after)
        return {
            k: (self.before.get(k), after.get(k))
            for k in keys
            if self.before.get(k) != after.get(k)
        }

    def assert_unchanged(self) -> None:
        """Fail naming every file that changed."""
        assert self.changes() == {}, f"user files changed: {self.changes()}"


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[Path]:
    """A path a payload would create if its code ran; the test fails if it exists afterwards."""
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), f"code from an input ran: {path} was created"


def cli(*args: object) -> Result:
    """``sharpscope ARGS`` in this process (stdout and stderr kept apart)."""
    return CliRunner().invoke(app, [str(a) for a in args])


def run_sharpscope(
    *args: object, guard: NetworkGuard, cwd: Path | None = None, timeout: float = 300, **env: str
) -> subprocess.CompletedProcess[str]:
    """``python -m sharpscope ARGS`` in a fresh process whose sockets are guarded."""
    return subprocess.run(
        [sys.executable, "-m", "sharpscope", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=guard.env(**env),
        check=False,
    )
