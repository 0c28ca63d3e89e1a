#!/usr/bin/env python3
"""gRPC's C core (here grpcio) against kiln's unix socket.

C-core clients name a unix socket target in `:authority`: by default the
percent-encoded path (`tmp%2Fx%2Fkiln.sock`), or whatever
`grpc.default_authority` says (often the raw path). Neither is a valid URI
authority; kiln must answer anyway.

Usage: unix_authority.py SOCKET
Exits non-zero with a message on the first failed call.
"""

import sys

import grpc


def health_check(target, options):
    channel = grpc.insecure_channel(target, options=options)
    check = channel.unary_unary("/grpc.health.v1.Health/Check")
    # An empty HealthCheckRequest asks for the server as a whole; field 1 of
    # the response is the status, 1 = SERVING.
    for attempt in range(3):  # the same channel again: HPACK state carries over
        reply = check(b"", timeout=10)
        if reply != b"\x08\x01":
            raise SystemExit(f"{target} {options} call {attempt}: unexpected reply {reply!r}")
    channel.close()


def main():
    socket = sys.argv[1]
    cases = [
        ("unix:" + socket, []),
        ("unix://" + socket, []),
        ("unix:" + socket, [("grpc.default_authority", socket)]),
        ("unix:" + socket, [("grpc.default_authority", "localhost")]),
    ]
    for target, options in cases:
        try:
            health_check(target, options)
        except grpc.RpcError as e:
            raise SystemExit(f"{target} {options}: {e.code()} {e.details()}")
        print(f"ok: {target} {options}")
    print("all checks passed")


if __name__ == "__main__":
    main()
