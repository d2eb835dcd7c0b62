#!/usr/bin/env python3
"""PCP codec throughput on one core: encode+decode of a MAP request carrying
THIRD_PARTY and THIRD_PARTY_ID (what the IWF sends), and of the MAP response
the lab CGN answers it with (which echoes both options).

    python3 bench/bench_pcp_codec.py [--quick] [--profile]

Target: >= 100,000 encode+decode pairs per second for each message.
"""

from __future__ import annotations

import argparse
import time
from ipaddress import IPv4Address

import _common as c  # noqa: F401  (puts the repo on sys.path)

from igdpcp.pcp.codec import (
    MapBody,
    Request,
    Response,
    ThirdParty,
    ThirdPartyId,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from igdpcp.pcp.constants import Opcode, ResultCode

TARGET = 100_000

NONCE = bytes(range(12))
CLIENT = IPv4Address("127.0.0.1")
INTERNAL = IPv4Address("192.168.1.10")
EXTERNAL = IPv4Address("5.5.5.5")
OPTIONS = (ThirdParty(INTERNAL), ThirdPartyId(b"\x00\x03\xe9"))

REQUEST = Request(Opcode.MAP, 3600, CLIENT,
                  MapBody(NONCE, 6, 8080, 18080, IPv4Address("0.0.0.0")), OPTIONS)
RESPONSE = Response(Opcode.MAP, ResultCode.SUCCESS, 3600, 12345,
                    MapBody(NONCE, 6, 8080, 18080, EXTERNAL), OPTIONS)
REQUEST_BYTES = encode_request(REQUEST)
RESPONSE_BYTES = encode_response(RESPONSE)


def rate(fn, seconds: float) -> float:
    """Calls of fn per second, best of three rounds of ~seconds/3 each."""
    n = 2000
    while True:  # calibrate a batch of ~50 ms
        t = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t
        if dt > 0.05:
            break
        n *= 2
    batch = n
    best = 0.0
    for _ in range(3):
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 3:
            for _ in range(batch):
                fn()
            done += batch
        best = max(best, done / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="~3 s instead of ~25 s")
    ap.add_argument("--profile", action="store_true", help="cProfile the request and response round trips")
    args = ap.parse_args()
    seconds = 0.4 if args.quick else 3.0

    assert decode_request(REQUEST_BYTES) == REQUEST and decode_response(RESPONSE_BYTES) == RESPONSE
    cases = [
        ("encode_request (MAP+TP+TPID)", lambda: encode_request(REQUEST)),
        ("decode_request", lambda: decode_request(REQUEST_BYTES)),
        ("encode_response (MAP+TP+TPID)", lambda: encode_response(RESPONSE)),
        ("decode_response", lambda: decode_response(RESPONSE_BYTES)),
        ("request encode+decode", lambda: decode_request(encode_request(REQUEST))),
        ("response encode+decode", lambda: decode_response(encode_response(RESPONSE))),
    ]
    rows = []
    for name, fn in cases:
        r = rate(fn, seconds)
        pair = "encode+decode" in name
        rows.append([name, f"{r:,.0f}", f"{1e6 / r:.2f}",
                     f">= {TARGET:,}/s: {c.verdict(r, TARGET)}" if pair else ""])
    c.table(f"PCP codec, one core, {len(REQUEST_BYTES)}-octet request / {len(RESPONSE_BYTES)}-octet response",
            ["operation", "ops/s", "us/op", "target"], rows)

    if args.profile:
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(50_000):
            decode_request(encode_request(REQUEST))
            decode_response(encode_response(RESPONSE))
        prof.disable()
        c.profile_report(prof, 20, "codec round trips x 50,000")


if __name__ == "__main__":
    main()
