"""The suite's own rule (tests/conftest.py): a test that starts Python in a process of its own is
marked ``integration``, so that ``pytest -m "not integration"`` stays in this process."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_an_unmarked_test_cannot_start_python():
    with pytest.raises(AssertionError, match=r"test_markers\.py::.* starts python.*: mark it"):
        subprocess.run([sys.executable, "-c", "pass"], check=True)


def test_other_programs_need_no_marker():
    assert subprocess.run(["true"], check=True).returncode == 0


@pytest.mark.integration
def test_a_marked_test_starts_python():
    done = subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True)
    assert done.stdout == "42\n"
