"""The listener let-go filter (dataplane/letgo.py): its bytes run through a classic BPF
interpreter for every TCP flag byte, and the tcp_info decoding."""

from __future__ import annotations

import struct

from pyproxy.dataplane import letgo


def run_cbpf(code: bytes, packet: bytes) -> int:
    """The subset of classic BPF the program uses: ld b abs, and k, jeq k, ret k."""
    program = [struct.unpack_from("=HBBI", code, i) for i in range(0, len(code), 8)]
    a, pc = 0, 0
    for _ in range(len(program)):
        op, jt, jf, k = program[pc]
        if op == 0x30:  # ldb [k]
            a = packet[k]
        elif op == 0x54:  # and #k
            a &= k
        elif op == 0x15:  # jeq #k
            pc += jt if a == k else jf
        elif op == 0x06:  # ret #k
            return k
        else:
            raise AssertionError(f"unexpected opcode {op:#x}")
        pc += 1
    raise AssertionError("fell off the end")


def test_only_a_bare_syn_is_dropped_for_every_flag_byte() -> None:
    code = letgo.program()
    assert len(code) % 8 == 0
    header = bytearray(20)
    for flags in range(256):
        header[13] = flags
        kept = run_cbpf(code, bytes(header)) != 0
        assert kept == letgo.passes(flags), hex(flags)
        assert kept == (not (flags & 0x02 and not flags & 0x10)), hex(flags)
    assert not letgo.passes(0x02) and letgo.passes(0x12) and letgo.passes(0x10) and letgo.passes(0x04)


def test_the_queue_length_is_tcpi_unacked() -> None:
    info = bytearray(letgo.TCP_INFO_SIZE)
    struct.pack_into("=I", info, 24, 7)
    assert letgo.unacked(bytes(info)) == 7
