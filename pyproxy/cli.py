"""Command line: kube-proxy's flags where they carry over; `pyproxy demo` runs the demo and
`pyproxy inspect` shows what the local proxy is doing.

`main(argv) -> int` holds all the logic; the console script, `python -m pyproxy` and
`cmd/pyproxy` only call it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pyproxy.config import (
    DETECT_LOCAL_MODES,
    EVENT_LOOPS,
    ConfigError,
    ProxyConfig,
    dump_config,
    load_config,
    validate,
)

log = logging.getLogger("pyproxy")


SUBCOMMANDS = """commands:
  pyproxy demo [--only s1,s2,s3,s5,s7,dns]
                        play SCENARIOS.md on a throwaway cluster of network namespaces (root)
  pyproxy inspect services|endpoints|affinity|connections [-o wide|json]
                        show what the pyproxy on this node is doing (its debug API)
  see 'pyproxy demo --help' and 'pyproxy inspect --help'"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pyproxy",
        usage="pyproxy [options]\n       pyproxy demo [--only SCENES]\n       pyproxy inspect KIND [-o wide|json]",
        description="A userspace kube-proxy replacement.",
        epilog=SUBCOMMANDS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="versioned YAML config file (PyProxyConfiguration)")
    p.add_argument("--write-config-to", metavar="FILE", help="write the effective config ('-' for stdout) and exit")
    p.add_argument("--manifests", metavar="DIR", help="standalone: Service/EndpointSlice YAML files, reloaded on change")
    p.add_argument("--kubeconfig", help="cluster mode: kubeconfig file")
    p.add_argument("--master", help="cluster mode: API server address, overrides the kubeconfig's")
    p.add_argument("--hostname-override", help="this node's name (default: the hostname)")
    p.add_argument("--healthz-bind-address", help="host:port of /healthz and /livez (default 0.0.0.0:10256)")
    p.add_argument("--metrics-bind-address", help="host:port of /metrics (default 127.0.0.1:10249)")
    p.add_argument("--nodeport-addresses",
                   help="comma-separated CIDRs and keywords (primary: the Node object's primary IPs; all) "
                        "whose local addresses serve NodePorts (default: every local address)")
    p.add_argument("--cluster-cidr", help="comma-separated pod CIDRs: traffic from them counts as in-cluster")
    p.add_argument("--detect-local-mode", choices=DETECT_LOCAL_MODES,
                   help="how this node's pods are told apart (default ClusterCIDR; NodeCIDR reads the Node's podCIDRs)")
    p.add_argument("--pod-bridge-interface", help="detect-local-mode BridgeInterface: the pods' bridge")
    p.add_argument("--pod-interface-name-prefix",
                   help="detect-local-mode InterfaceNamePrefix: the prefix of the pods' interface names")
    p.add_argument("--proxy-port", type=int, help="local port of the transparent listeners (default 15001)")
    p.add_argument("--relay", choices=("splice",),
                   help="TCP byte path (dataplane.relay): splice, the only one since the Protocol relay was removed")
    p.add_argument("--pure-python", action="store_true",
                   help="run the pure-Python twins of the compiled helpers (as where no compiler built them; "
                        "the same as PYPROXY_PURE_PYTHON=1)")
    p.add_argument("--workers", type=int, help="worker processes sharing the listener (dataplane.workers; default 1)")
    p.add_argument("--state-dir", help="hand-over socket and state snapshot (lifecycle.stateDir; default /run/pyproxy)")
    p.add_argument("--cleanup", action="store_true", help="remove everything pyproxy installed, then exit")
    p.add_argument("--event-loop", choices=EVENT_LOOPS,
                   help="event loop: uvloop, asyncio, or auto (uvloop when installed; the default)")
    p.add_argument("-v", "--v", dest="verbosity", type=int, default=0, help="log verbosity (0-5; default 0)")
    return p


def effective_config(args: argparse.Namespace) -> ProxyConfig:
    """The config file (or defaults), with the flags given on the command line on top."""
    config = load_config(Path(args.config).read_text(), args.config) if args.config else ProxyConfig()
    top: dict[str, Any] = {}
    for flag, name in (
        ("hostname_override", "hostnameOverride"),
        ("healthz_bind_address", "healthzBindAddress"),
        ("metrics_bind_address", "metricsBindAddress"),
        ("cluster_cidr", "clusterCIDR"),
        ("manifests", "manifests"),
        ("event_loop", "eventLoop"),
        ("detect_local_mode", "detectLocalMode"),
    ):
        value = getattr(args, flag)
        if value is not None:
            top[name] = value
    if args.nodeport_addresses is not None:
        top["nodePortAddresses"] = tuple(c.strip() for c in args.nodeport_addresses.split(",") if c.strip())
    detect = config.detectLocal
    if args.pod_bridge_interface is not None:
        detect = dataclasses.replace(detect, bridgeInterface=args.pod_bridge_interface)
    if args.pod_interface_name_prefix is not None:
        detect = dataclasses.replace(detect, interfaceNamePrefix=args.pod_interface_name_prefix)
    top["detectLocal"] = detect
    client = config.clientConnection
    if args.kubeconfig is not None:
        client = dataclasses.replace(client, kubeconfig=args.kubeconfig)
    if args.master is not None:
        client = dataclasses.replace(client, apiServer=args.master)
    dataplane = config.dataplane
    if args.proxy_port is not None:
        dataplane = dataclasses.replace(dataplane, tcpProxyPort=args.proxy_port, udpProxyPort=args.proxy_port)
    if args.relay is not None:
        dataplane = dataclasses.replace(dataplane, relay=args.relay)
    if args.workers is not None:
        dataplane = dataclasses.replace(dataplane, workers=args.workers)
    lifecycle = config.lifecycle
    if args.state_dir is not None:
        lifecycle = dataclasses.replace(lifecycle, stateDir=args.state_dir)
    config = dataclasses.replace(config, clientConnection=client, dataplane=dataplane, lifecycle=lifecycle, **top)
    validate(config)
    return config


def setup_logging(verbosity: int) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if verbosity >= 4 else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from pyproxy.demo.main import main as demo_main

        return demo_main(argv[1:])
    if argv[:1] == ["inspect"]:
        from pyproxy.inspect.cli import main as inspect_main

        return inspect_main(argv[1:])
    args = build_parser().parse_args(argv)
    setup_logging(args.verbosity)
    if args.pure_python:  # read when pyproxy.dataplane is first imported, which is below
        os.environ["PYPROXY_PURE_PYTHON"] = "1"
    try:
        config = effective_config(args)
    except (ConfigError, OSError) as err:
        log.error("invalid configuration: %s", err)
        return 2
    if args.write_config_to:
        text = dump_config(config)
        if args.write_config_to == "-":
            sys.stdout.write(text)
        else:
            Path(args.write_config_to).write_text(text)
        return 0
    if args.cleanup:
        return cleanup(config)
    return run(config)


def run(config: ProxyConfig) -> int:
    """The supervisor (pyproxy/lifecycle/master.py) holds the listeners and runs the serving
    processes, `--workers N` of them, as its children, starting another when one dies."""
    from pyproxy.lifecycle.master import Master

    def preload() -> None:  # in the supervisor, once: its children share these pages (copy-on-write)
        import pyproxy.app  # noqa: F401
        import pyproxy.sources.manifests  # noqa: F401

        if not config.manifests:  # the API client (standard library HTTP: kube_http)
            import pyproxy.sources.kube  # noqa: F401
            import pyproxy.sources.kube_http  # noqa: F401
        if config.eventLoop != "asyncio":
            try:
                import uvloop  # noqa: F401
            except ImportError:
                pass

    def prepare() -> None:  # in each child: what must not be shared (a warm standby does it beforehand)
        from pyproxy.dataplane.routing import warm_up

        preload()  # imported already (the supervisor's preload): cheap, and kept for a child without it
        warm_up()  # pyroute2 loads most of itself at the first netlink socket

    def serve(worker: Any, early: dict[str, Any], link: Any) -> int:
        from pyproxy.app import ProxyApp, StartupError
        from pyproxy.sources.manifests import ManifestError

        async def _main() -> int:
            return await ProxyApp(config, worker, early=early, link=link).run()

        try:
            return _run_loop(_main(), config.eventLoop)
        except (StartupError, ManifestError) as err:
            log.error("cannot start: %s", err)
            return 1
        except PermissionError as err:
            log.error("cannot start: %s (pyproxy needs root or CAP_NET_ADMIN)", err)
            return 1

    try:
        return Master(config, serve, prepare, preload=preload).run()
    except PermissionError as err:
        log.error("cannot start: %s (pyproxy needs root or CAP_NET_ADMIN)", err)
        return 1


def _run_loop(coro: Any, event_loop: str = "auto") -> int:
    if event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:  # asyncio is the fallback event loop
            if event_loop == "uvloop":
                raise
        else:
            log.info("event loop: uvloop")
            return int(uvloop.run(coro))
    log.info("event loop: asyncio")
    return int(asyncio.run(coro))


def cleanup(config: ProxyConfig) -> int:
    from pyproxy.app import policy_routing
    from pyproxy.dataplane.nft import render_bridge_cleanup, render_cleanup
    from pyproxy.dataplane.routing import release_reply_mac

    result = subprocess.run(["nft", "-f", "-"], input=render_cleanup(), text=True, capture_output=True)
    if result.returncode != 0:
        log.error("removing nftables table failed: %s", result.stderr.strip())
        return 1
    # the bridge family's table exists only on a node with pod bridges (a kernel without the
    # family refuses even to name it): its own transaction, and a failure is no error
    bridge = subprocess.run(["nft", "-f", "-"], input=render_bridge_cleanup(), text=True, capture_output=True)
    if bridge.returncode != 0:
        log.debug("no bridge table removed: %s", bridge.stderr.strip())
    release_reply_mac(config.dataplane.podBridges)
    policy_routing(config).remove()
    log.info("removed pyproxy's nftables table and policy routing")
    return 0


def main_exit() -> None:
    sys.exit(main())
