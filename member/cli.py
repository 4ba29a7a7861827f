"""`gcks-member`: join a group, print its key events, send and receive protected data.

    gcks-member join --config FILE [--json]
    gcks-member send --config FILE [--count N] [--interval-ms MS] [--message TEXT]
                     [--to HOST:PORT] [--ttl N] [--json]
    gcks-member recv --config FILE [--count N] [--json]

Every command registers with the nearest node (see `gcks.member.member`) and
prints the member's events: with `--json` one JSON object a line, flushed at
once, for tools to parse; otherwise one readable line each. Keys appear only
as fingerprints. SIGINT or SIGTERM deregisters, prints `left` and exits 0.

Data goes to the group's multicast address on the rekey port + 1
(`gcks.member.datagram.data_endpoint`), out of `rekey.multicast_interface`;
`send --to` sends unicast instead, and `recv` listens on `data_listen` when the
configuration sets it. `recv` prints each packet that verifies (`data`) and, at
the end, how many were received and dropped (`data_stats`).

Exit status: 0 done (or interrupted); 1 the member could not register, was
refused or removed from the group, or a socket failed; 2 bad arguments or
configuration. May import `gcks.member` and `gcks.proto`; never `gcks.cluster`.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Final, TextIO

import trio

from gcks.member.config import ConfigError, MemberConfig, load_member_config
from gcks.member.datagram import (
    DatagramError,
    Receiver,
    Sender,
    data_endpoint,
    open_multicast_socket,
    open_send_socket,
    open_unicast_socket,
)
from gcks.member.member import Event, Member, MemberError, wall_clock_ms
from gcks.member.tls import MemberTlsError
from gcks.proto.errors import DecodeError
from gcks.proto.messages import parse_host_port
from gcks.proto.policy import Role

__all__ = ["Output", "main"]

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2

log = logging.getLogger("gcks.member.cli")


class Output:
    """Writes events to `stream`: JSON lines or readable lines, flushed at once."""

    def __init__(self, stream: TextIO, *, as_json: bool) -> None:
        self._stream = stream
        self._json = as_json

    def write(self, event: Event) -> None:
        if self._json:
            line = json.dumps(event, separators=(",", ":"))
        else:
            kind = event.get("event", "?")
            fields = " ".join(
                _readable(key, value) for key, value in event.items() if key != "event"
            )
            line = f"{kind} {fields}".rstrip()
        self._stream.write(line + "\n")
        self._stream.flush()


def _readable(key: str, value: object) -> str:
    if isinstance(value, dict):
        value = ",".join(f"{k}:{v}" for k, v in value.items())
    elif isinstance(value, str) and (not value or not value.isprintable() or " " in value):
        value = json.dumps(value)  # quoted and escaped: no control characters reach a terminal
    return f"{key}={value}"


Body = Callable[[Member, Output], Awaitable[None]]


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


async def _print_events(member: Member, out: Output) -> None:
    async for event in member.events():
        out.write(event)


async def _cancel_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("%s: leaving the group", signal.Signals(signum).name)
            scope.cancel()
            return


async def _as_member(config: MemberConfig, out: Output, body: Body) -> int:
    """Run `body` as a registered member until it returns, the member leaves,
    or a signal comes; then deregister and print the remaining events."""
    member = Member(config)
    failure: str | None = None
    removed = False  # left the group before we chose to (evicted, terminated)
    async with trio.open_nursery() as guard:
        guard.start_soon(_cancel_on_signal, guard.cancel_scope)
        try:
            async with member, trio.open_nursery() as tasks:
                tasks.start_soon(_print_events, member, out)
                tasks.start_soon(_body_then_stop, body, member, out, tasks.cancel_scope)
                await member.wait_left()
                removed = True
                tasks.cancel_scope.cancel()
        except* (MemberError, DatagramError) as errors:
            failure = "; ".join(str(exc) for exc in _leaves(errors))
        guard.cancel_scope.cancel()
    async for event in member.events():  # what is left: `left`, last rekeys
        out.write(event)
    if failure is not None:
        print(f"gcks-member: {failure}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_FAILED if removed else EXIT_OK


async def _body_then_stop(body: Body, member: Member, out: Output, scope: trio.CancelScope) -> None:
    await body(member, out)
    scope.cancel()


async def _join(_member: Member, _out: Output) -> None:
    await trio.sleep_forever()  # until a signal, or the member leaves


def _send_body(args: argparse.Namespace, config: MemberConfig) -> Body:
    async def send(member: Member, out: Output) -> None:
        destination = args.to or data_endpoint(member.gsa.policy)
        # A TEK given at registration may activate later (the policy's activation
        # delay gives receivers time to learn it): wait for it, within that delay.
        now = wall_clock_ms()
        upcoming = [t.activation_ms for t in member.gsa.teks if t.expiry_ms > now]
        if member.gsa.sending_tek(now) is None and upcoming:
            await trio.sleep(max(0, min(upcoming) - now) / 1000)
        ipv6 = ":" in destination[0]
        sock = open_send_socket(
            config.rekey.multicast_interface,
            args.ttl,
            ipv6_interface=config.rekey.multicast_interface6 if ipv6 else None,
        )
        with Sender(sock, member.protect, destination) as sender:
            for number in range(1, args.count + 1):
                text = args.message if args.message is not None else f"message {number}"
                size = await sender.send(text.encode())
                out.write(
                    {
                        "event": "sent",
                        "group": config.group,
                        "seq": number,
                        "bytes": size,
                        "to": f"{destination[0]}:{destination[1]}",
                    }
                )
                if number < args.count:
                    await trio.sleep(args.interval_ms / 1000)

    return send


def _recv_body(args: argparse.Namespace, config: MemberConfig) -> Body:
    async def recv(member: Member, out: Output) -> None:
        if config.data_listen is not None:
            sock = await open_unicast_socket(*config.data_listen)
        else:
            group, port = data_endpoint(member.gsa.policy)
            sock = await open_multicast_socket(
                group, port, config.rekey.multicast_interface, config.rekey.multicast_interface6
            )
        with Receiver(sock, member.unprotect) as receiver:
            host, port = receiver.address
            out.write({"event": "listening", "group": config.group, "address": f"{host}:{port}"})
            try:
                received = 0
                while args.count == 0 or received < args.count:
                    packet = await receiver.receive()
                    received += 1
                    out.write(
                        {
                            "event": "data",
                            "group": config.group,
                            "sender_id": packet.sender_id,
                            "from": f"{packet.source[0]}:{packet.source[1]}",
                            "payload": packet.payload.decode("utf-8", "backslashreplace"),
                        }
                    )
            finally:
                stats = receiver.stats
                out.write(
                    {
                        "event": "data_stats",
                        "group": config.group,
                        "received": stats.received,
                        "accepted": stats.accepted,
                        "bad": stats.bad,
                        "rejected": dict(sorted(stats.rejected.items())),
                    }
                )

    return recv


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def _address(text: str) -> tuple[str, int]:
    try:
        return parse_host_port(text, "--to")
    except DecodeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gcks-member", description="A member of a gcks group: keys, events and data."
    )
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="log level on stderr (default: warning)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("--config", required=True, type=Path, help="member TOML file")
        sub.add_argument("--json", action="store_true", help="one JSON object per line")
        return sub

    command("join", "join the group and print key events until interrupted")
    send = command("send", "send protected messages to the group (role sender)")
    send.add_argument("--count", type=_positive, default=1, help="messages to send (default 1)")
    send.add_argument(
        "--interval-ms", type=_positive, default=1000, help="pause between messages (default 1000)"
    )
    send.add_argument("--message", help="payload text (default: 'message N')")
    send.add_argument("--to", type=_address, help="unicast HOST:PORT instead of the group")
    send.add_argument(
        "--ttl", type=_positive, default=1, help="multicast TTL (default 1; 0 stays on this host)"
    )
    recv = command("recv", "receive and print protected messages of the group")
    recv.add_argument(
        "--count", type=_positive, default=0, help="stop after N messages (default 0: never)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = load_member_config(args.config)
    except ConfigError as exc:
        print(f"gcks-member: configuration {args.config}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "send" and config.role is not Role.SENDER:
        print(f"gcks-member: send needs role = 'sender' in {args.config}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "send" and args.ttl > 255:
        print("gcks-member: --ttl must be at most 255", file=sys.stderr)
        return EXIT_USAGE
    body: Body
    if args.command == "send":
        body = _send_body(args, config)
    elif args.command == "recv":
        body = _recv_body(args, config)
    else:
        body = _join
    out = Output(sys.stdout, as_json=args.json)
    try:
        return trio.run(_as_member, config, out, body)
    except MemberTlsError as exc:
        print(f"gcks-member: TLS {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # before the signal handler was installed
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
