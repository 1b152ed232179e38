"""Running the `p2pdoe` command line as a user would, and what a clean failure looks like."""

from __future__ import annotations

import subprocess
import sys


def run_p2pdoe(*args: str, timeout: float = 550) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "p2pdoe.cli.main", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Exit status 2, one stderr line starting 'p2pdoe: error:' holding every needle, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("p2pdoe: error:")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
