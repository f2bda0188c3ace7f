"""`python -m nomoat.runtime.bandwidth` refuses a buffer it cannot measure with, in one line."""

from __future__ import annotations

import subprocess
import sys

import pytest
from nomoat.runtime.bandwidth import read_bandwidth


@pytest.mark.parametrize("megabytes", ["0", "-1"])
def test_the_command_refuses_a_buffer_of_no_megabytes(megabytes):
    cmd = [sys.executable, "-m", "nomoat.runtime.bandwidth", "1", "--megabytes", megabytes]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines()[-1] == (f"python -m nomoat.runtime.bandwidth: error: --megabytes must be >= 1 "
                                           f"(got {megabytes}); the buffer should be far larger than the last-level "
                                           "cache, e.g. the default 256")
    assert "Traceback" not in out.stderr


def test_the_function_refuses_one_too():
    with pytest.raises(ValueError, match="megabytes must be >= 1, got 0"):
        read_bandwidth(1, megabytes=0)
