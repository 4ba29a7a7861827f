"""`gcks-member` as operators and tools run it: real processes against in-process nodes.

The CLI runs as a child process (`python -c "...main(argv)"`), so signals and
stdout are real: JSON lines must arrive flushed, SIGTERM must deregister and
print `left`. Every read of the child's output is under a deadline.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from gcks.member.cli import Output, main
from tests.cluster.clusterkit import make_kit
from tests.member.test_member import GROUP, member_config, running_cluster

_RUN_MAIN = "import sys; from gcks.member.cli import main; sys.exit(main(sys.argv[1:]))"
_ROOT = Path(__file__).resolve().parents[2]


class Child:
    """A `gcks-member` process whose stdout is read line by line."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self._buffer = b""
        self.lines: list[dict[str, object]] = []

    @classmethod
    async def start(cls, *argv: str) -> Child:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-c", _RUN_MAIN, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=_ROOT,
        )
        return cls(process)

    async def next_event(self) -> dict[str, object]:
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self.process.stdout.receive_some(65_536)
            if not chunk:
                raise EOFError(f"gcks-member exited; stderr: {await self.stderr()}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        event = json.loads(line)
        assert isinstance(event, dict)
        self.lines.append(event)
        return event

    async def wait_for(
        self, kind: str, timeout_s: float = 20, **fields: object
    ) -> dict[str, object]:
        with trio.fail_after(timeout_s):
            while True:
                event = await self.next_event()
                if event["event"] == kind and all(event.get(k) == v for k, v in fields.items()):
                    return event

    async def rest(self, timeout_s: float = 20) -> list[dict[str, object]]:
        """Every remaining event, up to the child's exit."""
        events = []
        with trio.fail_after(timeout_s):
            while True:
                try:
                    events.append(await self.next_event())
                except EOFError:
                    break
            await self.process.wait()
        return events

    async def stderr(self) -> str:
        assert self.process.stderr is not None
        data = b""
        with trio.move_on_after(2):
            while chunk := await self.process.stderr.receive_some(65_536):
                data += chunk
        return data.decode(errors="replace")

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()


async def test_join_prints_json_events_and_on_sigterm_deregisters_prints_left_and_exits_0(
    tmp_path: Path,
) -> None:
    async with running_cluster(tmp_path) as cluster:
        config = member_config(cluster, "m1")
        child = await Child.start("join", "--config", str(config), "--json")
        try:
            registered = await child.wait_for("registered")
            assert set(registered) >= {"group", "node", "rtt_ms", "msg_id", "kek", "tek"}
            assert registered["group"] == GROUP
            assert registered["node"] in cluster.nodes
            assert set(registered["rtt_ms"]) == set(cluster.nodes)  # type: ignore[arg-type]
            assert len(str(registered["kek"])) == 16
            await cluster.force_rekey()
            rekey = await child.wait_for("rekey", msg_id=cluster.msg_id())
            leader = cluster.leader().driver
            assert leader is not None
            assert rekey["kek"] == leader.state.kek(GROUP).fingerprint
            child.process.send_signal(signal.SIGTERM)
            rest = await child.rest()
        finally:
            child.kill()
        assert child.process.returncode == 0, await child.stderr()
        assert rest[-1]["event"] == "left"
        assert rest[-1]["reason"] == "deregistered"
        assert not any(
            n.driver is not None and n.driver.state.is_member(GROUP, "m1")
            for n in cluster.nodes.values()
        )


async def test_send_and_recv_exchange_protected_data_over_the_group(tmp_path: Path) -> None:
    async with running_cluster(tmp_path) as cluster:
        receiver = await Child.start(
            "recv", "--config", str(member_config(cluster, "m2")), "--count", "2", "--json"
        )
        sender = None
        try:
            await receiver.wait_for("listening")
            sender = await Child.start(
                "send",
                "--config",
                str(member_config(cluster, "m1", role="sender")),
                "--count",
                "2",
                "--interval-ms",
                "20",
                "--message",
                "hello group",
                "--ttl",
                "0",
                "--json",
            )
            first = await receiver.wait_for("data")
            second = await receiver.wait_for("data")
            sent = await sender.rest()
            rest = await receiver.rest()
        finally:
            receiver.kill()
            if sender is not None:
                sender.kill()
        assert sender.process.returncode == 0, await sender.stderr()
        assert [e["seq"] for e in sent if e["event"] == "sent"] == [1, 2]
        assert first["payload"] == second["payload"] == "hello group"
        assert receiver.process.returncode == 0, await receiver.stderr()
        (stats,) = [e for e in rest if e["event"] == "data_stats"]
        assert stats["accepted"] == 2
        assert rest[-1]["event"] == "left"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_bad_configuration_exits_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _write(tmp_path / "bad.toml", 'member_id = "m1"\ngroup = "demo"\nrole = "boss"\n')
    assert main(["join", "--config", str(config)]) == 2
    assert "role" in capsys.readouterr().err


def test_missing_configuration_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["recv", "--config", str(tmp_path / "absent.toml")]) == 2
    assert "absent.toml" in capsys.readouterr().err


def test_unknown_command_and_bad_count_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["dance", "--config", "x"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["send", "--config", "x", "--count", "-3"])
    assert exit_info.value.code == 2


def test_send_as_a_receiver_is_refused_before_any_connection(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kit = make_kit(tmp_path, members=1)
    ca, cert, key = kit.member_files("m1")
    config = _write(
        tmp_path / "m1.toml",
        f'''member_id = "m1"
group = "demo"
role = "receiver"
[tls]
cluster_ca = "{ca}"
cert = "{cert}"
key = "{key}"
[[nodes]]
id = "n1"
member = "127.0.0.1:9"
probe = "127.0.0.1:10"
''',
    )
    assert main(["send", "--config", str(config)]) == 2
    assert "sender" in capsys.readouterr().err


def test_readable_output_is_one_line_per_event_with_text_quoted_and_escaped() -> None:
    stream = io.StringIO()
    Output(stream, as_json=False).write(
        {"event": "data", "sender_id": 3, "payload": "two words\x1b[2J", "rtt_ms": {"n1": 1.5}}
    )
    assert stream.getvalue() == 'data sender_id=3 payload="two words\\u001b[2J" rtt_ms=n1:1.5\n'


def test_json_output_is_one_compact_object_per_line() -> None:
    stream = io.StringIO()
    out = Output(stream, as_json=True)
    out.write({"event": "left", "group": "demo", "reason": "deregistered"})
    out.write({"event": "rekey", "msg_id": 4})
    lines = stream.getvalue().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["left", "rekey"]
