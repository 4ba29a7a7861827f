"""Raft consensus for the GCKS cluster: a sans-IO core in the style of
etcd-io/raft, plus its durable, encrypted log. The core never touches sockets,
disks or clocks; the trio driver in `gcks.cluster` owns all three."""
