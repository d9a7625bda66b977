"""Steering connections among worker processes by the client's source address.

Rules kept here:
- N workers each own one listening socket in one SO_REUSEPORT group (socket i joins the
  group i-th, so the kernel's socket index i is worker i). A classic BPF program attached
  with SO_ATTACH_REUSEPORT_CBPF returns that index for every new connection, so the same
  client IPv4 address always lands on the same worker, and ClientIP affinity (whose table
  lives in each worker's memory) stays consistent whichever worker would have accepted.
- The program: for TCP/UDP the kernel runs it with the skb's data at the transport payload
  (the IP header is behind it), so the source address is loaded through the ancillary base
  SKF_NET_OFF (-0x100000) at network-header offset 12; it is mixed (multiply by a 32-bit
  odd constant, keep the high half) so that neighbouring addresses spread, then `A % N`.
  An index >= the group's size makes the kernel fall back to its own hash.
- `program()` is pure bytes; `worker_for()` is the same function in Python, so tests (and
  the bench) can predict where a client goes. `attach()` is the only I/O.
"""

from __future__ import annotations

import ipaddress
import socket

from pyproxy.dataplane import cbpf
from pyproxy.dataplane.cbpf import (
    BPF_A,
    BPF_ABS,
    BPF_ALU,
    BPF_K,
    BPF_LD,
    BPF_MOD,
    BPF_MUL,
    BPF_RET,
    BPF_RSH,
    BPF_W,
    SO_ATTACH_REUSEPORT_CBPF,
    Instruction,
    assemble,
)

SKF_NET_OFF = -0x100000
SADDR_OFFSET = 12  # in the IPv4 header
MIX = 0x9E3779B1  # 2^32 / golden ratio, odd
MAX_WORKERS = 64


def instructions(workers: int) -> list[Instruction]:
    """The program as (code, jt, jf, k) tuples."""
    if not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"workers must be in [1, {MAX_WORKERS}], not {workers}")
    return [
        (BPF_LD | BPF_W | BPF_ABS, 0, 0, (SKF_NET_OFF + SADDR_OFFSET) & 0xFFFFFFFF),  # A = saddr
        (BPF_ALU | BPF_MUL | BPF_K, 0, 0, MIX),  # A *= MIX (mod 2^32)
        (BPF_ALU | BPF_RSH | BPF_K, 0, 0, 16),  # A >>= 16
        (BPF_ALU | BPF_MOD | BPF_K, 0, 0, workers),  # A %= N
        (BPF_RET | BPF_A, 0, 0, 0),  # socket index
    ]


def program(workers: int) -> bytes:
    """The `struct sock_filter[]` bytes for `workers` sockets."""
    return assemble(instructions(workers))


def worker_for(client_ip: str, workers: int) -> int:
    """Which worker the program picks for a client (the same arithmetic, in Python)."""
    a = int(ipaddress.IPv4Address(client_ip))
    a = (a * MIX) & 0xFFFFFFFF
    return (a >> 16) % workers


def attach(sock: socket.socket, workers: int) -> None:
    """Attach the steering program to a socket of the reuseport group (applies to all)."""
    cbpf.attach(sock, SO_ATTACH_REUSEPORT_CBPF, program(workers))
