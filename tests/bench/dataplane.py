"""Benchmark: data-plane protect+unprotect packets/s against bare AES-256-GCM.

One round trip is `DataSender.protect` then `DataReceiver.unprotect` of a
1200-byte payload (AES-256-GCM, replay window 1024, source authentication
off): header packing, nonce from sender id and sequence, SPI lookup, replay
check and window update around the AEAD. The anchor, in the same run, is bare
`AESGCM.encrypt` + `decrypt` of the same payload with the same associated data
size: the physical ceiling of this Python/OpenSSL stack. `ratio` = ours /
anchor (target >= 0.5). Also reported: the same round trip with source
authentication on (an Ed25519 signature per packet, signed and verified).

Rates count this process's CPU time (`time.process_time`), and both sides
run in interleaved rounds with the best round of each kept: on a shared
machine, time spent descheduled would otherwise be charged to whichever side
happened to be running.

Run: `python -m tests.bench.dataplane [--rounds 10]` from the repository root
(under a minute). The last stdout line is the JSON result. Pure computation.

May import `cryptography` and `gcks.proto`. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gcks.proto.data import HEADER_SIZE, DataReceiver, DataSender
from gcks.proto.sa import CipherSuite, KeySA

PAYLOAD_SIZE = 1200
WINDOW = 1024
NOW_MS = 1_000_000
PACKETS = 20_000
SIGNED_PACKETS = 1_000


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cpu_rate(run: Callable[[int], None], count: int) -> float:
    start = time.process_time()
    run(count)
    return count / (time.process_time() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds per side")
    args = parser.parse_args()
    started = time.monotonic()
    payload = os.urandom(PAYLOAD_SIZE)
    aead = AESGCM(AESGCM.generate_key(bit_length=256))
    nonce, aad = os.urandom(12), os.urandom(HEADER_SIZE)
    spis = itertools.count(1)
    signer = Ed25519PrivateKey.generate()

    def bare(count: int) -> None:
        encrypt, decrypt = aead.encrypt, aead.decrypt
        for _ in range(count):
            decrypt(nonce, encrypt(nonce, payload, aad), aad)

    def protected(count: int, *, signed: bool = False) -> None:
        # A fresh TEK per round: a sender never restarts its sequence under a key.
        tek = KeySA(next(spis), CipherSuite.AES_256_GCM, os.urandom(32), 0, 2 * NOW_MS)
        receiver = DataReceiver(window_size=WINDOW, require_source_auth=signed)
        receiver.install(tek)
        if signed:
            receiver.set_sender_key(1, signer.public_key())
        sender = DataSender(tek, sender_id=1, signer=signer if signed else None)
        protect, unprotect = sender.protect, receiver.unprotect
        for _ in range(count):
            unprotect(protect(payload), NOW_MS)

    bare(1000)
    protected(1000)
    best_bare = best_ours = best_signed = 0.0
    for r in range(args.rounds):
        best_bare = max(best_bare, cpu_rate(bare, PACKETS))
        best_ours = max(best_ours, cpu_rate(protected, PACKETS))
        best_signed = max(
            best_signed, cpu_rate(lambda c: protected(c, signed=True), SIGNED_PACKETS)
        )
        log(
            f"round {r + 1}: ours {best_ours:,.0f}/s, bare {best_bare:,.0f}/s, "
            f"signed {best_signed:,.0f}/s (best so far)"
        )
    log(f"done in {time.monotonic() - started:.0f} s")
    print(
        json.dumps(
            {
                "bench": "dataplane",
                "results": {
                    "packets_per_s": round(best_ours),
                    "packets_per_s_source_auth": round(best_signed),
                    "payload_bytes": PAYLOAD_SIZE,
                    "payload_mbit_per_s": round(best_ours * PAYLOAD_SIZE * 8 / 1e6, 1),
                },
                "anchor": {
                    "what": "bare AESGCM encrypt+decrypt, same payload",
                    "packets_per_s": round(best_bare),
                },
                "ratio": round(best_ours / best_bare, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
