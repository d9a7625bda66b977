"""Both ends of the data-integrity check, run as scripts inside a test namespace.

    python -m tests.bench.integrity server PORT
    python -m tests.bench.integrity client HOST:PORT MIB

The client sends MIB MiB of seeded random bytes and half-closes; the server hashes everything
up to that EOF, answers the SHA-256 and the byte count, then sends MIB MiB of its own seeded
bytes and closes; the client checks the digest, the count and every byte it receives. So a
proxy in between must carry both directions intact and forward the client's half-close
while still carrying the server's answer. Exit 0 and "ok" on success.
"""

from __future__ import annotations

import hashlib
import random
import socket
import struct
import sys
import threading

MIB = 1 << 20
ANSWER = struct.Struct("!32sQ")


def blocks(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(MIB) for _ in range(count)]


def _serve_one(conn: socket.socket, mib: int) -> None:
    with conn:
        digest, total = hashlib.sha256(), 0
        while True:
            data = conn.recv(MIB)
            if not data:
                break
            digest.update(data)
            total += len(data)
        conn.sendall(ANSWER.pack(digest.digest(), total))
        for block in blocks(2, mib):
            conn.sendall(block)


def server(port: int, mib: int) -> None:
    listener = socket.create_server(("0.0.0.0", port), backlog=64)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_serve_one, args=(conn, mib), daemon=True).start()


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    parts, got = [], 0
    while got < size:
        data = sock.recv(min(MIB, size - got))
        if not data:
            raise EOFError(f"closed after {got} of {size} bytes")
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def client(host: str, port: int, mib: int) -> str:
    sent = blocks(1, mib)
    with socket.create_connection((host, port), timeout=60) as sock:
        for block in sent:
            sock.sendall(block)
        sock.shutdown(socket.SHUT_WR)
        digest, total = ANSWER.unpack(_recv_exactly(sock, ANSWER.size))
        if total != mib * MIB or digest != hashlib.sha256(b"".join(sent)).digest():
            return f"upstream corrupted: {total} bytes, digest mismatch={digest != hashlib.sha256(b''.join(sent)).digest()}"
        for i, block in enumerate(blocks(2, mib)):
            if _recv_exactly(sock, MIB) != block:
                return f"downstream corrupted in MiB {i}"
        if sock.recv(1):
            return "downstream carried extra bytes"
    return "ok"


def main(argv: list[str]) -> int:
    if argv[0] == "server":
        server(int(argv[1]), int(argv[2]) if len(argv) > 2 else 100)
        return 0
    host, _, port = argv[1].rpartition(":")
    verdict = client(host, int(port), int(argv[2]))
    print(verdict)
    return 0 if verdict == "ok" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
