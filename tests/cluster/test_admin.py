"""The admin API refuses bad arguments with a typed error and changes nothing.

One real node on loopback (its own majority), called over mTLS as the
`gcks admin` tool would.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import trio

import gcks.cluster.admin as admin_module
from gcks.cluster import admincli
from gcks.cluster.admin import AdminError, AdminRequest
from gcks.cluster.admincli import Target
from gcks.cluster.commands import COMMAND_VERSION
from gcks.cluster.config import Address
from tests.cluster.clusterkit import admin_call, admin_context, make_kit
from tests.cluster.test_node_inprocess import start_cluster


@pytest.mark.parametrize("op", ["cluster.add-node", "cluster.add-learner", "cluster.promote"])
async def test_membership_change_naming_an_impossible_node_id_is_refused(
    tmp_path: Path, op: str
) -> None:
    # A voter that can never hold a node certificate (ids are 1..64 of
    # [A-Za-z0-9._-]) would take away the majority for good: refuse it.
    kit = make_kit(tmp_path, nodes=1, members=1)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await start_cluster(kit, nursery)
            for bad in ("", "bad/id", "n 2"):
                with pytest.raises(AdminError) as caught:
                    await admin_call(kit, "n1", op, {"node": bad})
                assert caught.value.code == "bad_request"
            status = await admin_call(kit, "n1", "status")
            assert status["voters"] == ["n1"]
            assert status["learners"] == []
            assert (await admin_call(kit, "n1", "rekey", {"group": "demo"}))["msg_ids"]
            nursery.cancel_scope.cancel()


async def test_cluster_status_shows_a_node_that_drops_the_handshake_as_unreachable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kit = make_kit(tmp_path, nodes=1, members=1)

    async def hang_up(stream: trio.SocketStream) -> None:
        await stream.aclose()  # a node going down mid-handshake, or no node at all

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, hang_up, 0)
            port = listeners[0].socket.getsockname()[1]
            args = argparse.Namespace(admin_area="cluster", admin_op="status", json=True)
            targets = (Target("n1", Address("127.0.0.1", port)),)
            assert await admincli._run(args, admin_context(kit), targets, 5.0) == 0
            nursery.cancel_scope.cancel()
    [row] = json.loads(capsys.readouterr().out)
    assert (row["id"], row["role"]) == ("n1", "unreachable")


def test_admin_request_repr_never_shows_a_snapshot_being_restored() -> None:
    secret = bytes(range(32)) * 4  # stands for the keys inside a saved snapshot
    request = AdminRequest(1, "snapshot.restore", {"snapshot": secret})
    assert secret.hex()[:16] not in repr(request)
    assert repr(secret)[2:18] not in repr(request)
    assert AdminRequest.decode(request.encode()) == request


async def test_an_answer_past_the_frame_limit_is_a_typed_error_and_the_listener_lives_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A snapshot of a very large state could pass the 1 GiB frame limit; here
    # the limit is made small enough for a status answer to pass it.
    kit = make_kit(tmp_path, nodes=1, members=1)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await start_cluster(kit, nursery)
            full = await admin_call(kit, "n1", "status")
            with monkeypatch.context() as patch:
                patch.setattr(admin_module, "MAX_ADMIN_FRAME", 150)
                with pytest.raises(AdminError) as caught:
                    await admin_call(kit, "n1", "status")
            assert caught.value.code == "too_large"
            assert await admin_call(kit, "n1", "status") == full
            nursery.cancel_scope.cancel()


async def test_a_backup_that_older_nodes_cannot_read_is_refused_until_all_are_upgraded(
    tmp_path: Path,
) -> None:
    # Nodes of the previous version stop at a restore entry they cannot read.
    kit = make_kit(tmp_path, nodes=1, members=1)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nodes = await start_cluster(kit, nursery)
            rekeyer = nodes["n1"].rekeyer
            assert rekeyer is not None
            backup = (await admin_call(kit, "n1", "snapshot.save"))["snapshot"]
            for older in range(1, COMMAND_VERSION):  # a node of an older version is in
                rekeyer.command_version = lambda older=older: older  # type: ignore[misc]
                for snapshot, why in (
                    (backup, f"command version {COMMAND_VERSION};"),
                    (b"junk", "not a group state"),
                ):
                    with pytest.raises(AdminError, match=why) as caught:
                        await admin_call(kit, "n1", "snapshot.restore", {"snapshot": snapshot})
                    assert caught.value.code == "rejected"
            rekeyer.command_version = lambda: COMMAND_VERSION  # every node upgraded
            await admin_call(kit, "n1", "snapshot.restore", {"snapshot": backup})
            nursery.cancel_scope.cancel()
