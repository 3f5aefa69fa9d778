"""The harness can fail: a socket call, a changed file and a created marker are all caught."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from security.attack import Snapshot


def test_an_in_process_connection_is_caught(no_network):
    with pytest.raises(OSError, match="network use in a test"):
        socket.getaddrinfo("huggingface.co", 443)
    assert no_network.attempts() == ["getaddrinfo ('huggingface.co', 443)"]
    no_network.calls.clear()  # this test's own attempt is the point; do not fail it


@pytest.mark.integration
def test_a_subprocess_connection_is_caught(no_network):
    code = "import socket\ntry: socket.getaddrinfo('huggingface.co', 443)\nexcept OSError: pass"
    subprocess.run([sys.executable, "-c", code], env=no_network.env(), check=True)
    assert len(no_network.attempts()) == 1 and "huggingface.co" in no_network.attempts()[0]
    assert no_network.log is not None
    no_network.log.unlink()


def test_a_changed_file_is_caught(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    snap = Snapshot(tmp_path)
    (tmp_path / "notes.txt").write_text("theirs")
    (tmp_path / "new").write_text("")
    assert set(snap.changes()) == {str(tmp_path / "notes.txt"), str(tmp_path / "new")}
    with pytest.raises(AssertionError, match="user files changed"):
        snap.assert_unchanged()
