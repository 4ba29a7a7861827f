"""Real member processes in a chaos run: `gcks-member join --json` that stay in
the group throughout and whose key events are checked like everyone else's.

Each observer is the member library as users run it (probes, nearest-node
choice, failover, multicast and unicast push, resync), reaching nodes through
the same fault proxy routes as the workload's members. Its JSON event lines
(`registered`, `rekey`: message id and KEK/TEK fingerprints) become
`KeyEvent`s for the agreement, monotonic and convergence checks; an observer
that exits before the end is a violation. The workload never deregisters or
evicts observers, and the membership checks ignore them.

Test infrastructure; may import trio and the chaos history. Never reads key
material: the events carry fingerprints only.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import trio

from tests.chaos.history import History, KeyEvent
from tests.cluster.clusterkit import Kit

_MAX_LINE = 64 * 1024
_LAUNCH = "import sys; from gcks.member.cli import main; sys.exit(main(sys.argv[1:]))"


@dataclass
class Observer:
    member_id: str
    config: Path
    log_path: Path
    process: trio.Process | None = None
    last: tuple[int, str, str | None] | None = None  # msg id, kek, tek
    events: int = 0
    left: str | None = None
    stopped: bool = False
    unparsed: list[str] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def run(self, history: History, *, task_status: trio.TaskStatus[None]) -> None:
        """Start the process and turn its event lines into key events until it ends."""
        with self.log_path.open("ab") as log:
            self.process = await trio.lowlevel.open_process(
                [sys.executable, "-c", _LAUNCH, "join", "--config", str(self.config), "--json"],
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        task_status.started()
        try:
            await self._read(self.process, history)
        finally:
            # Cancelled with the run, or failed: the process never outlives it.
            with trio.CancelScope(shield=True):
                await self._reap()

    async def _read(self, process: trio.Process, history: History) -> None:
        assert process.stdout is not None
        buffer = b""
        async with process.stdout:
            while chunk := await process.stdout.receive_some(_MAX_LINE):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    self.on_line(line.decode(errors="replace"), history)
                if len(buffer) > _MAX_LINE:
                    self.unparsed.append(buffer[:200].decode(errors="replace"))
                    buffer = b""
        await process.wait()

    def on_line(self, line: str, history: History) -> None:
        """One line of the member's stdout: a key event, `left`, or something unparsable."""
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            self.unparsed.append(line[:200])
            return
        if not isinstance(event, dict):
            self.unparsed.append(line[:200])
            return
        kind = event.get("event")
        if kind in ("registered", "rekey"):
            msg_id, kek, tek = int(event["msg_id"]), str(event["kek"]), event.get("tek")
            self.last = (msg_id, kek, None if tek is None else str(tek))
            self.events += 1
            how = "gsa" if kind == "registered" else "rekey"
            history.key_events.append(
                KeyEvent(
                    self.member_id,
                    trio.current_time(),
                    msg_id,
                    kek,
                    self.last[2],
                    f"{how} (gcks-member, {kind} via {event.get('node')})",
                )
            )
        elif kind == "left":
            self.left = str(event.get("reason"))

    async def kill(self) -> None:
        """The end of the run: from now on the process is expected to be gone."""
        self.stopped = True
        await self._reap()

    async def _reap(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


def write_observer_config(
    kit: Kit, member_id: str, member_routes: dict[str, tuple[str, int]]
) -> Path:
    """A member TOML that reaches node N's member port through `member_routes[N]`."""
    ca, crt, key = kit.member_files(member_id)
    lines = [
        f'member_id = "{member_id}"',
        'group = "demo"',
        'role = "receiver"',
        "[tls]",
        f'cluster_ca = "{ca}"',
        f'cert = "{crt}"',
        f'key = "{key}"',
        "[probe]",
        "count = 3",
        "timeout_ms = 300",
        "interval_s = 5.0",
        "[rekey]",
        'multicast_interface = "127.0.0.1"',
        "register_timeout_ms = 5000",
    ]
    for node in kit.node_ids:
        host, port = member_routes[node]
        lines += [
            "[[nodes]]",
            f'id = "{node}"',
            f'member = "{host}:{port}"',
            f'probe = "127.0.0.1:{kit.ports[node]["probe"]}"',
        ]
    path = kit.root / f"{member_id}-member.toml"
    path.write_text("\n".join(lines) + "\n")
    return path
