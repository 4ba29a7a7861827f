"""Chaos tests: real `gcks node` processes under a seeded nemesis and a workload.

`harness.run_chaos` starts a loopback cluster behind fault proxies, drives
in-test members and admin operations (`workload`) and real `gcks-member`
processes (`observers`) while `nemesis` kills, pauses, partitions and wipes
nodes, records every client operation (`history`), and judges the run
(`checks`, `linearizability`). `python -m tests.chaos` runs it from the shell.
Test infrastructure only: never imported by product code.
"""
