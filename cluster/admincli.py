"""`gcks admin`: the operator's client of the admin API.

    gcks admin --config admin.toml [--json] cluster status
    gcks admin --config admin.toml group list | show G | delete G
    gcks admin --config admin.toml group create --policy F | update --policy F
    gcks admin --config admin.toml member list G | evict G M
    gcks admin --config admin.toml rekey G [--kek] [--no-tek]
    gcks admin --config admin.toml cluster add-node ID | add-learner ID | promote ID
                                           | remove-node ID | transfer-leader ID
    gcks admin --config admin.toml snapshot save FILE --key-file K | restore FILE --key-file K

Requests go to the first node that answers; a NOT_LEADER answer is retried on
the leader it names. Tables for people, `--json` for scripts. Snapshot files
hold every group key: they are written encrypted (AES-256-GCM under a 32-byte
backup key the operator keeps, 64 hex digits in `--key-file`) with mode 0600.

May import trio and `gcks.cluster` (admin, config); holds no node logic.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gcks.cluster.admin import AdminClient, AdminError
from gcks.cluster.config import Address
from gcks.proto.errors import PolicyError, ProtocolError
from gcks.proto.policy import GroupPolicy

BACKUP_MAGIC: Final = b"GCKSBAK1"


@dataclass(frozen=True, slots=True)
class Target:
    node_id: str
    address: Address


# How a node can fail to answer: down, slow, hanging up mid-handshake (a TLS
# failure), a certificate that is not a node's, or an answer that does not decode.
_UNREACHABLE: Final = (OSError, trio.TooSlowError, trio.BrokenResourceError, ProtocolError)


class AdminFailed(Exception):
    """The request could not be completed on any node."""


def add_admin_parser(commands: Any) -> None:
    admin = commands.add_parser("admin", help="administer a running cluster (admin certificate)")
    admin.add_argument("--config", type=Path, required=True, metavar="FILE")
    admin.add_argument("--json", action="store_true", help="machine-readable output")
    sub = admin.add_subparsers(dest="admin_area", required=True, metavar="AREA")

    cluster = sub.add_parser("cluster", help="cluster membership and status")
    csub = cluster.add_subparsers(dest="admin_op", required=True, metavar="OP")
    csub.add_parser("status", help="every node's /status")
    for op, text in (
        ("add-node", "add a voter"),
        ("add-learner", "add a non-voting learner"),
        ("promote", "promote a learner to voter"),
        ("remove-node", "remove a node (the leader included)"),
        ("transfer-leader", "hand leadership to a caught-up voter"),
    ):
        csub.add_parser(op, help=text).add_argument("node", metavar="ID")

    group = sub.add_parser("group", help="groups and policies")
    gsub = group.add_subparsers(dest="admin_op", required=True, metavar="OP")
    gsub.add_parser("list")
    gsub.add_parser("show").add_argument("group")
    for op in ("create", "update"):
        gsub.add_parser(op).add_argument("--policy", type=Path, required=True, metavar="FILE")
    gsub.add_parser("delete").add_argument("group")

    member = sub.add_parser("member", help="members of a group")
    msub = member.add_subparsers(dest="admin_op", required=True, metavar="OP")
    msub.add_parser("list").add_argument("group")
    evict = msub.add_parser("evict", help="remove a member and rekey (it stays banned)")
    evict.add_argument("group")
    evict.add_argument("member")

    rekey = sub.add_parser("rekey", help="force a rekey now")
    rekey.add_argument("group")
    rekey.add_argument("--kek", action="store_true", help="also refresh the KEK")
    rekey.add_argument("--no-tek", action="store_true", help="keep the TEK")

    snapshot = sub.add_parser("snapshot", help="backup and restore of all groups")
    ssub = snapshot.add_subparsers(dest="admin_op", required=True, metavar="OP")
    for op in ("save", "restore"):
        p = ssub.add_parser(op)
        p.add_argument("file", type=Path)
        p.add_argument("--key-file", type=Path, required=True, metavar="K")


def run_admin(
    args: argparse.Namespace, context: ssl.SSLContext, targets: Sequence[Target], timeout_s: float
) -> int:
    try:
        return trio.run(_run, args, context, tuple(targets), timeout_s)
    except (AdminFailed, OSError, PolicyError, ValueError) as exc:
        print(f"gcks admin: {exc}", file=sys.stderr)
        return 1


async def _run(
    args: argparse.Namespace, context: ssl.SSLContext, targets: tuple[Target, ...], timeout_s: float
) -> int:
    area, op = args.admin_area, getattr(args, "admin_op", None)
    if area == "cluster" and op == "status":
        rows = []
        for target in targets:
            try:
                rows.append(await _call_one(target, context, "status", {}, timeout_s))
            except (AdminError, *_UNREACHABLE) as exc:
                rows.append({"id": target.node_id, "role": "unreachable", "error": _why(exc)})
        _print(args, rows, ("id", "role", "term", "leader", "commit_index", "applied_index"))
        return 0
    request: tuple[str, dict[str, object]]
    if area == "cluster":
        request = (f"cluster.{op}", {"node": args.node})
    elif area == "group":
        if op in ("create", "update"):
            policy = GroupPolicy.from_toml(args.policy.read_text())
            request = (f"group.{op}", {"policy": policy.to_mapping()})
        elif op == "list":
            request = ("group.list", {})
        else:
            request = (f"group.{op}", {"group": args.group})
    elif area == "member":
        margs: dict[str, object] = {"group": args.group}
        if op == "evict":
            margs["member"] = args.member
        request = (f"member.{op}", margs)
    elif area == "rekey":
        request = ("rekey", {"group": args.group, "tek": not args.no_tek, "kek": args.kek})
    elif op == "save":
        key = _backup_key(args.key_file)
        result = await _call(targets, context, "snapshot.save", {}, timeout_s)
        assert isinstance(result, dict)
        _write_backup(args.file, key, result["snapshot"])
        _print(args, {"saved": str(args.file), "applied_index": result["applied_index"]}, ())
        return 0
    else:
        snapshot = _read_backup(args.file, _backup_key(args.key_file))
        request = ("snapshot.restore", {"snapshot": snapshot})
    result = await _call(targets, context, request[0], request[1], timeout_s)
    columns = {
        "group.list": ("group", "members", "msg_id", "kek"),
        "member.list": ("member", "role", "sender_id", "joined_ms"),
    }.get(request[0], ())
    _print(args, result, columns)
    return 0


async def _call_one(
    target: Target, context: ssl.SSLContext, op: str, args: dict[str, object], timeout_s: float
) -> Any:
    client = await AdminClient.connect(target.address.host, target.address.port, context, timeout_s)
    try:
        return await client.call(op, args, timeout_s=timeout_s)
    finally:
        await client.aclose()


async def _call(
    targets: tuple[Target, ...],
    context: ssl.SSLContext,
    op: str,
    args: dict[str, object],
    timeout_s: float,
) -> Any:
    """Try each node; follow a NOT_LEADER hint once per node."""
    by_id = {t.node_id: t for t in targets}
    queue = list(targets)
    tried: set[str] = set()
    errors: list[str] = []
    while queue:
        target = queue.pop(0)
        if target.node_id in tried:
            continue
        tried.add(target.node_id)
        try:
            return await _call_one(target, context, op, args, timeout_s)
        except AdminError as exc:
            if exc.code == "not_leader" and exc.leader in by_id:
                queue.insert(0, by_id[exc.leader])
                continue
            if exc.code in ("not_leader", "no_quorum"):
                errors.append(f"{target.node_id}: {exc}")
                continue
            raise AdminFailed(f"{exc.code}: {exc}") from None
        except _UNREACHABLE as exc:
            errors.append(f"{target.node_id}: {_why(exc)}")
    raise AdminFailed("no node completed the request: " + "; ".join(errors))


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _print(args: argparse.Namespace, result: Any, columns: Sequence[str]) -> None:
    if args.json or not columns or not isinstance(result, list):
        print(json.dumps(result, sort_keys=True, default=str, indent=None if args.json else 2))
        return
    rows = [[str(row.get(c, "")) for c in columns] for row in result]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


def _backup_key(path: Path) -> bytes:
    text = path.read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"{path}: expected 64 hex digits") from None
    if len(key) != 32:
        raise ValueError(f"{path}: expected 64 hex digits")
    return key


def _write_backup(path: Path, key: bytes, snapshot: bytes) -> None:
    nonce = os.urandom(12)
    sealed = BACKUP_MAGIC + nonce + AESGCM(key).encrypt(nonce, snapshot, BACKUP_MAGIC)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(sealed)


def _read_backup(path: Path, key: bytes) -> bytes:
    data = path.read_bytes()
    if not data.startswith(BACKUP_MAGIC) or len(data) < len(BACKUP_MAGIC) + 28:
        raise ValueError(f"{path} is not a gcks backup")
    nonce = data[len(BACKUP_MAGIC) : len(BACKUP_MAGIC) + 12]
    try:
        return AESGCM(key).decrypt(nonce, data[len(BACKUP_MAGIC) + 12 :], BACKUP_MAGIC)
    except InvalidTag as exc:
        raise ValueError(f"{path}: wrong backup key or damaged file") from exc
