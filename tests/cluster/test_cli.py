"""The `gcks` command line: exit statuses, one-line configuration errors naming
the key, and one real `gcks` process end to end."""

from __future__ import annotations

import gc
import ipaddress
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from gcks.cluster.cli import GC_YOUNG_THRESHOLD, load_admin_config, main, tune_gc
from gcks.cluster.config import ConfigError, load_config
from gcks.cluster.devinit import dev_init
from gcks.cluster.node import Node
from gcks.cluster.state import UpgradeRequired


@pytest.fixture(scope="module")
def dev_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("cli") / "dev"
    dev_init(directory, nodes=3, members=1, base_port=21000)
    return directory


@pytest.fixture(autouse=True)
def _no_gcks_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # The node loader reads GCKS_* variables; the developer's shell must not leak in.
    for name in list(os.environ):
        if name.startswith("GCKS_"):
            monkeypatch.delenv(name)


def _exit_status(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert isinstance(caught.value.code, int)
    return caught.value.code


def test_version_printed(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_status(["--version"]) == 0
    assert capsys.readouterr().out.startswith("gcks ")


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["dev", "init"],
        ["dev", "init", "DIR", "--nodes", "three", "--members", "1"],
        ["node"],
        ["pki", "init", "DIR", "--nodes", "n 1"],
        ["pki", "init", "DIR", "--dns", "bad_name!"],
        ["pki", "init", "DIR", "--ip", "300.1.1.1"],
    ],
)
def test_bad_arguments_exit_2_with_a_message(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert _exit_status(argv) == 2
    assert "gcks" in capsys.readouterr().err


def test_check_config_reports_node_peers_and_groups(
    dev_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["node", "--config", str(dev_dir / "n2.toml"), "--check-config"]) == 0
    assert capsys.readouterr().out == "configuration OK: node n2, 2 peers, 1 groups\n"


def test_bad_config_exits_2_with_one_line_naming_the_key(
    dev_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (dev_dir / "n1.toml").read_text().replace("tick_ms = 50", "tick_ms = 0")
    broken = dev_dir / "broken.toml"  # beside the original, so relative paths still resolve
    broken.write_text(text)
    try:
        assert main(["node", "--config", str(broken), "--check-config"]) == 2
    finally:
        broken.unlink()
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "raft.tick_ms" in err


def test_bad_environment_override_exits_2(
    dev_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GCKS_OPS_LISTEN", "nowhere")
    assert main(["node", "--config", str(dev_dir / "n1.toml"), "--check-config"]) == 2
    assert "ops_listen" in capsys.readouterr().err


def test_toml_syntax_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('node_id = "n1"\n[[[\n')
    assert main(["node", "--config", str(path), "--check-config"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "<toml>" in err


def test_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["node", "--config", str(tmp_path / "absent.toml")]) == 2
    assert "<file>" in capsys.readouterr().err


def test_node_that_cannot_bind_exits_1_with_one_line(
    dev_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = load_config(dev_dir / "n1.toml")
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind((config.peer_listen.host, config.peer_listen.port))
        busy.listen()
        assert main(["node", "--config", str(dev_dir / "n1.toml")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("gcks node: ")
    assert "address" in err[-1].lower()


def test_pki_init_issues_certificates_with_requested_sans(tmp_path: Path) -> None:
    argv = ["pki", "init", str(tmp_path), "--nodes", "n1,n2", "--members", "m1"]
    argv += ["--admins", "ops", "--dns", "gcks.example,node.example", "--ip", "10.0.0.7"]
    assert main(argv) == 0
    for relative in ("ca/cluster.crt", "ca/member.crt", "member/m1.crt", "admin/ops.crt"):
        assert (tmp_path / relative).is_file()
    certificate = x509.load_pem_x509_certificate((tmp_path / "node/n2.crt").read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["gcks.example", "node.example"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]


def test_pki_init_refuses_to_overwrite_a_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["pki", "init", str(tmp_path), "--nodes", "n1"]) == 0
    assert main(["pki", "init", str(tmp_path), "--nodes", "n1"]) == 1
    assert "exists" in capsys.readouterr().err


def test_dev_init_refuses_a_non_empty_directory(
    dev_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["dev", "init", str(dev_dir), "--nodes", "1", "--members", "1"]) == 1
    assert "--force" in capsys.readouterr().err


def test_admin_config_with_a_member_certificate_is_refused(dev_dir: Path) -> None:
    text = (dev_dir / "admin.toml").read_text().replace("pki/admin/admin", "pki/member/m1")
    path = dev_dir / "admin-as-member.toml"
    path.write_text(text)
    try:
        with pytest.raises(ConfigError) as caught:
            load_admin_config(path)
    finally:
        path.unlink()
    assert caught.value.key.startswith("tls.")


def test_admin_config_unknown_key_is_named(dev_dir: Path) -> None:
    path = dev_dir / "admin-typo.toml"
    path.write_text((dev_dir / "admin.toml").read_text() + '\n[[nodes]]\nid = "n9"\nadmn = "x"\n')
    try:
        with pytest.raises(ConfigError) as caught:
            load_admin_config(path)
    finally:
        path.unlink()
    assert caught.value.key == "nodes[3].admn"


def test_real_gcks_process_dev_init_then_check_config(tmp_path: Path) -> None:
    gcks = Path(sys.executable).parent / "gcks"
    assert gcks.is_file(), "install the package (pip install -e .) to get the gcks script"
    directory = tmp_path / "dev"
    init = subprocess.run(
        [str(gcks), "dev", "init", str(directory), "--nodes", "3", "--members", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert init.returncode == 0, init.stderr
    check = subprocess.run(
        [str(gcks), "node", "--check-config", "--config", str(directory / "n1.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert check.returncode == 0, check.stderr
    assert check.stdout == "configuration OK: node n1, 2 peers, 1 groups\n"


def test_admin_config_nested_too_deeply_is_a_config_error_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "deep.toml"
    path.write_text("timeout_ms = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError) as caught:
        load_admin_config(path)
    assert caught.value.key == "<toml>"
    assert main(["admin", "--config", str(path), "group", "list"]) == 2


def test_a_node_process_collects_young_objects_less_often_keeping_older_ratios() -> None:
    saved = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        tune_gc()
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, 10, 10)
    finally:
        gc.set_threshold(*saved)


def test_a_node_stopped_by_an_entry_from_a_newer_version_exits_1_with_one_line(
    dev_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stop = UpgradeRequired("log entry 7 was written by a newer gcks (command version 2)")

    async def stopped(self: Node) -> None:
        raise stop

    monkeypatch.setattr(Node, "run", stopped)
    assert main(["node", "--config", str(dev_dir / "n1.toml")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"gcks node: {stop}"
