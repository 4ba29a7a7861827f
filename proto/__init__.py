"""Sans-IO protocol layer shared by GCKS nodes and members.

Everything that crosses the cluster/member boundary lives here: message
schemas and their msgpack codec, the GSA/SA/policy model, the cryptography of
rekeys and data packets, and the LKH key tree. Nothing in this package may
import trio, open a socket, or read a clock: time arrives as arguments.
"""
