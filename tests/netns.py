"""Run a test's body in a private network namespace, on a veth pair of its own.

The loopback interface of this host has no MULTICAST flag, so IPv6 multicast
cannot be tried on it. `run_in_netns` starts `python -c CODE` under
`unshare --net` (a new, empty namespace: nothing it sends can leave it), and
`veth_pair` gives that namespace two connected interfaces with multicast on.
Needs root (the CI machine runs as root); `available` says whether it can run.

May import the standard library only.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@cache
def available() -> bool:
    """Whether this host lets us make a network namespace with a veth pair, and has IPv6."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    probe = (
        "ip link add gcks-p0 type veth peer name gcks-p1 && "
        f"{sys.executable} -c 'import socket; socket.socket(socket.AF_INET6).close()'"
    )
    done = subprocess.run(
        ["unshare", "--net", "sh", "-c", probe], capture_output=True, timeout=30, check=False
    )
    return done.returncode == 0


def run_in_netns(code: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """`python -c code` in a new network namespace, from the repository root."""
    return subprocess.run(
        ["unshare", "--net", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=ROOT,
        check=False,
    )


def veth_pair(name: str = "gv0", peer: str = "gv1") -> None:
    """Inside the namespace: loopback up, and `name` with its `peer`, up and at
    once usable for IPv6 (duplicate address detection off, so no wait)."""
    for command in (
        "ip link set lo up",
        "sysctl -qw net.ipv6.conf.all.accept_dad=0",
        "sysctl -qw net.ipv6.conf.default.accept_dad=0",
        f"ip link add {name} type veth peer name {peer}",
        f"ip link set {name} up",
        f"ip link set {peer} up",
    ):
        subprocess.run(command.split(), check=True, timeout=30)
