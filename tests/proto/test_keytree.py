"""Specification of the LKH key tree: costs (RFC 9838's appendix), forward and
backward secrecy under random join/leave batches, determinism across GCKS
nodes, snapshots, and the member side's handling of updates."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterable

import msgpack  # type: ignore[import-untyped]
import pytest
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap_with_padding,
    aes_key_wrap_with_padding,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from gcks.proto.errors import DecodeError, DecryptError, KeyTreeError, ProtocolError
from gcks.proto.keytree import ROOT, KeyTree, MemberKeys
from gcks.proto.sa import PathKey, WrappedKey


def seed(label: object) -> bytes:
    return hashlib.sha256(repr(label).encode()).digest()


def names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def copy_of(tree: KeyTree) -> KeyTree:
    return KeyTree.from_state(tree.to_state())


def all_node_keys(tree: KeyTree) -> dict[tuple[int, int], bytes]:
    """(node, version) -> key for every live node (each lies on some member's path)."""
    keys = {(ROOT, tree.group_key.version): tree.group_key.key}
    for member in tree.members:
        for pk in tree.path_keys(member):
            keys[(pk.node, pk.version)] = pk.key
    return keys


def closure(known: Iterable[bytes], wraps: list[tuple[bytes, bytes]]) -> set[bytes]:
    """Every key an attacker holding `known` can reach by unwrapping (wrapping key, new key)."""
    by_wrapping: dict[bytes, list[bytes]] = {}
    for under, new in wraps:
        by_wrapping.setdefault(under, []).append(new)
    reached = set(known)
    todo = list(reached)
    while todo:
        for new in by_wrapping.get(todo.pop(), ()):
            if new not in reached:
                reached.add(new)
                todo.append(new)
    return reached


# ------------------------------------------------------------------ costs


def test_rfc9838_lkh_example_eight_members_one_leave_costs_five_wrapped_keys() -> None:
    tree = KeyTree.build(names("m", 8), seed(0))
    holders = {m: MemberKeys(tree.path_keys(m)) for m in tree.members}
    gone_path = tree.path_keys("m5")
    sibling_leaf = next(pk.node for pk in tree.path_keys("m4") if pk.node != gone_path[0].node)

    update = tree.update(joins=[], leaves=["m5"], seed=seed(1))

    assert len(update.wrapped) == 5
    # The removed leaf's parent is re-keyed under the sibling leaf alone; each
    # higher node under both of its children.
    per_node: dict[int, list[WrappedKey]] = {}
    for w in update.wrapped:
        per_node.setdefault(w.node, []).append(w)
    assert sorted(per_node) == sorted(pk.node for pk in gone_path[1:])
    assert [w.under for w in per_node[gone_path[1].node]] == [sibling_leaf]
    assert all(len(per_node[pk.node]) == 2 for pk in gone_path[2:])
    for member, holder in holders.items():
        if member == "m5":
            assert not holder.apply(update.wrapped)
            assert holder.group_key != tree.group_key
        else:
            assert holder.apply(update.wrapped)
            assert holder.group_key == tree.group_key


def test_removed_member_cannot_unwrap_any_key_of_its_leave_update() -> None:
    tree = KeyTree.build(names("m", 8), seed(0))
    held = [pk.key for pk in tree.path_keys("m2")]
    update = tree.update(joins=[], leaves=["m2"], seed=seed(1))
    for w in update.wrapped:
        for key in held:
            with pytest.raises(InvalidUnwrap):
                aes_key_unwrap_with_padding(key, w.wrapped)


@pytest.mark.parametrize("n", [16, 64, 1024])
def test_single_leave_from_full_tree_costs_two_log2_n_minus_one(n: int) -> None:
    tree = KeyTree.build(names("m", n), seed(n))
    update = tree.update(joins=[], leaves=[f"m{n // 3}"], seed=seed("leave"))
    assert len(update.wrapped) == 2 * int(math.log2(n)) - 1


@pytest.mark.parametrize("n", [8, 64])
def test_join_into_full_tree_costs_two_log2_n_plus_one_and_nothing_under_the_joiner(
    n: int,
) -> None:
    tree = KeyTree.build(names("m", n), seed(n))
    update = tree.update(joins=["new"], leaves=[], seed=seed("join"))
    # The split leaf's new parent goes under the old leaf only; every node
    # above it under both children; the joiner gets its keys by unicast.
    assert len(update.wrapped) == 2 * int(math.log2(n)) + 1
    assert tree.leaf_of("new") not in {w.under for w in update.wrapped}


def test_node_ids_freed_by_leaves_are_reused_by_later_joins() -> None:
    tree = KeyTree.build(names("m", 16), seed(0))
    nodes = len(column_of(tree.to_state()["version"]))
    for i in range(20):
        tree.update(joins=[f"j{i}"], leaves=[sorted(tree.members)[i % 7]], seed=seed(i))
        # An id freed in an update is reused from the next one on.
        assert len(column_of(tree.to_state()["version"])) <= nodes + 1


def test_join_after_leave_fills_the_vacated_slot_without_growing_the_tree() -> None:
    tree = KeyTree.build(names("m", 16), seed(0))
    vacated_parent = tree.path_keys("m9")[1].node
    tree.update(joins=[], leaves=["m9"], seed=seed(1))
    tree.update(joins=["new"], leaves=[], seed=seed(2))
    assert tree.height() == 4
    assert tree.path_keys("new")[1].node == vacated_parent


def test_joins_one_at_a_time_from_empty_keep_the_tree_balanced() -> None:
    tree = KeyTree.build([], seed(0))
    for i in range(1, 70):
        tree.update(joins=[f"m{i}"], leaves=[], seed=seed(i))
        assert tree.height() == max(1, math.ceil(math.log2(i)))


def test_build_is_balanced_with_leaf_depths_differing_by_at_most_one() -> None:
    for n in (1, 2, 3, 5, 8, 13, 100):
        tree = KeyTree.build(names("m", n), seed(n))
        depths = {len(tree.path_keys(m)) - 1 for m in tree.members}
        assert max(depths) - min(depths) <= 1
        assert max(depths) == max(1, math.ceil(math.log2(n)))


@settings(max_examples=40)
@given(
    n=st.integers(2, 40),
    data=st.data(),
)
def test_batch_costs_no_more_wrapped_keys_than_the_same_changes_one_by_one(
    n: int, data: st.DataObject
) -> None:
    base = KeyTree.build(names("m", n), seed(n))
    leaves = data.draw(st.lists(st.sampled_from(sorted(base.members)), unique=True, min_size=1))
    joins = names("j", data.draw(st.integers(0, 5)))

    batch = copy_of(base).update(joins=joins, leaves=leaves, seed=seed("batch"))

    singles = copy_of(base)
    one_by_one = sum(
        len(singles.update(joins=[], leaves=[m], seed=seed(("l", m))).wrapped) for m in leaves
    ) + sum(len(singles.update(joins=[m], leaves=[], seed=seed(("j", m))).wrapped) for m in joins)
    assert len(batch.wrapped) <= one_by_one


# -------------------------------------------------------- secrecy, at random


@settings(max_examples=60)
@given(data=st.data())
def test_random_batches_keep_members_in_step_and_outsiders_out(data: st.DataObject) -> None:
    """After every update: each current member, holding only its registration
    path keys and the multicast updates since, has the server's group key and
    path; no removed member (alone or with all others removed) reaches a group
    key from after its removal; no member reaches a group key from before it joined."""
    fresh = (f"n{i}" for i in range(10_000))
    tree = KeyTree.build([next(fresh) for _ in range(data.draw(st.integers(0, 12)))], seed(0))
    node_keys = all_node_keys(tree)
    group_keys = {tree.version: tree.group_key.key}
    wraps: list[tuple[bytes, bytes]] = []
    holders = {m: MemberKeys(tree.path_keys(m)) for m in tree.members}
    # Current memberships: keys got at registration, group key version joined at.
    stints: dict[str, tuple[set[bytes], int]] = {
        m: ({pk.key for pk in tree.path_keys(m)}, tree.version) for m in tree.members
    }
    # Ended memberships: registration keys, first and first-denied version, the member's keys.
    ended: list[tuple[set[bytes], int, int, MemberKeys]] = []

    for step in range(data.draw(st.integers(1, 6))):
        current = sorted(tree.members)
        leaves = data.draw(st.lists(st.sampled_from(current), unique=True)) if current else []
        joins = [next(fresh) for _ in range(data.draw(st.integers(0, 4)))]
        rejoin: bool = data.draw(st.booleans())
        if leaves and rejoin:
            joins.append(leaves[0])  # re-registration with fresh keys in the same batch

        update = tree.update(joins=joins, leaves=leaves, seed=seed(step + 1))

        assert update.version == tree.version == tree.group_key.version
        node_keys.update(all_node_keys(tree))
        group_keys[update.version] = tree.group_key.key
        for w in update.wrapped:
            under, new = node_keys[(w.under, w.under_version)], node_keys[(w.node, w.version)]
            assert aes_key_unwrap_with_padding(under, w.wrapped) == new
            wraps.append((under, new))
        for m in leaves:
            keys, start = stints.pop(m)
            ended.append((keys, start, update.version, holders.pop(m)))
        for m, holder in holders.items():
            assert holder.apply(update.wrapped)
            assert holder.path == tree.path_keys(m)
            assert holder.group_key == tree.group_key
        for m in joins:
            holders[m] = MemberKeys(tree.path_keys(m))
            stints[m] = ({pk.key for pk in tree.path_keys(m)}, update.version)
        for _, _, _, outsider in ended:
            assert not outsider.apply(update.wrapped)
            assert outsider.group_key.key != tree.group_key.key

        assert len(set(node_keys.values())) == len(node_keys)
        for keys, start in stints.values():
            reached = closure(keys, wraps)
            assert tree.group_key.key in reached
            assert not reached & {k for v, k in group_keys.items() if v < start}
        for keys, start, end, _ in ended:
            reached = closure(keys, wraps)
            assert not reached & {k for v, k in group_keys.items() if v < start or v >= end}
        if ended:
            coalition = closure(set().union(*(keys for keys, _, _, _ in ended)), wraps)
            last_end = max(end for _, _, end, _ in ended)
            assert not coalition & {k for v, k in group_keys.items() if v >= last_end}


@settings(max_examples=80)
@given(data=st.data())
def test_every_key_on_a_changed_path_is_replaced_and_join_scores_stay_exact(
    data: st.DataObject,
) -> None:
    """Each update replaces the key of every node on a joining member's path and
    of every node a leaving member held that stays in the tree, and with it
    every key above a replaced one; the join scores stay what a fresh
    computation from the tree's shape gives. (The climb that marks paths stops
    where an earlier climb of the same batch already went.)"""
    fresh = (f"n{i}" for i in range(10_000))
    tree = KeyTree.build([next(fresh) for _ in range(data.draw(st.integers(0, 40)))], seed(0))
    for step in range(data.draw(st.integers(1, 5))):
        current = sorted(tree.members)
        leaves = data.draw(st.lists(st.sampled_from(current), unique=True)) if current else []
        joins = [next(fresh) for _ in range(data.draw(st.integers(0, 12)))]
        held = {pk.node for m in leaves for pk in tree.path_keys(m)}
        update = tree.update(joins=joins, leaves=leaves, seed=seed(step + 1))
        for m in joins:
            assert all(pk.version == update.version for pk in tree.path_keys(m))
        for m in tree.members:
            path = tree.path_keys(m)
            replaced = [pk.version == update.version for pk in path]  # leaf first, root last
            assert replaced == sorted(replaced), f"{m}: a kept key above a replaced one"
            assert all(pk.version == update.version for pk in path if pk.node in held)
        assert tree._slot == KeyTree.from_state(tree.to_state())._slot


def test_member_path_follows_leaf_split_and_node_contraction() -> None:
    tree = KeyTree.build(names("m", 4), seed(0))
    holders = {m: MemberKeys(tree.path_keys(m)) for m in tree.members}
    steps = [
        ([], []),  # an empty batch refreshes the group key only
        (["j0", "j1", "j2", "j3"], []),  # every leaf split: paths grow
        ([], ["j0", "j1"]),  # a subtree emptied: its parent is contracted away
        ([], ["m0", "m1"]),
        ([], ["j2"]),
    ]
    for joins, leaves in steps:
        update = tree.update(joins=joins, leaves=leaves, seed=seed((joins, leaves)))
        for m in leaves:
            del holders[m]
        for m, holder in holders.items():
            holder.apply(update.wrapped)
            assert holder.path == tree.path_keys(m)
        for m in joins:
            holders[m] = MemberKeys(tree.path_keys(m))
    assert sorted(holders) == ["j3", "m2", "m3"]
    assert tree.height() == 2


def test_empty_batch_refreshes_only_the_group_key() -> None:
    tree = KeyTree.build(names("m", 8), seed(0))
    before = tree.path_keys("m1")
    update = tree.update(joins=[], leaves=[], seed=seed(1))
    assert {w.node for w in update.wrapped} == {ROOT}
    assert len(update.wrapped) == 2
    after = tree.path_keys("m1")
    assert after[:-1] == before[:-1]
    assert after[-1].version == before[-1].version + 1 != 0


def test_last_member_leaving_leaves_an_empty_tree_that_accepts_joins() -> None:
    tree = KeyTree.build(["a"], seed(0))
    update = tree.update(joins=[], leaves=["a"], seed=seed(1))
    assert update.wrapped == ()
    assert len(tree) == 0
    tree.update(joins=["b", "c"], leaves=[], seed=seed(2))
    assert MemberKeys(tree.path_keys("b")).group_key == tree.group_key


# ----------------------------------------------------------- determinism


@settings(max_examples=25)
@given(n=st.integers(0, 30), data=st.data())
def test_same_state_same_batch_same_seed_gives_identical_keys_on_every_node(
    n: int, data: st.DataObject
) -> None:
    leader = KeyTree.build(names("m", n), seed(n))
    follower = copy_of(leader)
    members = sorted(leader.members)
    leaves = data.draw(st.lists(st.sampled_from(members), unique=True)) if members else []
    joins = names("j", data.draw(st.integers(0, 5)))

    a = leader.update(joins=joins, leaves=leaves, seed=seed("s"))
    b = follower.update(joins=joins, leaves=leaves, seed=seed("s"))

    assert a == b
    assert leader.to_state() == follower.to_state()
    assert leader.group_key == follower.group_key
    other = copy_of(follower)
    other.update(joins=["x"], leaves=[], seed=seed("t"))
    follower.update(joins=["x"], leaves=[], seed=seed("u"))
    assert other.group_key.version == follower.group_key.version
    assert other.group_key.key != follower.group_key.key


def test_to_state_round_trips_and_is_plain_data() -> None:
    tree = KeyTree.build(names("m", 20), seed(0))
    tree.update(joins=["x", "y"], leaves=["m3", "m4", "m5"], seed=seed(1))
    state = tree.to_state()
    assert set(map(type, state.values())) <= {int, bytes, list}
    again = KeyTree.from_state(msgpack.unpackb(msgpack.packb(state)))
    assert again.to_state() == state
    assert again.members == tree.members
    assert all(again.path_keys(m) == tree.path_keys(m) for m in tree.members)
    assert len(again) == len(tree) == 19
    assert "x" in again
    assert "m3" not in again
    assert again.leaf_of("x") == tree.leaf_of("x")


@settings(max_examples=300)
@given(
    column=st.sampled_from(["left", "right", "version", "leaves", "keys"]),
    position=st.integers(0, 400),
    value=st.integers(-(2**63), 2**63 - 1) | st.integers(-2, 40),
    truncate=st.booleans(),
)
def test_from_state_accepts_a_valid_tree_or_raises_key_tree_error(
    column: str, position: int, value: int, truncate: bool
) -> None:
    tree = KeyTree.build(names("m", 6), seed(0))
    tree.update(joins=["x"], leaves=["m1", "m2"], seed=seed(1))
    state = tree.to_state()
    raw = state[column]
    assert isinstance(raw, bytes)
    data = bytearray(raw)
    if truncate:
        del data[position % (len(data) + 1) :]
    elif data:
        at = (position % len(data)) // 8 * 8
        data[at : at + 8] = value.to_bytes(8, "little", signed=True)
    state[column] = bytes(data)
    try:
        restored = KeyTree.from_state(state)
    except KeyTreeError:
        return
    # Accepted: it must work as a tree.
    restored.update(joins=["y"], leaves=sorted(restored.members)[:1], seed=seed(2))
    for m in restored.members:
        assert MemberKeys(restored.path_keys(m)).group_key == restored.group_key


def test_from_state_rejects_a_free_node_with_children() -> None:
    tree = KeyTree.build(names("m", 6), seed(0))
    tree.update(joins=[], leaves=["m1", "m2"], seed=seed(1))
    state = tree.to_state()
    versions = column_of(state["version"])
    free = versions.index(0)
    left = column_of(state["left"])
    left[free] = left[ROOT]
    state["left"] = b"".join(v.to_bytes(8, "little", signed=True) for v in left)
    with pytest.raises(KeyTreeError):
        KeyTree.from_state(state)


def column_of(data: object) -> list[int]:
    assert isinstance(data, bytes)
    return [int.from_bytes(data[i : i + 8], "little", signed=True) for i in range(0, len(data), 8)]


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s.pop("keys"),
        lambda s: s.update(format=2),
        lambda s: s.update(epoch=0),
        lambda s: s.update(epoch=True),
        lambda s: s.update(members="m0"),
        lambda s: s.update(members=[*s["members"][:-1], 7]),
        lambda s: s.update(members=[s["members"][0]] * len(s["members"])),
        lambda s: s.update(left=s["right"]),
        lambda s: s.update(keys=s["keys"][:-1]),
        lambda s: s.update(version=s["version"][:-8]),
    ],
)
def test_from_state_rejects_malformed_state_with_key_tree_error(change: object) -> None:
    state = KeyTree.build(names("m", 5), seed(0)).to_state()
    change(state)  # type: ignore[operator]
    with pytest.raises(KeyTreeError):
        KeyTree.from_state(state)
    with pytest.raises(KeyTreeError):
        KeyTree.from_state([1, 2, 3])


# --------------------------------------------------------------- misuse


def test_misuse_raises_key_tree_error_and_changes_nothing() -> None:
    tree = KeyTree.build(names("m", 4), seed(0))
    state = tree.to_state()
    bad = [
        {"joins": ["m1"], "leaves": [], "seed": seed(1)},
        {"joins": [], "leaves": ["nobody"], "seed": seed(1)},
        {"joins": ["x", "x"], "leaves": [], "seed": seed(1)},
        {"joins": ["x"], "leaves": ["m1", "m1"], "seed": seed(1)},
        {"joins": [""], "leaves": [], "seed": seed(1)},
        {"joins": "xy", "leaves": [], "seed": seed(1)},
        {"joins": ["x"], "leaves": [], "seed": seed(1)[:31]},
        {"joins": ["x"], "leaves": [], "seed": "0" * 32},
    ]
    for kwargs in bad:
        with pytest.raises(KeyTreeError):
            tree.update(**kwargs)  # type: ignore[arg-type]
        assert tree.to_state() == state
    with pytest.raises(KeyTreeError):
        tree.path_keys("nobody")
    with pytest.raises(KeyTreeError):
        tree.leaf_of("nobody")
    with pytest.raises(KeyTreeError):
        KeyTree.build(["a", "a"], seed(0))
    with pytest.raises(KeyTreeError):
        KeyTree.build(["a"], b"short")


def test_keys_never_appear_in_reprs() -> None:
    tree = KeyTree.build(names("m", 4), seed(0))
    holder = MemberKeys(tree.path_keys("m0"))
    update = tree.update(joins=[], leaves=["m1"], seed=seed(1))
    holder.apply(update.wrapped)
    secrets = [pk.key for pk in tree.path_keys("m0")]
    text = " ".join([repr(tree), repr(holder), repr(holder.path), repr(tree.group_key)])
    assert not any(k.hex() in text or repr(k) in text for k in secrets)
    assert tree.group_key.fingerprint in repr(tree)


# ----------------------------------------------------------- member side


def test_member_rejects_a_tampered_wrapped_key_with_decrypt_error_and_keeps_its_keys() -> None:
    tree = KeyTree.build(names("m", 8), seed(0))
    holder = MemberKeys(tree.path_keys("m0"))
    before = holder.path
    update = tree.update(joins=[], leaves=["m7"], seed=seed(1))
    mine = {pk.node for pk in before}
    target = next(i for i, w in enumerate(update.wrapped) if w.under in mine)
    wrapped = list(update.wrapped)
    w = wrapped[target]
    wrapped[target] = dataclasses.replace(w, wrapped=bytes([w.wrapped[0] ^ 1]) + w.wrapped[1:])
    with pytest.raises(DecryptError):
        holder.apply(wrapped)
    assert holder.path == before
    assert holder.apply(update.wrapped)


@settings(max_examples=200)
@given(garbage=st.binary(max_size=64))
def test_member_given_garbage_for_a_key_it_holds_raises_only_decrypt_error(
    garbage: bytes,
) -> None:
    tree = KeyTree.build(names("m", 4), seed(0))
    path = tree.path_keys("m0")
    holder = MemberKeys(path)
    forged = WrappedKey(path[1].node, path[1].version + 1, path[0].node, path[0].version, garbage)
    with pytest.raises(DecryptError):
        holder.apply([forged])
    assert holder.path == path


def test_member_ignores_a_replayed_update_and_keys_for_others() -> None:
    tree = KeyTree.build(names("m", 8), seed(0))
    holder = MemberKeys(tree.path_keys("m0"))
    first = tree.update(joins=[], leaves=["m7"], seed=seed(1))
    second = tree.update(joins=[], leaves=["m6"], seed=seed(2))
    assert holder.apply(first.wrapped)
    assert holder.apply(second.wrapped)
    assert not holder.apply(first.wrapped)
    assert not holder.apply(second.wrapped)
    assert not holder.apply([])
    assert holder.group_key == tree.group_key


def test_member_rejects_wrapped_keys_that_do_not_lead_to_the_root() -> None:
    tree = KeyTree.build(names("m", 4), seed(0))
    path = tree.path_keys("m0")
    holder = MemberKeys(path)
    leaf, parent = path[0], path[1]
    # A key for the parent, re-announced as a key of a new node (no route to the root).
    forged = WrappedKey(
        node=99,
        version=parent.version + 1,
        under=leaf.node,
        under_version=leaf.version,
        wrapped=aes_key_wrap_with_padding(leaf.key, bytes(32)),
    )
    with pytest.raises(DecodeError):
        holder.apply([forged])
    assert holder.path == path


@pytest.mark.parametrize(
    "path",
    [
        [],
        [PathKey(ROOT, 1, bytes(32))],
        [PathKey(3, 1, bytes(32)), PathKey(1, 1, bytes(32))],
        [PathKey(3, 1, bytes(31)), PathKey(ROOT, 1, bytes(32))],
        [PathKey(3, 0, bytes(32)), PathKey(ROOT, 1, bytes(32))],
        [PathKey(3, 1, bytes(32)), PathKey(3, 1, bytes(32)), PathKey(ROOT, 1, bytes(32))],
        ["not a path key", PathKey(ROOT, 1, bytes(32))],
    ],
)
def test_member_rejects_a_malformed_registration_path(path: list[PathKey]) -> None:
    with pytest.raises(ProtocolError):
        MemberKeys(path)
