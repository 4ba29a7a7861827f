"""Deterministic simulation testing of the Raft core (`gcks.cluster.raft`).

N in-process RawNodes under one seeded scheduler: a hostile network
(`network.py`), a crash-faithful storage model (`storage.py`), invariant and
linearizability checkers (`checker.py`, `linearizability.py`), the run itself
(`cluster.py`) and a command line (`python -m tests.sim`). Test code only:
imports the core, never changes it.
"""
