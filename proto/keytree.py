"""The LKH key tree (logical key hierarchy; RFC 2627, RFC 9838's appendix): server and member side.

A binary tree whose leaves are members and whose root key is the group's KEK
key material. A member holds the keys on its path, leaf to root. On a batch of
joins and leaves, `KeyTree.update` refreshes every key on the affected paths
once and wraps each new key (AES key wrap with padding, RFC 5649) under the
keys of the node's children, so that exactly the members below each child
can unwrap it: a removed member learns nothing new (forward secrecy) and a
joining member, whose path keys are all fresh, cannot reach an earlier group
key (backward secrecy). `MemberKeys` is the member's half: it unwraps what it
can and follows its path as the tree changes shape.

Every GCKS node applies the same update to its own copy, so nothing here draws
randomness: fresh keys come from HKDF-SHA256 over a caller-supplied secret
seed (made once by the leader, carried in the replicated command), bound to
the node id and the key version. Same tree, same inputs: bitwise-identical
keys and wrapped keys. Node ids are stable for a node's lifetime; a member's
leaf id never changes while it stays in the group. Every key an update makes
carries the same version, the tree's epoch, so (node, version) names one key
forever even when a freed node id is reused by a later update.

May import the standard library, `cryptography`, `gcks.proto.errors` and
`gcks.proto.sa`. Must never read a clock, draw randomness, log, or put key
material into a repr or an error message (fingerprints at most).
"""

from __future__ import annotations

import heapq
import itertools
import sys
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap_with_padding,
    aes_key_wrap_with_padding,
)

from gcks.proto.errors import DecodeError, DecryptError, KeyTreeError
from gcks.proto.sa import PathKey, WrappedKey, fingerprint

ROOT = 0
"""Node id of the root, whose key is the group key. It never changes."""

KEY_LEN = 32
SEED_LEN = 32
STATE_FORMAT = 1

_NONE = -1
_KDF_LABEL = b"gcks lkh node key v1"
_KDF_BLOCK_LABEL = b"gcks lkh key block v1"
# HKDF-Expand yields at most 255 hash blocks: one block is one key.
_KEYS_PER_BLOCK = 255
_SHA256 = hashes.SHA256()
# Join placement score of a subtree, relative to its top: 2 * depth at which a
# new leaf would sit, +1 when it costs splitting a leaf (moving a member down)
# rather than filling an empty child slot. Lower is better, so joins fill
# vacated slots first and otherwise split the shallowest leaf.
_SLOT_OPEN = 2
_SLOT_SPLIT = 3


@dataclass(frozen=True, slots=True)
class TreeUpdate:
    """What one batch of joins and leaves produced.

    `version` is the version of every key the update made, the new group key
    included; `wrapped` are the keys to multicast, deepest first.
    """

    version: int
    wrapped: tuple[WrappedKey, ...]


def _check_seed(seed: object) -> bytes:
    if not isinstance(seed, bytes) or len(seed) != SEED_LEN:
        raise KeyTreeError(f"seed must be {SEED_LEN} bytes")
    return seed


def _check_member_ids(member_ids: object, what: str) -> list[str]:
    if isinstance(member_ids, str | bytes) or not isinstance(member_ids, Iterable):
        raise KeyTreeError(f"{what} must be a sequence of member ids")
    ids = list(member_ids)
    for member in ids:
        if not isinstance(member, str) or not member:
            raise KeyTreeError(f"{what}: a member id must be a non-empty string")
    if len(set(ids)) != len(ids):
        raise KeyTreeError(f"{what}: duplicate member id")
    return ids


class _KeySource:
    """HKDF-SHA256 (RFC 5869) of one update's secret seed into node keys."""

    __slots__ = ("_prk",)

    def __init__(self, seed: bytes) -> None:
        # HKDF-Extract once per update (an absent salt is HashLen zeros), then
        # HKDF-Expand with an info that binds the node id(s) and the version.
        extract = hmac.HMAC(bytes(32), hashes.SHA256())
        extract.update(seed)
        self._prk = extract.finalize()

    def key(self, node: int, version: int) -> bytes:
        """The key of `node` at `version`."""
        info = _KDF_LABEL + node.to_bytes(8, "big") + version.to_bytes(8, "big")
        return HKDFExpand(_SHA256, KEY_LEN, info).derive(self._prk)

    def keys(self, count: int, version: int) -> bytearray:
        """Keys of nodes 0 .. count - 1 at `version`, concatenated: a whole tree at once.

        One HKDF-Expand call yields the keys of `_KEYS_PER_BLOCK` consecutive
        nodes, several times faster than `key` per node for a large tree; its own
        label keeps these keys apart from every `key` output.
        """
        out = bytearray()
        for first in range(0, count, _KEYS_PER_BLOCK):
            info = _KDF_BLOCK_LABEL + first.to_bytes(8, "big") + version.to_bytes(8, "big")
            out += HKDFExpand(_SHA256, KEY_LEN * _KEYS_PER_BLOCK, info).derive(self._prk)
        del out[count * KEY_LEN :]
        return out

    def __repr__(self) -> str:
        return "_KeySource(<secret>)"


def _le_bytes(values: array[int]) -> bytes:
    # Snapshots move between machines: int64 columns are stored little-endian.
    if sys.byteorder == "little":
        return values.tobytes()
    swapped = array("q", values)
    swapped.byteswap()
    return swapped.tobytes()


def _le_array(data: object, what: str) -> array[int]:
    if not isinstance(data, bytes) or len(data) % 8:
        raise KeyTreeError(f"bad key tree state: {what} must be bytes of int64 values")
    values = array("q")
    values.frombytes(data)
    if sys.byteorder != "little":
        values.byteswap()
    return values


class KeyTree:
    """The GCKS's copy of one group's LKH tree (see the module docstring).

    Storage is columnar, indexed by node id (integer arrays and one bytearray of
    keys), so a tree of 2^20 members stays compact and builds in seconds.
    A free node id (version 0) is reused, smallest first, by a later update.
    """

    __slots__ = (
        "_epoch",
        "_free",
        "_keys",
        "_leaf_of",
        "_left",
        "_member_at",
        "_parent",
        "_right",
        "_slot",
        "_version",
    )

    _epoch: int
    _free: list[int]
    _keys: bytearray
    _leaf_of: dict[str, int]
    _left: array[int]
    _member_at: list[str | None]
    _parent: array[int]
    _right: array[int]
    _slot: array[int]
    _version: array[int]

    # ------------------------------------------------------------------ making

    @classmethod
    def build(cls, member_ids: Sequence[str], seed: bytes) -> KeyTree:
        """A balanced tree over `member_ids` (leaf depths differ by at most one), epoch 1.

        Leaves are assigned in the given order. An empty sequence gives a tree
        with only the root (a group key and no members).
        """
        seed = _check_seed(seed)
        ids = _check_member_ids(member_ids, "member_ids")
        n = len(ids)
        tree = cls.__new__(cls)
        tree._epoch = 1
        tree._free = []
        if n <= 1:
            # The root is never a leaf: a single member hangs below it.
            size = n + 1
            tree._left = array("q", [1 if n else _NONE, _NONE][:size])
            tree._right = array("q", [_NONE]) * size
            tree._parent = array("q", [_NONE, ROOT][:size])
            tree._slot = array("i", [_SLOT_OPEN, _SLOT_SPLIT][:size])
            tree._member_at = [None, *ids]
            tree._leaf_of = {ids[0]: 1} if ids else {}
        else:
            # Heap layout: node i has children 2i+1 and 2i+2; the n - 1
            # internal nodes come first, then the n leaves.
            inner = n - 1
            size = 2 * n - 1
            tree._left = array("q", range(1, 2 * inner, 2))
            tree._left.extend(array("q", [_NONE]) * n)
            tree._right = array("q", range(2, 2 * inner + 1, 2))
            tree._right.extend(array("q", [_NONE]) * n)
            parents = array("q", [0]) * (size - 1)
            parents[0::2] = parents[1::2] = array("q", range(inner))
            tree._parent = array("q", [_NONE])
            tree._parent.extend(parents)
            slot = array("i", [0]) * inner
            slot.extend(array("i", [_SLOT_SPLIT]) * n)
            for i in range(inner - 1, -1, -1):
                slot[i] = 2 + min(slot[2 * i + 1], slot[2 * i + 2])
            tree._slot = slot
            tree._member_at = [None] * inner
            tree._member_at.extend(ids)
            tree._leaf_of = dict(zip(ids, range(inner, size), strict=True))
        tree._version = array("q", [1]) * size
        tree._keys = _KeySource(seed).keys(size, 1)
        return tree

    # --------------------------------------------------------------- queries

    def __len__(self) -> int:
        return len(self._leaf_of)

    def __contains__(self, member_id: object) -> bool:
        return member_id in self._leaf_of

    def __repr__(self) -> str:
        return (
            f"KeyTree(members={len(self._leaf_of)}, version={self._version[ROOT]}, "
            f"group_key={fingerprint(self._key(ROOT))})"
        )

    @property
    def members(self) -> frozenset[str]:
        return frozenset(self._leaf_of)

    @property
    def version(self) -> int:
        """The current group key version (the epoch of the last update)."""
        return self._version[ROOT]

    @property
    def group_key(self) -> PathKey:
        """The root key: the group's KEK key material."""
        return PathKey(ROOT, self._version[ROOT], self._key(ROOT))

    def leaf_of(self, member_id: str) -> int:
        """The node id of `member_id`'s leaf (stable while it stays in the group)."""
        try:
            return self._leaf_of[member_id]
        except KeyError:
            raise KeyTreeError(f"{member_id!r} is not a member of the tree") from None

    def path_keys(self, member_id: str) -> tuple[PathKey, ...]:
        """The keys `member_id` holds, leaf first, root last: its registration answer."""
        node = self.leaf_of(member_id)
        path = []
        while node != _NONE:
            path.append(PathKey(node, self._version[node], self._key(node)))
            node = self._parent[node]
        return tuple(path)

    def height(self) -> int:
        """Depth of the deepest leaf (0 for an empty tree)."""
        depth = {ROOT: 0}
        for node in range(1, len(self._version)):
            if self._version[node]:
                depth[node] = self._depth(node, depth)
        return max(depth.values())

    # ---------------------------------------------------------------- update

    def update(self, *, joins: Sequence[str], leaves: Sequence[str], seed: bytes) -> TreeUpdate:
        """Apply one coalesced batch: first every leave, then every join, in the given order.

        Every key on the path of a leaving or joining member is replaced, each
        once, by a key derived from `seed`; the result lists each new key
        wrapped under the (new, if replaced) key of each child of its node,
        except under a joining member's leaf: joiners get their path keys by
        unicast (`path_keys`). A member id in both lists is re-keyed: it gets
        a new leaf and fresh path keys. An empty batch refreshes the group key.
        Misuse raises `KeyTreeError` and leaves the tree unchanged.
        """
        seed = _check_seed(seed)
        leaving = _check_member_ids(leaves, "leaves")
        joining = _check_member_ids(joins, "joins")
        for member in leaving:
            if member not in self._leaf_of:
                raise KeyTreeError(f"leaves: {member!r} is not a member of the tree")
        rejoining = set(leaving)
        for member in joining:
            if member in self._leaf_of and member not in rejoining:
                raise KeyTreeError(
                    f"joins: {member!r} is already a member; list it in leaves too to re-key it"
                )

        self._epoch += 1
        version = self._epoch
        dirty: set[int] = {ROOT}
        released: list[int] = []
        for member in leaving:
            self._remove(member, dirty, released)
        new_leaves: set[int] = set()
        for member in joining:
            new_leaves.add(self._add(member, dirty))
        dirty.difference_update(released)

        source = _KeySource(seed)
        for leaf in sorted(new_leaves):
            self._set_key(leaf, version, source.key(leaf, version))
        depth = {ROOT: 0}
        # Children before parents, so a parent's key is wrapped under its
        # children's keys as they are after this update.
        order = sorted(dirty, key=lambda node: (-self._depth(node, depth), node))
        wrapped: list[WrappedKey] = []
        for node in order:
            key = source.key(node, version)
            self._set_key(node, version, key)
            for child in (self._left[node], self._right[node]):
                if child != _NONE and child not in new_leaves:
                    wrapped.append(
                        WrappedKey(
                            node=node,
                            version=version,
                            under=child,
                            under_version=self._version[child],
                            wrapped=aes_key_wrap_with_padding(self._key(child), key),
                        )
                    )
        for node in released:
            heapq.heappush(self._free, node)
        return TreeUpdate(version=version, wrapped=tuple(wrapped))

    def _remove(self, member: str, dirty: set[int], released: list[int]) -> None:
        leaf = self._leaf_of.pop(member)
        node = self._parent[leaf]
        self._detach(leaf)
        self._release(leaf, released)
        while True:
            left, right = self._left[node], self._right[node]
            if node != ROOT and left == _NONE and right == _NONE:
                # An emptied internal node goes; its parent lost a child.
                parent = self._parent[node]
                self._detach(node)
                self._release(node, released)
                node = parent
                continue
            only = right if left == _NONE else left if right == _NONE else _NONE
            if only != _NONE and self._member_at[only] is None:
                # A node left with a single internal child is contracted
                # away: it would only lengthen the paths below it. A single
                # leaf child is kept, as RFC 9838 counts it: that open slot
                # is where the next join goes.
                if node == ROOT:
                    self._left[ROOT], self._right[ROOT] = self._left[only], self._right[only]
                    for child in (self._left[ROOT], self._right[ROOT]):
                        if child != _NONE:
                            self._parent[child] = ROOT
                    self._left[only] = self._right[only] = _NONE
                    self._release(only, released)
                else:
                    parent = self._parent[node]
                    self._replace_child(parent, node, only)
                    self._left[node] = self._right[node] = _NONE
                    self._release(node, released)
                    node = parent
                continue
            break
        self._touch(node, dirty)

    def _add(self, member: str, dirty: set[int]) -> int:
        node = ROOT
        while True:
            left, right = self._left[node], self._right[node]
            if self._member_at[node] is not None:
                # Split the leaf: a new internal node takes its place, with
                # the old leaf and the new one below it.
                inner = self._alloc()
                leaf = self._alloc()
                self._replace_child(self._parent[node], node, inner)
                self._left[inner], self._right[inner] = node, leaf
                self._parent[node] = self._parent[leaf] = inner
                break
            if _NONE in (left, right):
                leaf = self._alloc()
                if left == _NONE:
                    self._left[node] = leaf
                else:
                    self._right[node] = leaf
                self._parent[leaf] = node
                break
            node = left if self._slot[left] <= self._slot[right] else right
        self._member_at[leaf] = member
        self._leaf_of[member] = leaf
        self._slot[leaf] = _SLOT_SPLIT
        self._touch(self._parent[leaf], dirty)
        return leaf

    def _touch(self, node: int, dirty: set[int]) -> None:
        """Mark `node` and its ancestors for a new key; refresh their join scores.

        The climb stops at a node already marked whose score did not change: an
        earlier climb of this update marked its ancestors, and their scores
        depend on nothing else that changed. A batch of k joins then climbs
        about k + log2(n) nodes instead of k * log2(n)."""
        while node != _NONE:
            left, right = self._left[node], self._right[node]
            slot = (
                _SLOT_OPEN
                if _NONE in (left, right)
                else 2 + min(self._slot[left], self._slot[right])
            )
            if node in dirty and self._slot[node] == slot:
                return
            dirty.add(node)
            self._slot[node] = slot
            node = self._parent[node]

    def _depth(self, node: int, known: dict[int, int]) -> int:
        climb = []
        while node not in known:
            climb.append(node)
            node = self._parent[node]
        depth = known[node]
        for step in reversed(climb):
            depth += 1
            known[step] = depth
        return depth

    def _replace_child(self, parent: int, old: int, new: int) -> None:
        if self._left[parent] == old:
            self._left[parent] = new
        else:
            self._right[parent] = new
        self._parent[new] = parent

    def _detach(self, node: int) -> None:
        parent = self._parent[node]
        if self._left[parent] == node:
            self._left[parent] = _NONE
        else:
            self._right[parent] = _NONE
        self._parent[node] = _NONE

    def _alloc(self) -> int:
        if self._free:
            node = heapq.heappop(self._free)
            self._left[node] = self._right[node] = self._parent[node] = _NONE
            return node
        self._left.append(_NONE)
        self._right.append(_NONE)
        self._parent.append(_NONE)
        self._version.append(0)
        self._slot.append(0)
        self._member_at.append(None)
        self._keys.extend(bytes(KEY_LEN))
        return len(self._version) - 1

    def _release(self, node: int, released: list[int]) -> None:
        # Freed ids wait for the end of the update before reuse, so that a
        # node id names one node within an update.
        self._parent[node] = _NONE
        self._version[node] = 0
        self._slot[node] = 0
        self._member_at[node] = None
        self._keys[node * KEY_LEN : (node + 1) * KEY_LEN] = bytes(KEY_LEN)
        released.append(node)

    def _key(self, node: int) -> bytes:
        return bytes(self._keys[node * KEY_LEN : (node + 1) * KEY_LEN])

    def _set_key(self, node: int, version: int, key: bytes) -> None:
        self._version[node] = version
        self._keys[node * KEY_LEN : (node + 1) * KEY_LEN] = key

    # ------------------------------------------------------------ snapshots

    def to_state(self) -> dict[str, object]:
        """The whole tree as msgpack-ready plain data (canonical: equal trees, equal state).

        It holds every node key: store it only where key material may go.
        """
        members = [(node, m) for node, m in enumerate(self._member_at) if m is not None]
        return {
            "format": STATE_FORMAT,
            "epoch": self._epoch,
            "left": _le_bytes(self._left),
            "right": _le_bytes(self._right),
            "version": _le_bytes(self._version),
            "keys": bytes(self._keys),
            "members": [m for _, m in members],
            "leaves": _le_bytes(array("q", [node for node, _ in members])),
        }

    @classmethod
    def from_state(cls, obj: object) -> KeyTree:
        """The tree `to_state` described; `KeyTreeError` if `obj` is not a valid tree."""
        fields = ("format", "epoch", "left", "right", "version", "keys", "members", "leaves")
        if not isinstance(obj, dict) or set(obj) != set(fields):
            raise KeyTreeError(f"bad key tree state: expected a map with keys {fields}")
        fmt, epoch = obj["format"], obj["epoch"]
        if type(fmt) is not int or fmt != STATE_FORMAT:
            raise KeyTreeError("bad key tree state: unsupported format")
        if type(epoch) is not int or not 1 <= epoch < 2**63:
            raise KeyTreeError("bad key tree state: epoch out of range")
        left = _le_array(obj["left"], "left")
        right = _le_array(obj["right"], "right")
        version = _le_array(obj["version"], "version")
        leaves = _le_array(obj["leaves"], "leaves")
        keys, members = obj["keys"], obj["members"]
        size = len(version)
        if size == 0 or len(left) != size or len(right) != size:
            raise KeyTreeError("bad key tree state: node columns differ in length")
        if not isinstance(keys, bytes) or len(keys) != size * KEY_LEN:
            raise KeyTreeError("bad key tree state: keys column has the wrong length")
        if not isinstance(members, list | tuple) or len(members) != len(leaves):
            raise KeyTreeError("bad key tree state: members and leaves differ in length")

        if version[ROOT] == 0 or min(version) < 0 or max(version) > epoch:
            raise KeyTreeError("bad key tree state: key version out of range")
        parent = array("q", [_NONE]) * size
        for side in (left, right):
            for node, child in enumerate(side):
                if child == _NONE:
                    continue
                if version[node] == 0 or not ROOT < child < size or version[child] == 0:
                    raise KeyTreeError("bad key tree state: a child link is invalid")
                if parent[child] != _NONE:
                    raise KeyTreeError("bad key tree state: a node has two parents")
                parent[child] = node

        # With one parent per node, reaching every live node from the root
        # proves the links form a single tree (no cycles, no stray parts).
        order = [ROOT]
        visit = order.append
        for node in order:
            if (child := left[node]) != _NONE:
                visit(child)
            if (child := right[node]) != _NONE:
                visit(child)
        free_count = version.count(0)
        if len(order) != size - free_count:
            raise KeyTreeError("bad key tree state: nodes are not one tree")

        member_at: list[str | None] = [None] * size
        leaf_of: dict[str, int] = {}
        for member, leaf in zip(members, leaves, strict=True):
            if not isinstance(member, str) or not member or member in leaf_of:
                raise KeyTreeError("bad key tree state: bad or duplicate member id")
            if not ROOT < leaf < size or version[leaf] == 0 or member_at[leaf] is not None:
                raise KeyTreeError("bad key tree state: bad member leaf")
            if left[leaf] != _NONE or right[leaf] != _NONE:
                raise KeyTreeError("bad key tree state: a member leaf has children")
            member_at[leaf] = member
            leaf_of[member] = leaf

        slot = array("i", [0]) * size
        for node in reversed(order):
            l_child, r_child = left[node], right[node]
            if member_at[node] is not None:
                slot[node] = _SLOT_SPLIT
            elif l_child == _NONE and r_child == _NONE and node != ROOT:
                raise KeyTreeError("bad key tree state: an inner node has no children")
            elif _NONE in (l_child, r_child):
                slot[node] = _SLOT_OPEN
            else:
                slot[node] = 2 + min(slot[l_child], slot[r_child])

        tree = cls.__new__(cls)
        tree._epoch = epoch
        tree._free = [node for node in range(size) if version[node] == 0] if free_count else []
        tree._keys = bytearray(keys)
        tree._leaf_of = leaf_of
        tree._left = left
        tree._member_at = member_at
        tree._parent = parent
        tree._right = right
        tree._slot = slot
        tree._version = version
        return tree


class MemberKeys:
    """A member's LKH path keys, leaf first, root last, kept current by `apply`.

    The member learns its path from the updates themselves: every new key it
    unwraps belongs to the parent of the node whose key unwrapped it, so when
    its leaf moves down (a joiner split it) or a node above it is contracted
    away, the path follows. Keys that fall off the path are dropped.
    """

    __slots__ = ("_keys", "_leaf", "_parent")

    def __init__(self, path: Sequence[PathKey]) -> None:
        path = list(path)
        if len(path) < 2 or not all(isinstance(k, PathKey) for k in path):
            raise DecodeError("LKH path: needs path keys from a leaf up to the root")
        nodes = [k.node for k in path]
        if nodes[-1] != ROOT or ROOT in nodes[:-1] or len(set(nodes)) != len(nodes):
            raise DecodeError("LKH path: nodes must be distinct and end at the root")
        for k in path:
            if type(k.node) is not int or k.node < 0 or type(k.version) is not int:
                raise DecodeError("LKH path: bad node id or version")
            if k.version < 1 or not isinstance(k.key, bytes) or len(k.key) != KEY_LEN:
                raise DecodeError("LKH path: bad key version or key length")
        self._leaf = nodes[0]
        self._keys = {k.node: (k.version, k.key) for k in path}
        self._parent = dict(itertools.pairwise(nodes))

    def __repr__(self) -> str:
        version, key = self._keys[ROOT]
        return f"MemberKeys(leaf={self._leaf}, version={version}, group_key={fingerprint(key)})"

    @property
    def leaf(self) -> int:
        return self._leaf

    @property
    def group_key(self) -> PathKey:
        version, key = self._keys[ROOT]
        return PathKey(ROOT, version, key)

    @property
    def path(self) -> tuple[PathKey, ...]:
        """The keys held, leaf first, root last."""
        path = []
        node = self._leaf
        while True:
            version, key = self._keys[node]
            path.append(PathKey(node, version, key))
            if node == ROOT:
                return tuple(path)
            node = self._parent[node]

    def apply(self, wrapped: Sequence[WrappedKey]) -> bool:
        """Take in one update's wrapped keys; True if the group key changed.

        Unwraps, dependencies first, every key wrapped under a key this member
        holds or learns on the way; ignores the rest (meant for other members)
        and any key not newer than the one held (a duplicate). Raises
        `DecryptError` if a key it holds fails to unwrap, `DecodeError` if the
        keys do not lead from its leaf to the root; its keys are then unchanged.
        """
        by_wrapping_key: dict[tuple[int, int], list[WrappedKey]] = {}
        for item in wrapped:
            if not isinstance(item, WrappedKey):
                raise DecodeError("LKH update: expected wrapped keys")
            by_wrapping_key.setdefault((item.under, item.under_version), []).append(item)
        keys = dict(self._keys)
        parent = dict(self._parent)
        pending = [(node, version, key) for node, (version, key) in keys.items()]
        while pending:
            under, under_version, under_key = pending.pop()
            for item in by_wrapping_key.get((under, under_version), ()):
                held = keys.get(item.node)
                if held is not None and held[0] >= item.version:
                    continue
                if item.node in (self._leaf, under):
                    raise DecodeError("LKH update: a key is wrapped under itself or its leaf")
                try:
                    key = aes_key_unwrap_with_padding(under_key, item.wrapped)
                except InvalidUnwrap:
                    raise DecryptError(
                        f"LKH update: key of node {item.node} v{item.version} does not "
                        f"unwrap under node {under} v{under_version}; re-register"
                    ) from None
                if len(key) != KEY_LEN:
                    raise DecryptError("LKH update: an unwrapped key has the wrong length")
                keys[item.node] = (item.version, key)
                parent[under] = item.node
                pending.append((item.node, item.version, key))

        path = [self._leaf]
        while path[-1] != ROOT:
            step = parent.get(path[-1])
            if step is None or step not in keys or len(path) > len(keys):
                raise DecodeError("LKH update: the keys no longer lead to the root; re-register")
            path.append(step)
        changed = keys[ROOT][0] != self._keys[ROOT][0]
        self._keys = {node: keys[node] for node in path}
        self._parent = dict(itertools.pairwise(path))
        return changed
