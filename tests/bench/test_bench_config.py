"""Contender configs, the namespace plan, the wire protocol and /proc parsing (all pure)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bench.loadtool import protocol as proto
from bench.runner import contenders as ct
from bench.runner.procs import busiest_deltas, parse_machine_busy, parse_pss_kib, parse_stat
from bench.runner.topology import Topology, commands, source_batch
from bench.runner.workloads import full, quick, select

BACKENDS = [("10.201.1.2", 8080), ("10.201.2.2", 8080)]


def test_header_round_trip_and_validation() -> None:
    h = proto.rr(64, 128)
    assert len(h.pack()) == proto.HEADER_SIZE == 9
    assert proto.unpack_header(h.pack()) == h
    for bad in (proto.Header(b"Z"), proto.Header(proto.REQUEST_RESPONSE, 0, 1),
                proto.Header(proto.SOURCE, 0, 0), proto.Header(proto.SINK, proto.MAX_MESSAGE + 1)):
        with pytest.raises(proto.ProtocolError):
            proto.unpack_header(bad.pack())
    assert proto.responses_due(130, 64) == (2, 2)


def test_dnat_ruleset_has_kube_proxy_shape() -> None:
    text = ct.dnat_ruleset(("10.96.0.20", 80), BACKENDS)
    assert "table ip pbbench" in text
    assert "type ipv4_addr . inet_proto . inet_service : verdict" in text
    assert "10.96.0.20 . tcp . 80 : goto service-default-bench-tcp" in text
    assert "numgen random mod 2 vmap { 0 : goto endpoint-0, 1 : goto endpoint-1 }" in text
    assert "dnat to 10.201.2.2:8080" in text


def test_haproxy_and_nginx_configs() -> None:
    hap = ct.haproxy_config(2, ("10.200.0.1", 8002), BACKENDS)
    assert "nbthread 2" in hap and "option splice-auto" in hap and "mode tcp" in hap
    assert "bind 10.200.0.1:8002" in hap and "server be2 10.201.2.2:8080" in hap
    ngx = ct.nginx_config(2, ("10.200.0.1", 8004), BACKENDS, Path("/w"), nofile=20000)
    assert "worker_processes 2;" in ngx and "reuseport" in ngx and "daemon off;" in ngx
    assert "worker_connections 19900;" in ngx and "proxy_half_close on;" in ngx


def test_pyproxy_manifest_matches_the_brief() -> None:
    service, eps = list(yaml.safe_load_all(ct.pyproxy_manifest(["10.201.1.2", "10.201.2.2"])))
    assert service["spec"]["clusterIP"] == "10.96.0.10"
    assert service["spec"]["ports"] == [{"name": "", "protocol": "TCP", "port": 80, "targetPort": 8080}]
    assert eps["metadata"]["labels"] == {"kubernetes.io/service-name": "bench"}
    assert eps["addressType"] == "IPv4"
    assert eps["endpoints"][1] == {"addresses": ["10.201.2.2"], "conditions": {"ready": True}, "nodeName": "node2"}


def test_build_and_select() -> None:
    all_ = ct.build(ct.FAMILIES, "10.200.0.1", BACKENDS, Path("/w"))
    ids = [c.id for c in all_]
    assert ids == ["direct", "dnat", "haproxy-1t", "haproxy-2t", "nginx-1w", "nginx-2w", "socat",
                   "pyproxy", "pyproxy-pure", "pyproxy-2w"]
    shared = [c for c in all_ if not c.exclusive]
    assert len({c.target for c in shared}) == len(shared)  # the persistent ones never share an address:port
    for py in all_[-3:]:  # the pyproxy variants run one at a time, on the same ClusterIP
        assert py.exclusive and "--hostname-override" in py.argv and py.cleanup
    assert all_[-1].argv[-2:] == ("--workers", "2")
    assert all_[-2].argv[-1] == "--pure-python"
    # the C tools' ports: every contender but socat serves them, each on its own address:port
    c_targets = [c.target_for(p) for c in shared if c.family != "socat" for p in ct.C_PORTS]
    assert None not in c_targets and len(set(c_targets)) == len(c_targets)
    assert all_[0].target_for(ct.IPERF_PORT) == ("10.201.1.2", ct.IPERF_PORT)  # iperf3: backend 1 only
    assert all_[6].target_for(ct.HTTP_PORT) is None
    assert [c.id for c in ct.select(all_, "haproxy,direct")] == ["direct", "haproxy-1t", "haproxy-2t"]
    assert [c.id for c in ct.select(all_, "nginx-2w")] == ["nginx-2w"]
    assert [c.id for c in ct.select(all_, "pyproxy")] == ["pyproxy"]  # the id (the default), not the family
    assert [c.id for c in ct.select(all_, "pyproxy,pyproxy-2w")] == ["pyproxy", "pyproxy-2w"]
    with pytest.raises(ValueError):
        ct.select(all_, "envoy")


def test_pyproxy_variants_and_relayrig_use_the_splice_relay_only() -> None:
    from bench.rigs import relayrig

    assert not any("--relay" in args for _, args in ct.PYPROXY_VARIANTS)  # the Protocol relay is gone
    assert not hasattr(relayrig, "Relay")
    with pytest.raises(SystemExit) as exit_:
        relayrig.main(["--relay", "protocol", "--backend", "127.0.0.1:9"])
    assert exit_.value.code == 2


def test_topology_plan_stays_inside_its_namespaces() -> None:
    t = Topology("pb42-", backends=2, sources=4)
    cmds = commands(t)
    assert t.namespaces == ("pb42-cl", "pb42-nd", "pb42-b1", "pb42-b2")
    for cmd in cmds:
        assert cmd[:3] == ["ip", "netns", "add"] or any(a.startswith("pb42-") for a in cmd), cmd
    veths = [c for c in cmds if c[:3] == ["ip", "link", "add"]]
    assert all(c.count("netns") == 2 for c in veths)  # both ends born inside namespaces
    assert source_batch(t).count("addr add") == 4
    assert t.source_list == "10.200.1.1,10.200.1.2,10.200.1.3,10.200.1.4"
    with pytest.raises(ValueError):
        Topology("pb42-", backends=0)


def test_workload_sets() -> None:
    q = quick()
    assert [w.name for w in q] == ["stream-1", "crr-wrk", "latency@50%", "idle", "affinity", "control@10k", "restart"]
    assert q[2].ref == "crr-wrk"
    assert q[-1].contenders == ("dnat", "pyproxy")  # the smoke restarts the default pyproxy and its kernel baseline
    names = [w.name for w in full()]
    assert names[-2:] == ["restart", "crash"]
    assert names.index("crr") < names.index("latency@25%")
    assert names.index("crr-wrk") < names.index("latency@75%-fortio")
    fortio = full()[names.index("latency@75%-fortio")]
    assert fortio.load_args(("10.96.0.12", 80), "", rate=900.0) == [
        "fortio-crr", "--target", "10.96.0.12:80", "--duration", "5", "--json", "--rate", "900"]
    assert fortio.module == "bench.cload" and q[0].module == "bench.load"
    argv = q[2].load_args(("10.96.0.10", 80), "10.200.1.1", rate=1234.4)
    assert argv[:3] == ["latency", "--target", "10.96.0.10:80"] and argv[-2:] == ["--rate", "1234"]
    assert [w.name for w in select(full(), "stream")] == ["stream-1", "stream-4", "stream-iperf3"]
    assert [w.name for w in select(full(), "crr,idle")] == ["crr", "idle"]  # names first, then modes
    with pytest.raises(ValueError):
        select(q, "nope")


def test_proc_parsing() -> None:
    stat = "1234 (my (odd) proc) S 1 1234 1234 0 -1 4194560 100 0 0 0 50 25 3 2 20 0 1 0 100 1000 10"
    s = parse_stat(stat)
    assert (s.pid, s.ppid, s.cpu_ticks, s.comm) == (1234, 1, 80, "my (odd) proc")
    assert busiest_deltas({"1 a": 1.0, "2 b": 5.0}, {"1 a": 3.0, "2 b": 5.5, "3 c": 0.1}, top=2) == \
        {"1 a": 2.0, "2 b": 0.5}
    assert parse_pss_kib("Rss:  100 kB\nPss:   42 kB\n") == 42


def test_pyproxy_c_tool_services() -> None:
    docs = list(yaml.safe_load_all(ct.pyproxy_c_services(["10.201.1.2", "10.201.2.2"])))
    http, http_eps, iperf, iperf_eps = docs
    assert (http["spec"]["clusterIP"], http["spec"]["ports"][0]["targetPort"]) == (ct.PYPROXY_HTTP_IP, ct.HTTP_PORT)
    assert len(http_eps["endpoints"]) == 2
    assert iperf["spec"]["ports"][0]["port"] == ct.IPERF_PORT
    assert [e["addresses"] for e in iperf_eps["endpoints"]] == [["10.201.1.2"]]  # one iperf3 server
    assert iperf_eps["metadata"]["labels"] == {"kubernetes.io/service-name": "bench-iperf"}


def test_c_tool_listeners_in_haproxy_nginx_and_dnat() -> None:
    extra = ct.c_extra("10.200.0.1", 8001, BACKENDS)
    hap = ct.haproxy_config(1, ("10.200.0.1", 8001), BACKENDS, extra)
    assert "bind 10.200.0.1:8101" in hap and "server be2 10.201.2.2:8081" in hap
    assert "bind 10.200.0.1:8201" in hap and "10.201.2.2:5201" not in hap
    ngx = ct.nginx_config(1, ("10.200.0.1", 8003), BACKENDS, Path("/w"), extra=ct.c_extra("10.200.0.1", 8003, BACKENDS))
    assert "listen 10.200.0.1:8103 reuseport" in ngx and ngx.count("proxy_half_close on;") == 3
    nft = ct.dnat_ruleset(("10.96.0.20", 80), BACKENDS, extra=[(81, ct.c_backends(BACKENDS, ct.HTTP_PORT))])
    assert "10.96.0.20 . tcp . 81 : goto service-default-bench2-tcp" in nft and "dnat to 10.201.2.2:8081" in nft


def test_fixed_rates_of_fortios_own_maximum_come_after_it() -> None:
    names = [w.name for w in full()]
    assert names.index("crr-fortio") < names.index("latency@75%-fortio-max")
    w = full()[names.index("latency@75%-fortio-max")]
    assert (w.ref, w.tool, w.rate_fraction) == ("crr-fortio", "fortio-crr", 0.75)
    assert full()[names.index("crr-fortio")].tool == "fortio-max"


def test_machine_busy_ticks_leave_out_idle_and_iowait() -> None:
    text = ("cpu  100 5 40 9000 7 3 2 1 0 0\n"
            "cpu0 50 2 20 4500 3 1 1 0 0 0\n"
            "intr 12345\n")
    assert parse_machine_busy(text) == 100 + 5 + 40 + 3 + 2 + 1
    with pytest.raises(ValueError, match="no 'cpu' line"):
        parse_machine_busy("intr 1\n")
