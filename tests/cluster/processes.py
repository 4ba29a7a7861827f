"""Test kit: GCKS nodes as real `gcks node` processes on loopback.

Each node runs as its own OS process with its own data directory, so tests
can SIGKILL, SIGSTOP or SIGTERM it and restart it on the same directory.
Output goes to a log file per node (shown by the test on failure). Every
process is killed when the kit closes, so no test leaves one behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from tests.cluster.clusterkit import Kit

GCKS = str(Path(sys.executable).parent / "gcks")


class NodeProcess:
    def __init__(self, kit: Kit, node_id: str) -> None:
        self.kit = kit
        self.node_id = node_id
        self.process: trio.Process | None = None
        self.log_path = kit.root / f"{node_id}.log"
        self.starts = 0

    async def start(self, env: dict[str, str] | None = None) -> None:
        assert self.process is None or self.process.returncode is not None
        self.starts += 1
        log = self.log_path.open("ab")
        self.process = await trio.lowlevel.open_process(
            [GCKS, "node", "--config", str(self.kit.config(self.node_id))],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )
        log.close()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def signal(self, signum: signal.Signals) -> None:
        if self.alive:
            assert self.process is not None
            self.process.send_signal(signum)

    async def kill(self) -> None:
        """SIGKILL and reap."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    async def stop(self, timeout_s: float = 10) -> int:
        """SIGTERM, wait (then SIGKILL); the exit status."""
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(timeout_s):
                await self.process.wait()
            await self.kill()
        rc = self.process.returncode
        assert rc is not None
        return rc

    async def http(self, path: str, timeout_s: float = 2) -> tuple[int, str]:
        """GET on the node's ops port: (status, body)."""
        port = self.kit.ports[self.node_id]["ops"]
        with trio.fail_after(timeout_s):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                chunks = []
                while data := await stream.receive_some(65536):
                    chunks.append(data)
        head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
        return int(head.split()[1]), body.decode()

    async def status(self) -> dict[str, Any] | None:
        try:
            code, body = await self.http("/status")
        except (OSError, trio.TooSlowError):
            return None
        return json.loads(body) if code == 200 else None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class ProcessCluster:
    def __init__(self, kit: Kit) -> None:
        self.kit = kit
        self.nodes = {nid: NodeProcess(kit, nid) for nid in kit.node_ids}

    async def leader(self, timeout_s: float = 20, among: list[str] | None = None) -> str:
        """The id of the leader that every live node (or `among`) agrees on."""
        with trio.fail_after(timeout_s):
            while True:
                ids = among or [n for n, p in self.nodes.items() if p.alive]
                statuses = [await self.nodes[n].status() for n in ids]
                leaders = {s["leader"] for s in statuses if s is not None}
                if len(leaders) == 1 and None not in leaders and all(statuses):
                    leader = leaders.pop()
                    if leader in ids:
                        return str(leader)
                await trio.sleep(0.1)

    async def wait_group(self, group: str = "demo", timeout_s: float = 20) -> None:
        with trio.fail_after(timeout_s):
            for node in self.nodes.values():
                while True:
                    status = await node.status()
                    if status is not None and group in status.get("groups", {}):
                        break
                    await trio.sleep(0.1)

    def logs(self) -> str:
        return "\n".join(f"--- {n} ---\n{p.log_tail()}" for n, p in self.nodes.items())


@asynccontextmanager
async def running_cluster(kit: Kit) -> AsyncIterator[ProcessCluster]:
    cluster = ProcessCluster(kit)
    try:
        for node in cluster.nodes.values():
            await node.start()
        yield cluster
    except BaseException:
        print(cluster.logs(), file=sys.stderr)
        raise
    finally:
        with trio.CancelScope(shield=True):
            for node in cluster.nodes.values():
                await node.kill()
