"""What an open connection is, as it moves to a successor pyproxy: versioned, pure, testable.

One established TCP pair or one UDP flow crosses the hand-over as one message: a kind
(`tcp-pair`, `udp-flow`), a JSON body (the dicts below, with `"v": STATE_VERSION`), and the
file descriptors it needs, sent with SCM_RIGHTS in the order the body names them. Nothing
here touches a socket or reads a clock: times are *durations* (how long ago the pair
started, how long it has been idle), so the receiving process rebuilds its own monotonic
timestamps and the idle timers go on from where they were.

The TCP state is the same for both relays, so a pair may move between the compiled engine
and its pure-Python twin (an upgrade to a node where the engine was not built, or back):
- per direction (`up`: client -> endpoint, `down`: endpoint -> client): whether its source
  has sent EOF (`eof`) and whether that EOF was already forwarded as shutdown(SHUT_WR) on
  the destination (`shut`); the bytes read from the source but not yet written to the
  destination (`held`, base64 in the body), and whether the direction's pipe comes along (its two fds) with `in_pipe` bytes in it.
- the fds: always the client socket, then the upstream socket, then the pipes' read and
  write ends, `up` first, for the directions that have one.

Rules (`movable`): only an established pair moves (a pair still dialing drains in the old
process). The decoder refuses
another version or a malformed body with `StateError`, naming the field; the receiver then
resets that connection's sockets (their state is unknown to it) and counts it.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any

from pyproxy.model.objects import ServiceKey, ServicePortName

STATE_VERSION = 1
TCP_KIND = "tcp-pair"
UDP_KIND = "udp-flow"

Address = tuple[str, int]


class StateError(ValueError):
    """A connection state the receiver cannot use (another version, a missing field)."""


@dataclass(frozen=True)
class DirectionState:
    eof: bool = False  # the source sent EOF
    shut: bool = False  # ... and it was forwarded: the destination is shut for writing
    held: bytes = b""  # read from the source, not yet written to the destination
    pipe: bool = False  # its splice pipe comes along (two fds)
    in_pipe: int = 0  # bytes in that pipe


@dataclass(frozen=True)
class TcpState:
    port: ServicePortName
    client: Address
    frontend: Address  # the service address the client connected to
    endpoint: Address
    age: float  # seconds since the pair was accepted
    idle: float  # seconds since bytes last moved
    bytes_in: int = 0
    bytes_out: int = 0
    up: DirectionState = field(default_factory=DirectionState)  # client -> endpoint
    down: DirectionState = field(default_factory=DirectionState)  # endpoint -> client

    @property
    def fd_count(self) -> int:
        return 2 + 2 * self.up.pipe + 2 * self.down.pipe


@dataclass(frozen=True)
class UdpState:
    port: ServicePortName
    client: Address
    service: Address  # replies leave from here
    endpoint: Address
    age: float
    idle: float
    bytes_in: int = 0
    bytes_out: int = 0

    fd_count = 1  # the upstream socket, connected to the endpoint


def movable(connected: bool, closed: bool, write_buffered: int) -> str | None:
    """Why a TCP pair cannot move (None: it can). Those drain in the old process."""
    if closed:
        return "closed"
    if not connected:
        return "dialing"
    if write_buffered:
        return "mid-write"
    return None


# encoding

def _port(name: ServicePortName) -> dict[str, str]:
    return {"namespace": name.service.namespace, "service": name.service.name, "name": name.port_name,
            "protocol": name.protocol}


def _direction(d: DirectionState) -> dict[str, Any]:
    return {"eof": d.eof, "shut": d.shut, "held": base64.b64encode(d.held).decode("ascii"), "pipe": d.pipe,
            "in_pipe": d.in_pipe}


def encode_tcp(state: TcpState) -> dict[str, Any]:
    return {"v": STATE_VERSION, "port": _port(state.port), "client": list(state.client),
            "frontend": list(state.frontend), "endpoint": list(state.endpoint), "age": state.age,
            "idle": state.idle, "bytes_in": state.bytes_in, "bytes_out": state.bytes_out,
            "up": _direction(state.up), "down": _direction(state.down)}


def encode_udp(state: UdpState) -> dict[str, Any]:
    return {"v": STATE_VERSION, "port": _port(state.port), "client": list(state.client),
            "service": list(state.service), "endpoint": list(state.endpoint), "age": state.age,
            "idle": state.idle, "bytes_in": state.bytes_in, "bytes_out": state.bytes_out}


# decoding: every field checked, every failure names it

class _Body:
    def __init__(self, body: object, what: str) -> None:
        if not isinstance(body, dict):
            raise StateError(f"{what}: not an object")
        version = body.get("v")
        if version != STATE_VERSION:
            raise StateError(f"{what}: state version {version!r}, this pyproxy reads version {STATE_VERSION}")
        self.body: dict[str, Any] = body
        self.what = what

    def get(self, key: str, kind: type | tuple[type, ...]) -> Any:
        value = self.body.get(key)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float, (int, float))):
            raise StateError(f"{self.what}: field {key!r} is missing or not a {getattr(kind, '__name__', kind)}")
        return value

    def number(self, key: str) -> float:
        value = float(self.get(key, (int, float)))
        if value < 0:
            raise StateError(f"{self.what}: field {key!r} is negative")
        return value

    def count(self, key: str) -> int:
        value: int = self.get(key, int)
        if value < 0:
            raise StateError(f"{self.what}: field {key!r} is negative")
        return value

    def address(self, key: str) -> Address:
        value = self.get(key, list)
        if len(value) != 2 or not isinstance(value[0], str) or not isinstance(value[1], int) \
                or isinstance(value[1], bool) or not 0 <= value[1] <= 65535:
            raise StateError(f"{self.what}: field {key!r} is not an [ip, port] pair")
        return value[0], value[1]

    def port(self) -> ServicePortName:
        raw = self.get("port", dict)
        parts = [raw.get(k) for k in ("namespace", "service", "name", "protocol")]
        if not all(isinstance(p, str) for p in parts):
            raise StateError(f"{self.what}: field 'port' needs namespace, service, name and protocol strings")
        return ServicePortName(ServiceKey(parts[0], parts[1]), parts[2], parts[3])

    def direction(self, key: str) -> DirectionState:
        sub = _Body({**self.get(key, dict), "v": STATE_VERSION}, f"{self.what} {key}")
        try:
            held = base64.b64decode(sub.get("held", str), validate=True)
        except binascii.Error:
            raise StateError(f"{self.what} {key}: field 'held' is not base64") from None
        state = DirectionState(sub.get("eof", bool), sub.get("shut", bool), held, sub.get("pipe", bool),
                               sub.count("in_pipe"))
        if state.shut and not state.eof:
            raise StateError(f"{self.what} {key}: shut without eof")
        if state.in_pipe and not state.pipe:
            raise StateError(f"{self.what} {key}: bytes in a pipe that is not sent")
        return state


def decode_tcp(body: object) -> TcpState:
    b = _Body(body, TCP_KIND)
    return TcpState(b.port(), b.address("client"), b.address("frontend"), b.address("endpoint"), b.number("age"),
                    b.number("idle"), b.count("bytes_in"), b.count("bytes_out"), b.direction("up"),
                    b.direction("down"))


def decode_udp(body: object) -> UdpState:
    b = _Body(body, UDP_KIND)
    return UdpState(b.port(), b.address("client"), b.address("service"), b.address("endpoint"), b.number("age"),
                    b.number("idle"), b.count("bytes_in"), b.count("bytes_out"))
