"""The `gcks` command line: make certificates, lay out a dev cluster, check and run a node.

    gcks pki init DIR [--nodes n1,n2] [--members m1] [--admins admin] [--dns NAME] [--ip ADDR]
    gcks dev init DIR --nodes N --members M [--base-port P] [--group demo] [--force]
    gcks node --config FILE [--check-config]
    gcks admin --config FILE [--json] AREA OP ...   (see gcks.cluster.admincli)
    gcks demo
    gcks --version

Exit status: 0 success; 1 the command failed (a file exists, a certificate
cannot be made, the node runtime is missing); 2 bad usage or a bad
configuration, reported on one stderr line that names the key, before
anything binds a port.

This module also defines the admin tool's configuration file (`AdminConfig`,
`load_admin_config`), which `gcks dev init` writes as `DIR/admin.toml` and
`gcks admin --config FILE` reads:

    timeout_ms = 5000                      # deadline of one admin request (100..600000)
    [tls]                                  # paths relative to the file
    cluster_ca = "pki/ca/cluster.crt"      # the cluster CA (verifies the nodes)
    cert = "pki/admin/admin.crt"           # an admin-role certificate ...
    key = "pki/admin/admin.key"            # ... and its key
    [[nodes]]                              # one or more: where to reach admin listeners
    id = "n1"
    admin = "127.0.0.1:7801"

May import every `gcks.cluster` module it dispatches to and `gcks.proto`;
holds no logic of its own beyond argument parsing, exit codes and the admin
configuration schema; never binds a port for a configuration it has not validated.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Final

import trio

from gcks.cluster import tls
from gcks.cluster.admincli import Target, add_admin_parser, run_admin
from gcks.cluster.config import Address, ConfigError, load_config
from gcks.cluster.devinit import DEFAULT_BASE_PORT, DEFAULT_GROUP, DevInitError, dev_init
from gcks.cluster.node import Node
from gcks.cluster.pki import DEFAULT_NODE_DNS, DEFAULT_NODE_IPS, PkiError, pki_init
from gcks.cluster.raft.storage_errors import StorageError
from gcks.cluster.state import UpgradeRequired
from gcks.proto.identity import Role, is_valid_id
from gcks.proto.tomldoc import TomlDocError, parse_toml_bytes

__all__ = ["AdminConfig", "AdminNode", "load_admin_config", "main"]

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
MAX_ADMIN_CONFIG_BYTES: Final = 256 * 1024
_ADMIN_KEYS: Final = frozenset({"timeout_ms", "tls", "nodes"})
_ADMIN_TLS_KEYS: Final = ("cluster_ca", "cert", "key")
_ADMIN_NODE_KEYS: Final = ("id", "admin")
_DNS_LABEL_RE: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


# -- the admin tool's configuration --------------------------------------------------


@dataclass(frozen=True, slots=True)
class AdminNode:
    """A node's admin listener."""

    id: str
    admin: Address


@dataclass(frozen=True)
class AdminConfig:
    """A validated `gcks admin` configuration."""

    cluster_ca: Path
    cert: Path
    key: Path
    nodes: tuple[AdminNode, ...]
    timeout_ms: int = 5000


def load_admin_config(path: Path) -> AdminConfig:
    """Read and validate an admin configuration; raises `ConfigError` naming the
    key. The TLS files must load and the certificate must carry the admin role."""
    try:
        with path.open("rb") as config_file:
            data = config_file.read(MAX_ADMIN_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError("<file>", f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        document = parse_toml_bytes(data, name=str(path), max_bytes=MAX_ADMIN_CONFIG_BYTES)
    except TomlDocError as exc:
        raise ConfigError(exc.key, exc.message) from None
    for key in document:
        if key not in _ADMIN_KEYS:
            raise ConfigError(key, "unknown key")
    timeout_ms = document.get("timeout_ms", 5000)
    if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int):
        raise ConfigError("timeout_ms", "expected an integer")
    if not 100 <= timeout_ms <= 600_000:
        raise ConfigError("timeout_ms", f"must be in 100..600000, got {timeout_ms}")
    paths = _admin_tls(document.get("tls"), path.parent)
    nodes = _admin_nodes(document.get("nodes"))
    try:
        tls.admin_client_context(cluster_ca=paths[0], cert=paths[1], key=paths[2])
        identity = tls.certificate_identity(paths[1])
    except tls.TlsSetupError as exc:
        raise ConfigError(f"tls.{exc.what}", exc.message) from None
    if identity.role is not Role.ADMIN:
        raise ConfigError("tls.cert", f"{paths[1]} is the certificate of {identity}, not an admin")
    return AdminConfig(paths[0], paths[1], paths[2], nodes, timeout_ms)


def _admin_tls(table: object, base_dir: Path) -> tuple[Path, Path, Path]:
    if not isinstance(table, dict):
        raise ConfigError("tls", "required: a [tls] table with cluster_ca, cert and key")
    for key in table:
        if key not in _ADMIN_TLS_KEYS:
            raise ConfigError(f"tls.{key}", "unknown key")
    paths: list[Path] = []
    for key in _ADMIN_TLS_KEYS:
        value = table.get(key)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"tls.{key}", "required: a path")
        paths.append(base_dir / value)  # an absolute value replaces base_dir
    return paths[0], paths[1], paths[2]


def _admin_nodes(items: object) -> tuple[AdminNode, ...]:
    if not isinstance(items, list) or not items:
        raise ConfigError("nodes", "required: one or more [[nodes]] tables (id, admin)")
    nodes: list[AdminNode] = []
    for index, table in enumerate(items):
        prefix = f"nodes[{index}]"
        if not isinstance(table, dict):
            raise ConfigError(prefix, "expected a table")
        for key in table:
            if key not in _ADMIN_NODE_KEYS:
                raise ConfigError(f"{prefix}.{key}", "unknown key")
        node_id, admin = table.get("id"), table.get("admin")
        if not isinstance(node_id, str) or not is_valid_id(node_id):
            raise ConfigError(f"{prefix}.id", "required: a node id ([A-Za-z0-9._-], 1..64)")
        if any(node.id == node_id for node in nodes):
            raise ConfigError(f"{prefix}.id", f"duplicate node id {node_id!r}")
        if not isinstance(admin, str):
            raise ConfigError(f"{prefix}.admin", "required: HOST:PORT")
        try:
            nodes.append(AdminNode(node_id, Address.parse(admin)))
        except ValueError as exc:
            raise ConfigError(f"{prefix}.admin", str(exc)) from None
    return tuple(nodes)


# -- command line --------------------------------------------------------------------


def _id_list(text: str) -> list[str]:
    """`n1,n2` -> ["n1", "n2"] (argparse type: an error here is exit status 2)."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    for item in items:
        if not is_valid_id(item):
            raise argparse.ArgumentTypeError(f"invalid id {item[:80]!r}: use [A-Za-z0-9._-]")
    return items


def _dns_list(text: str) -> list[str]:
    """`a.example,b.example` -> names, each a valid DNS name (else exit status 2)."""
    names = [item.strip() for item in text.split(",") if item.strip()]
    for name in names:
        if len(name) > 253 or not all(_DNS_LABEL_RE.fullmatch(label) for label in name.split(".")):
            raise argparse.ArgumentTypeError(f"invalid DNS name {name[:80]!r}")
    return names


def _ip_list(text: str) -> list[str]:
    """`10.0.0.1,::1` -> addresses, each a valid IP address (else exit status 2)."""
    addresses = [item.strip() for item in text.split(",") if item.strip()]
    for address in addresses:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid IP address {address[:80]!r}") from None
    return addresses


def _version() -> str:
    try:
        return metadata.version("gcks")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gcks", description="A peer-to-peer cluster of Group Controller/Key Servers."
    )
    parser.add_argument("--version", action="version", version=f"gcks {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pki = commands.add_parser("pki", help="certificate authorities and certificates")
    pki_commands = pki.add_subparsers(dest="pki_command", required=True, metavar="SUBCOMMAND")
    pki_init_parser = pki_commands.add_parser(
        "init",
        help="make the cluster and member CAs (or reuse them) and certificates",
        description="Make DIR/ca/{cluster,member}.{crt,key} (reused if present) and one "
        "certificate per id under DIR/node, DIR/member, DIR/admin. Never overwrites.",
    )
    pki_init_parser.add_argument("directory", type=Path, metavar="DIR")
    for option, what in (("--nodes", "node"), ("--members", "member"), ("--admins", "admin")):
        pki_init_parser.add_argument(
            option,
            type=_id_list,
            action="extend",
            default=[],
            metavar="ID,ID",
            help=f"{what} ids (comma-separated, repeatable)",
        )
    pki_init_parser.add_argument(
        "--dns",
        type=_dns_list,
        action="extend",
        metavar="NAME,NAME",
        help=f"DNS SANs of node certificates (default: {','.join(DEFAULT_NODE_DNS)})",
    )
    pki_init_parser.add_argument(
        "--ip",
        type=_ip_list,
        action="extend",
        metavar="ADDR,ADDR",
        help=f"IP SANs of node certificates (default: {','.join(DEFAULT_NODE_IPS)})",
    )

    dev = commands.add_parser("dev", help="local development cluster")
    dev_commands = dev.add_subparsers(dest="dev_command", required=True, metavar="SUBCOMMAND")
    dev_init_parser = dev_commands.add_parser(
        "init",
        help="write certificates and configurations of a loopback cluster",
        description="Write DIR/n1.toml.. (nodes), DIR/m1.toml.. (members), DIR/admin.toml, "
        "DIR/pki and DIR/secrets for a cluster on 127.0.0.1 with the group ready to join.",
    )
    dev_init_parser.add_argument("directory", type=Path, metavar="DIR")
    dev_init_parser.add_argument("--nodes", type=int, required=True, metavar="N")
    dev_init_parser.add_argument("--members", type=int, required=True, metavar="M")
    dev_init_parser.add_argument(
        "--base-port",
        type=int,
        default=DEFAULT_BASE_PORT,
        metavar="P",
        help=f"node I listens on P+I, P+100+I, ... P+400+I (default {DEFAULT_BASE_PORT})",
    )
    dev_init_parser.add_argument("--group", default=DEFAULT_GROUP, help="group id (default demo)")
    dev_init_parser.add_argument(
        "--force", action="store_true", help="replace an existing dev cluster in DIR"
    )

    add_admin_parser(commands)
    commands.add_parser(
        "demo",
        help="run a 3-node cluster and members on loopback and narrate it (< 1 minute)",
    )

    node = commands.add_parser("node", help="run one GCKS node")
    node.add_argument("--config", type=Path, required=True, metavar="FILE")
    node.add_argument(
        "--check-config", action="store_true", help="validate the configuration and exit"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `gcks` with `argv` (default: the process arguments); returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "pki":
        return _pki_init(args)
    if args.command == "dev":
        return _dev_init(args)
    if args.command == "admin":
        return _admin(args)
    if args.command == "demo":
        from gcks.cluster.demo import run_demo  # noqa: PLC0415 - only the demo needs it

        return run_demo()
    return _node(args)


def _admin(args: argparse.Namespace) -> int:
    try:
        config = load_admin_config(args.config)
    except ConfigError as exc:
        print(f"gcks admin: configuration error: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    context = tls.admin_client_context(
        cluster_ca=config.cluster_ca, cert=config.cert, key=config.key
    )
    targets = [Target(node.id, node.admin) for node in config.nodes]
    return run_admin(args, context, targets, config.timeout_ms / 1000)


def _pki_init(args: argparse.Namespace) -> int:
    try:
        layout = pki_init(
            args.directory,
            nodes=args.nodes,
            members=args.members,
            admins=args.admins,
            dns=args.dns if args.dns is not None else DEFAULT_NODE_DNS,
            ips=args.ip if args.ip is not None else DEFAULT_NODE_IPS,
        )
    except (PkiError, OSError) as exc:
        print(f"gcks pki init: {exc}", file=sys.stderr)
        return EXIT_FAILED
    issued = len(layout.nodes) + len(layout.members) + len(layout.admins)
    print(f"PKI in {layout.directory}: 2 CAs, {issued} certificates issued")
    return EXIT_OK


def _dev_init(args: argparse.Namespace) -> int:
    try:
        layout = dev_init(
            args.directory,
            nodes=args.nodes,
            members=args.members,
            base_port=args.base_port,
            group=args.group,
            force=args.force,
        )
    except (DevInitError, PkiError, OSError) as exc:
        print(f"gcks dev init: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(
        f"dev cluster in {layout.directory}: {len(layout.node_configs)} nodes, "
        f"{len(layout.member_configs)} members, group {args.group!r}\n"
        f"  start each node:  gcks node --config {layout.node_configs[0]}  (and the others)\n"
        f"  administer:       gcks admin --config {layout.admin_config} cluster status"
    )
    return EXIT_OK


GC_YOUNG_THRESHOLD: Final = 20_000


def tune_gc() -> None:
    """Collect the young generation every 20,000 net allocations, not 700.

    A registration allocates hundreds of short-lived containers (trio tasks,
    cancel scopes, TLS objects, messages). At CPython's default the collector
    ran about 180 times per 1,000 registrations and took about 6 % of a
    node's CPU; at 20,000 it runs about 3 times, a few ms each. The older
    generations keep their default ratios."""
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def _node(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        # One line, whatever the message holds (a TOML error may quote the file).
        print(f"gcks node: configuration error: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    if args.check_config:
        print(
            f"configuration OK: node {config.node_id}, {len(config.other_peers)} peers, "
            f"{len(config.groups)} groups"
        )
        return EXIT_OK
    logging.basicConfig(
        level=config.logging_level,
        format=f"%(asctime)s {config.node_id} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    tune_gc()
    failure: BaseException | None = None
    try:
        trio.run(Node(config).run)
    except* KeyboardInterrupt:
        pass  # Ctrl-C before the signal handler was installed
    except* (StorageError, OSError, UpgradeRequired) as group:
        # Cannot bind, cannot read the data directory, wrong storage key, a
        # log entry from a newer version: say what, in one line; anything
        # else is a bug and keeps its traceback.
        failure = _leaves(group)[0]
    if failure is not None:
        print(f"gcks node: {_one_line(str(failure) or type(failure).__name__)}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def _one_line(text: str) -> str:
    return " ".join(text.split())
