"""`pyproxy inspect services|endpoints|affinity|connections`: the local proxy's debug API as tables.

It does one HTTP GET to the debug API of the pyproxy on this node (the metrics address:
`--address`, else `metricsBindAddress` of `--config`, else 127.0.0.1:10249) and prints a
kubectl-like table (`-o wide` for more columns) or the JSON page as it came (`-o json`).
Run it on the node, or with `kubectl exec` in the DaemonSet's pod (hostNetwork: the
loopback address is the node's). Exit status: 0 on an answer, 1 if the proxy cannot be
reached or answers an error (the message says which and why).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pyproxy.config import ConfigError, ProxyConfig, load_config, split_host_port
from pyproxy.model.family import join_host_port
from pyproxy.inspect.tables import render_page
from pyproxy.inspect.views import DEFAULT_LIMIT, KINDS

TIMEOUT = 10.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pyproxy inspect",
        description="Show what the pyproxy on this node is doing, from its debug API on the metrics address.",
    )
    p.add_argument("kind", choices=KINDS, help="what to list")
    p.add_argument("-o", "--output", choices=("table", "wide", "json"), default="table",
                   help="table (default), wide (more columns) or json (the API's page as it came)")
    p.add_argument("-n", "--namespace", help="only this namespace")
    p.add_argument("--service", help="only this Service (NAME or NAMESPACE/NAME)")
    p.add_argument("--client", help="only this client IP (affinity, connections)")
    p.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help=f"rows per page (default {DEFAULT_LIMIT})")
    p.add_argument("--offset", type=int, default=0, help="first row to show (default 0)")
    p.add_argument("--address", help="the proxy's metrics address HOST:PORT (default: from --config, else "
                                     "127.0.0.1:10249)")
    p.add_argument("--config", help="pyproxy's config file, to find metricsBindAddress")
    return p


def debug_url(address: str, kind: str, params: dict[str, str]) -> str:
    host, port = split_host_port(address, "address")
    if host in ("", "0.0.0.0"):  # a wildcard bind is reached on loopback
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    query = urllib.parse.urlencode(params)
    return f"http://{join_host_port(host, port)}/debug/{kind}" + (f"?{query}" if query else "")


def request_params(args: argparse.Namespace) -> dict[str, str]:
    params = {"namespace": args.namespace, "service": args.service, "client": args.client}
    out = {k: v for k, v in params.items() if v}
    out["limit"], out["offset"] = str(args.limit), str(args.offset)
    return out


def metrics_address(args: argparse.Namespace) -> str:
    if args.address:
        return str(args.address)
    if args.config:
        config = load_config(Path(args.config).read_text(), args.config)
    else:
        config = ProxyConfig()
    if not config.metricsBindAddress:
        raise ConfigError("metricsBindAddress", "is empty: this proxy serves no metrics and no debug API")
    return config.metricsBindAddress


def get(url: str) -> tuple[int, Any]:
    """(status, decoded JSON body) of a GET; OSError when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        with err:
            body = err.read()
        try:
            return err.code, json.loads(body)
        except ValueError:
            return err.code, {"error": body.decode(errors="replace").strip()}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        url = debug_url(metrics_address(args), args.kind, request_params(args))
    except (ConfigError, OSError) as err:
        print(f"pyproxy inspect: {err}", file=sys.stderr)
        return 1
    try:
        status, page = get(url)
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        print(f"pyproxy inspect: no answer from {url}: {reason} (is pyproxy running here, with its "
              "metrics address and debugAPI on?)", file=sys.stderr)
        return 1
    if status != 200:
        error = page.get("error", page) if isinstance(page, dict) else page
        print(f"pyproxy inspect: {url} answered {status}: {error}", file=sys.stderr)
        return 1
    if args.output == "json":
        sys.stdout.write(json.dumps(page, indent=1) + "\n")
    else:
        sys.stdout.write(render_page(args.kind, page, wide=args.output == "wide"))
    return 0
