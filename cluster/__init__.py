"""The GCKS node: consensus, peer transport, replicated group state, registrar,
rekeyer, ops and admin. Depends on `gcks.proto`, never on `gcks.member`."""
