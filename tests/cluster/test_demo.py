"""`gcks demo`, the README's first command, run as a user would run it."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_demo_succeeds_and_leaves_no_process_or_file_behind(tmp_path: Path) -> None:
    gcks = str(Path(sys.executable).parent / "gcks")
    before = set(Path(tempfile.gettempdir()).glob("gcks-demo-*"))
    result = subprocess.run(
        [gcks, "demo"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "registered with" in out
    assert "decrypted from sender" in out
    assert "m5 left" in out
    assert "failed over" in out
    assert "members agree with the nodes on the KEK: yes" in out
    assert out.rstrip().endswith("demo OK")
    assert set(Path(tempfile.gettempdir()).glob("gcks-demo-*")) == before
    leftovers = subprocess.run(
        ["pgrep", "-f", "gcks-demo-"], capture_output=True, text=True, check=False
    )
    assert leftovers.stdout.strip() == ""


def test_demo_interrupted_with_ctrl_c_cleans_up_and_exits_1() -> None:
    gcks = str(Path(sys.executable).parent / "gcks")
    before = set(Path(tempfile.gettempdir()).glob("gcks-demo-*"))
    process = subprocess.Popen(
        [gcks, "demo"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:  # bounded: the demo itself ends within a minute
            if line.startswith("2. "):
                break
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 1
    assert "interrupted" in rest
    assert set(Path(tempfile.gettempdir()).glob("gcks-demo-*")) == before
    leftovers = subprocess.run(
        ["pgrep", "-f", "gcks-demo-"], capture_output=True, text=True, check=False
    )
    assert leftovers.stdout.strip() == ""
