"""Classic BPF programs attached to sockets: the opcodes, the bytes, the one setsockopt.

Rules kept here:
- A program is a list of (code, jt, jf, k) tuples; `assemble` makes the `struct
  sock_filter[]` bytes, `attach` hands them to the kernel as a `struct sock_fprog` with the
  given option (SO_ATTACH_FILTER, SO_ATTACH_REUSEPORT_CBPF). The buffer lives through the
  call: the kernel copies the program.
- Used by `steering.py` (worker selection in a reuseport group) and `letgo.py` (refusing new
  handshakes on a listener being given up).
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Sequence

SO_ATTACH_FILTER = 26  # <asm-generic/socket.h>
SO_ATTACH_REUSEPORT_CBPF = 51

# classic BPF opcodes (linux/filter.h)
BPF_LD, BPF_ALU, BPF_JMP, BPF_RET = 0x00, 0x04, 0x05, 0x06
BPF_W, BPF_B, BPF_ABS = 0x00, 0x10, 0x20
BPF_MUL, BPF_AND, BPF_RSH, BPF_MOD = 0x20, 0x50, 0x70, 0x90
BPF_JEQ = 0x10
BPF_K, BPF_A = 0x00, 0x10

INSTRUCTION = struct.Struct("=HBBI")  # struct sock_filter: code, jt, jf, k

Instruction = tuple[int, int, int, int]


def assemble(instructions: Sequence[Instruction]) -> bytes:
    """The `struct sock_filter[]` bytes of a program."""
    return b"".join(INSTRUCTION.pack(*insn) for insn in instructions)


def attach(sock: socket.socket, option: int, code: bytes) -> None:
    """Attach the program `code` (assembled) to `sock` with the SOL_SOCKET `option`."""
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("@HP", len(code) // INSTRUCTION.size, ctypes.addressof(buffer))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, option, fprog)
