"""The group member library and CLI. Depends on `gcks.proto`, never on
`gcks.cluster`."""
