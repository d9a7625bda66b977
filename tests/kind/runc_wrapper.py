#!/usr/bin/python3
"""An OCI runtime wrapper for docker on machines whose root lacks some capabilities.

Rules it keeps:
- Docker 20.10 asks runc for every capability it knows when a container is privileged. On
  this machine root's bounding set lacks CAP_SYS_RESOURCE, so runc fails with "unable to apply
  caps: operation not permitted" and no kind node can start.
- Before runc runs, every capability list in the OCI spec (the bundle's config.json for
  `create`/`run`, the `--process` file for `exec`) loses the capabilities that are not in this
  process's bounding set. Nothing else in the spec changes; unknown names are kept.
- Then it execs the real runc with the same arguments, so exit codes and output are runc's.

Stdlib only: docker's shim runs it with a bare environment.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

RUNC = os.environ.get("PYPROXY_REAL_RUNC", "/usr/sbin/runc")

# linux/capability.h, in bit order.
CAPABILITIES = (
    "CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP "
    "LINUX_IMMUTABLE NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER "
    "SYS_MODULE SYS_RAWIO SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE "
    "SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP "
    "MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF "
    "CHECKPOINT_RESTORE"
).split()


def missing_capabilities(status: str) -> set[str]:
    """Names (CAP_*) of the known capabilities outside the CapBnd line of /proc/PID/status."""
    for line in status.splitlines():
        if line.startswith("CapBnd:"):
            bounding = int(line.split()[1], 16)
            return {f"CAP_{n}" for i, n in enumerate(CAPABILITIES) if not bounding >> i & 1}
    return set()


def strip_process(process: dict[str, object], missing: set[str]) -> bool:
    """Drop missing capabilities from an OCI process object; True if anything changed."""
    caps = process.get("capabilities")
    if not isinstance(caps, dict):
        return False
    changed = False
    for key, names in caps.items():
        if isinstance(names, list):
            kept = [n for n in names if n not in missing]
            changed |= len(kept) != len(names)
            caps[key] = kept
    return changed


def option(args: list[str], *names: str) -> str | None:
    """The value of the first of `names` in args (`--x v` or `--x=v`)."""
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def spec_file(args: list[str]) -> tuple[Path, bool] | None:
    """(file, is_whole_spec) that this runc call will read, if it reads one we must fix."""
    commands = [a for a in args if not a.startswith("-")]
    if "exec" in commands:
        process = option(args, "--process", "-p")
        return (Path(process), False) if process else None
    if "create" in commands or "run" in commands:
        return Path(option(args, "--bundle", "-b") or ".") / "config.json", True
    return None


def fix(path: Path, whole_spec: bool, missing: set[str]) -> None:
    data = json.loads(path.read_text())
    process = data.get("process", {}) if whole_spec else data
    if isinstance(process, dict) and strip_process(process, missing):
        tmp = path.with_name(path.name + ".pyproxy-tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)


def main(argv: list[str]) -> None:
    target = spec_file(argv)
    if target is not None and target[0].is_file():
        fix(target[0], target[1], missing_capabilities(Path("/proc/self/status").read_text()))
    os.execv(RUNC, [RUNC, *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
