"""The runner's hands: start backends and contenders in the namespaces, measure one cell.

Rules kept here:
- Everything is started through the `Registry` (so teardown stops exactly that) and inside
  the run's own namespaces; the load tool runs in the client namespace, proxies in the node,
  one backend per backend namespace.
- A contender is ready when `bench.probe` completes one exchange through it from the client
  namespace within its bound; otherwise it is skipped with the reason (and its log's tail).
- A measurement samples the proxy's process-tree CPU right before and after the load run, and
  (idle) its Pss before and at peak during the hold. The load run itself is bounded in time;
  past the bound it is stopped and the measurement records a timeout.
- `--pin`: proxies on CPU 0, load and backends on CPU 1 (taskset), else the scheduler decides.
- `--proxy-cores Q`: each proxy runs in a cpu cgroup of its own (v1 `cpu.cfs_quota_us`, made
  under /sys/fs/cgroup/cpu for this run and removed at its end) capped at Q cores per thread
  or worker (`threads_of`), so that on a small machine a proxy is the bottleneck while the
  load and the backends still have cores to spare: how `--workers 2` is shown to gain here.
- For the C load generators every backend also runs nginx as a small HTTP server on
  HTTP_PORT, and backend 1 runs `iperf3 -s` on IPERF_PORT (each only where installed; a
  workload whose server is missing fails its measurements with the reason).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.reporting.summary import Measurement
from bench.runner import procs
from bench.runner.contenders import BACKEND_PORT, HTTP_PORT, IPERF_PORT, Contender, state_dir, threads_of
from bench.runner.topology import NODE_ADDR, Topology, in_ns
from bench.runner.workloads import Workload

CGROUP_ROOT = Path("/sys/fs/cgroup/cpu")
CFS_PERIOD_US = 100_000
LOAD_SLACK_S = 40.0  # beyond the load tool's own hard deadline


def http_backend_config(addr: str, workdir: Path) -> str:
    """nginx as the C tools' HTTP backend: one worker, a fixed 20-byte answer, no log."""
    return f"""daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 20000;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{
    worker_connections 19000;
}}
http {{
    access_log off;
    keepalive_requests 1000000;
    server {{
        listen {addr}:{HTTP_PORT} reuseport backlog=4096;
        location / {{ return 200 "hello-from-backend\\n"; }}
    }}
}}
"""


@dataclass
class Harness:
    topo: Topology
    workdir: Path
    registry: procs.Registry
    repo: Path
    pin: bool = False
    proxy_cores: float = 0.0  # > 0: cap each proxy at this many cores per thread/worker
    cgroups: list[Path] = field(default_factory=list)

    def _py(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    def _pinned(self, cpu: int, argv: list[str]) -> list[str]:
        return ["taskset", "-c", str(cpu), *argv] if self.pin else argv

    def _proxy_argv(self, c: Contender) -> list[str]:
        """The contender's command in the node namespace: pinned, and inside its capped cgroup
        when asked (joined before `ip netns exec`, whose private /sys has no cgroup mounts)."""
        argv = in_ns(self.topo.node_ns, self._pinned(0, list(c.argv)))
        if self.proxy_cores <= 0:
            return argv
        group = CGROUP_ROOT / f"{self.topo.prefix}{c.id}"
        if group not in self.cgroups:
            group.mkdir(exist_ok=True)
            self.cgroups.append(group)
            (group / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(round(self.proxy_cores * threads_of(c) * CFS_PERIOD_US)))
        return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(group), *argv]

    def remove_cgroups(self) -> list[str]:
        """Remove the cgroups this run made (their processes are gone by now); what could not be."""
        left = []
        for group in self.cgroups:
            for _ in range(50):
                try:
                    group.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
            else:
                left.append(str(group))
        return left

    def backend_targets(self) -> list[tuple[str, int]]:
        return [(self.topo.backend_addr(i), BACKEND_PORT) for i in self.topo.backend_ids]

    def start_backends(self) -> None:
        for i in self.topo.backend_ids:
            argv = self._pinned(1, self._py("-m", "bench.backend", "--port", str(BACKEND_PORT), "--name", f"be{i}"))
            self.registry.start(f"backend-{i}", in_ns(self.topo.backend_ns(i), argv),
                                self.workdir / f"backend-{i}.log", cwd=self.repo)
            if shutil.which("nginx"):
                d = self.workdir / f"backend-{i}-http"
                d.mkdir(parents=True, exist_ok=True)
                (d / "nginx.conf").write_text(http_backend_config(self.topo.backend_addr(i), d))
                self.registry.start(f"backend-{i}-http", in_ns(self.topo.backend_ns(i), self._pinned(1, [
                    "nginx", "-e", str(d / "error.log"), "-p", str(d), "-c", str(d / "nginx.conf")])),
                    d / "run.log", cwd=self.repo)
        if shutil.which("iperf3"):
            self.registry.start("backend-1-iperf3", in_ns(self.topo.backend_ns(1), self._pinned(1, [
                "iperf3", "-s", "-B", self.topo.backend_addr(1), "-p", str(IPERF_PORT)])),
                self.workdir / "backend-1-iperf3.log", cwd=self.repo)
        for target in self.backend_targets():
            error = self.probe(target, 10.0)
            if error:
                raise RuntimeError(f"backend {target} not ready: {error}")

    def probe(self, target: tuple[str, int], timeout: float) -> str:
        argv = in_ns(self.topo.client_ns, self._py("-m", "bench.probe", "--target", f"{target[0]}:{target[1]}",
                                                    "--timeout", f"{timeout:g}"))
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 10, cwd=self.repo)
        except subprocess.TimeoutExpired:
            return "probe timed out"
        return "" if done.returncode == 0 else (done.stderr.strip() or f"probe exit {done.returncode}")

    def _nft(self, script: str) -> None:
        done = subprocess.run(in_ns(self.topo.node_ns, ["nft", "-f", "-"]), input=script, text=True,
                              capture_output=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"nft: {done.stderr.strip()}")

    def start(self, c: Contender, mode: str = "") -> None:
        """Write the contender's files (with the load mode's overlay) and start its process."""
        d = self.workdir / c.id
        d.mkdir(parents=True, exist_ok=True)
        for name, text in {**c.files, **c.mode_files.get(mode, {})}.items():
            (d / name).parent.mkdir(parents=True, exist_ok=True)
            (d / name).write_text(text)
        if c.has_process:
            self.registry.start(c.id, self._proxy_argv(c), d / "run.log", cwd=self.repo)

    def proc(self, c: Contender) -> procs.Started | None:
        """The contender's process: the live one, when a restart started a successor."""
        mine = [p for p in self.registry.started if p.name == c.id]
        return next((p for p in reversed(mine) if p.alive()), mine[0] if mine else None)

    def stop(self, c: Contender) -> None:
        for p in [p for p in self.registry.started if p.name == c.id]:
            self.registry.stop(p)

    def activate(self, c: Contender, mode: str = "") -> str:
        """Make the contender serve (exclusive ones start here); '' or the reason it can't."""
        try:
            if c.exclusive:
                self.start(c, mode)
            if c.nft_up:
                self._nft(c.nft_up)
                subprocess.run(in_ns(self.topo.node_ns, ["sysctl", "-qw", "-e",
                               "net.netfilter.nf_conntrack_tcp_timeout_time_wait=2",
                               "net.netfilter.nf_conntrack_tcp_timeout_fin_wait=2",
                               "net.netfilter.nf_conntrack_tcp_timeout_close_wait=2",
                               "net.netfilter.nf_conntrack_tcp_timeout_last_ack=2"]),
                               capture_output=True, timeout=30)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            return str(exc)
        p = self.proc(c)
        if c.has_process and (p is None or not p.alive()):
            return f"{c.id} exited at start: {p.log_tail() if p else 'not started'}"
        return self.probe(c.target, c.ready_timeout if c.exclusive else 5.0)

    def deactivate(self, c: Contender) -> None:
        if c.nft_down:
            try:
                self._nft(c.nft_down)
            except RuntimeError:
                pass
        if c.exclusive:
            self.stop(c)
            if c.cleanup:
                try:
                    subprocess.run(in_ns(self.topo.node_ns, list(c.cleanup)), capture_output=True,
                                   timeout=60, cwd=self.repo)
                except subprocess.TimeoutExpired:
                    pass  # the namespace goes at teardown anyway

    def measure_control(self, w: Workload) -> Measurement:
        """pyproxy's control plane in the node namespace (`bench.controlplane`), once."""
        backends = ",".join(f"{h}:{p}" for h, p in self.backend_targets())
        argv = in_ns(self.topo.node_ns, self._py("-m", "bench.controlplane", *w.args, "--backends", backends,
                                                 "--node-address", NODE_ADDR, "--json"))
        t0 = time.monotonic()
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=self.repo)
        except subprocess.TimeoutExpired:
            return Measurement(w.name, "control", "pyproxy", 1, error="control-plane run exceeded 300 s")
        (self.workdir / "load").mkdir(exist_ok=True)
        (self.workdir / "load" / f"{w.name}.json").write_text(done.stdout + done.stderr)
        try:
            summary = json.loads(done.stdout)["summary"]
        except (ValueError, KeyError):
            return Measurement(w.name, "control", "pyproxy", 1, error=f"no result: {done.stderr.strip()[-300:]}")
        return Measurement(w.name, "control", "pyproxy", 1, summary=summary, wall_s=time.monotonic() - t0)

    def measure_restart(self, c: Contender, w: Workload, restarts: int = 2) -> Measurement:
        """`bench.restart` from the client while the contender is restarted `restarts` times,
        a second apart: pyproxy by a successor started beside it (`restart`: it takes over,
        the old one drains and exits) or by kill -9 of its serving process (`crash`: the supervisor
        starts the next one on the listeners it holds); dnat has no
        process, its rules and conntrack are the kernel's and stay (kube-proxy's restart).
        `w.duration` bounds the whole run."""
        tag = f"{w.name}-{c.id}"
        out_path, log_path = self.workdir / "load" / f"{tag}.json", self.workdir / "load" / f"{tag}.log"
        stop = self.workdir / "load" / f"{tag}.stop"
        out_path.parent.mkdir(exist_ok=True)
        for path in (out_path, stop, Path(f"{stop}.ready")):
            path.unlink(missing_ok=True)
        argv = in_ns(self.topo.client_ns, self._py("-m", "bench.restart", "--target", f"{c.target[0]}:{c.target[1]}",
                                                    "--duration", f"{w.duration:g}", "--stop-file", str(stop), *w.args))
        t0 = time.monotonic()
        load = self.registry.start(f"load-{tag}", argv, log_path, cwd=self.repo, stdout=out_path)
        error = ""
        while load.alive() and not Path(f"{stop}.ready").exists() and time.monotonic() < t0 + 20:
            time.sleep(0.05)
        for _ in range(restarts):
            time.sleep(1.0)
            if c.family == "pyproxy" and not error:
                error = self._restart(c, w.mode)
        time.sleep(1.0)
        stop.touch()
        while load.alive() and time.monotonic() < t0 + w.duration + 60:
            time.sleep(0.1)
        if load.alive():
            error = error or "restart run exceeded its time bound"
        self.registry.stop(load)
        summary: dict[str, object] = {}
        try:
            summary = {**json.loads(out_path.read_text())["summary"], "restarts": restarts}
        except (OSError, ValueError, KeyError) as exc:
            error = error or f"no result from bench.restart ({type(exc).__name__}): {load.log_tail(3)}"
        return Measurement(workload=w.name, mode=w.mode, contender=c.id, round=1, error=error, summary=summary,
                           wall_s=time.monotonic() - t0)

    def _restart(self, c: Contender, how: str) -> str:
        """Restart a pyproxy contender; return once the new process serves ('' or the reason not)."""
        old = self.proc(c)
        if old is None or not old.alive():
            return f"{c.id} is not running"
        log = self.workdir / c.id / "run.log"
        mark = "pyproxy serving on node" if how == "crash" else "this process stopped accepting"
        before = log.read_text().count(mark) if log.exists() else 0
        if how == "crash":  # kill -9 of the serving process(es); the supervisor starts the next one
            serving = _serving_pids(state_dir(c.id))
            if not serving:
                return f"{c.id}: no serving process in its supervisor.json"
            for pid in serving:
                procs.kill_pid(pid)
        else:
            self.registry.start(c.id, self._proxy_argv(c), log, cwd=self.repo)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if log.read_text().count(mark) > before:
                return ""
            time.sleep(0.02)
        return f"{c.id}: not serving again within 20 s"

    def backend_cpu(self) -> float:
        return sum(procs.cpu_seconds(p.pid) for p in self.registry.started if p.name.startswith("backend-"))

    def measure(self, c: Contender, w: Workload, round_no: int, rate: float | None) -> Measurement:
        proc = self.proc(c)
        root = proc.pid if proc is not None else None
        sources = self.topo.source_list if w.use_sources else ""
        extra = ["--remove-hook", shlex.join(c.remove_hook), "--removed-name", f"be{self.topo.backends}"] \
            if w.mode == "affinity" and c.remove_hook and self.topo.backends > 1 else []
        target = c.target_for(w.port)
        assert target is not None  # run_rounds measures only contenders that serve the port
        argv = in_ns(self.topo.client_ns, self._pinned(1, self._py(
            "-m", w.module, *w.load_args(target, sources, rate), *extra)))
        tag = f"{w.name}-{c.id}-r{round_no}"
        out_path, log_path = self.workdir / "load" / f"{tag}.json", self.workdir / "load" / f"{tag}.log"
        out_path.parent.mkdir(exist_ok=True)
        pss0 = procs.pss_bytes(root) if root and w.mode == "idle" else None
        by0 = procs.cpu_by_process(root) if root else {}
        cpu0, be0, t0 = procs.cpu_seconds(root) if root else None, self.backend_cpu(), time.monotonic()
        busy0 = procs.machine_busy_seconds()
        load = self.registry.start(f"load-{tag}", argv, log_path, cwd=self.repo, stdout=out_path)
        peak, error = pss0, ""
        bound = t0 + (2 if w.mode in ("idle", "affinity") else 1) * w.duration + 2 * 5.0 + LOAD_SLACK_S
        while load.alive() and time.monotonic() < bound:
            time.sleep(0.25)
            if pss0 is not None and root:
                peak = max(peak or 0, procs.pss_bytes(root))
        if load.alive():
            error = "load run exceeded its time bound"
        self.registry.stop(load)
        cpu1, be1, wall = procs.cpu_seconds(root) if root else None, self.backend_cpu(), time.monotonic() - t0
        busy = procs.machine_busy_seconds() - busy0
        by_process = procs.busiest_deltas(by0, procs.cpu_by_process(root)) if root else {}
        summary: dict[str, object] = {}
        try:
            doc = json.loads(out_path.read_text())
            summary = {**doc["summary"], **(doc.get("affinity") or {})}
        except (OSError, ValueError, KeyError) as exc:
            error = error or f"no result from the load tool ({type(exc).__name__}): {load.log_tail(3)}"
        return Measurement(
            workload=w.name, mode=w.mode, contender=c.id, round=round_no, error=error, summary=summary,
            proxy_cpu_s=(cpu1 - cpu0) if cpu0 is not None and cpu1 is not None else None,
            backend_cpu_s=be1 - be0, wall_s=wall, pss_before=pss0, pss_peak=peak, rate=rate,
            proxy_cpu_by_process=by_process, machine_cpu_s=busy)


def _serving_pids(state: Path) -> list[int]:
    """The pids serving a pyproxy's slots (its supervisor writes them: pyproxy/lifecycle/master.py)."""
    try:
        slots = json.loads((state / "supervisor.json").read_text()).get("slots", {})
    except (OSError, ValueError):
        return []
    return [int(s["pid"]) for s in slots.values() if s.get("pid") and s.get("state") == "serving"]
