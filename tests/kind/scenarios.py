"""What a user does in the kind cluster, as functions: apply, curl from a pod, curl from outside.

Rules it keeps:
- Every action is what the write-ups do by hand: `kubectl apply -f` of the scenario YAML in
  manifests/, `kubectl exec <client> -- curl ...`, `kubectl patch`, curl from a host outside the
  cluster (the docker daemon's namespace, on the nodes' network). The kind tier asserts on
  what they return; `cmd/kind demo` prints it.
- Answers are parsed from the echo pod's one line (`From=<pod>  ClientIP=<ip>`); a request that
  fails is an `Answer` with `pod=None`, never an exception, so a loop can count failures.
- Every loop is bounded in count and time.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.kind.cluster import Cluster

MANIFESTS = Path(__file__).resolve().parent / "manifests"
CLIENTS = {"kind-control-plane": "client-cp", "kind-worker": "client-worker"}
ANSWER = re.compile(r"From=(\S+)\s+ClientIP=(\S+)")


@dataclass(frozen=True)
class Answer:
    pod: str | None
    client_ip: str | None
    error: str = ""


def parse(text: str) -> list[Answer]:
    """One Answer per line of curl output (`FAIL <reason>` lines from the loops below)."""
    answers = []
    for line in text.splitlines():
        match = ANSWER.search(line)
        if match:
            answers.append(Answer(match.group(1), match.group(2)))
        elif line.startswith("FAIL"):
            answers.append(Answer(None, None, line))
    return answers


def apply(cluster: Cluster, name: str) -> None:
    cluster.kubectl("apply", "-f", str(MANIFESTS / name))


FILES = ("pods.yaml", "s1.yaml", "s3.yaml", "s5.yaml", "s6-s7.yaml")
DEPLOYMENTS = ("sample-deployment", "webpod", "s5-cp", "s5-worker", "named", "multi")


def apply_all(cluster: Cluster) -> None:
    """Every scenario's YAML, applied; returns once the clients and echo pods are Ready."""
    for name in FILES:
        apply(cluster, name)
    wait_pods(cluster, "app=client")
    wait_rollout(cluster, *DEPLOYMENTS)


def wait_rollout(cluster: Cluster, *deployments: str, timeout_s: int = 120) -> None:
    for d in deployments:
        cluster.kubectl("rollout", "status", f"deployment/{d}", f"--timeout={timeout_s}s", timeout=timeout_s + 10)


def wait_pods(cluster: Cluster, selector: str, timeout_s: int = 120) -> None:
    cluster.kubectl("wait", "--for=condition=Ready", "pod", "-l", selector, f"--timeout={timeout_s}s",
                    timeout=timeout_s + 10)


# A failed curl says how far it got (name lookup, connect, total, in seconds), so a timeout
# shows whether the name, the connection or the answer took the time.
CURL = ("out=$(curl -s --max-time 3 -w ' T=%{{time_namelookup}}/%{{time_connect}}/%{{time_total}}' {url}); rc=$?; "
        "if [ $rc = 0 ]; then echo \"$out\"; else echo \"FAIL $rc$out\"; fi")


def curl_loop(url: str, count: int, pause_s: float = 0.0) -> str:
    """A shell loop of `count` curls (one line each), `pause_s` apart."""
    body = CURL.format(url=url)
    if pause_s:
        body += f"; sleep {pause_s}"
    return f"for i in $(seq {count}); do {body}; done"


def from_pod(cluster: Cluster, client: str, url: str, count: int = 1, pause_s: float = 0.0) -> list[Answer]:
    """`kubectl exec <client> -- sh -c '<curl loop>'`."""
    timeout = 30 + count * (3.5 + pause_s)
    out = cluster.kubectl("exec", client, "--", "sh", "-c", curl_loop(url, count, pause_s), timeout=timeout)
    return parse(out.stdout)


def from_outside(cluster: Cluster, url: str, count: int = 1) -> list[Answer]:
    """curl from a host outside the cluster: the docker daemon's namespace."""
    answers = []
    for _ in range(count):
        proc = cluster.netns_run("curl", "-s", "--max-time", "3", url, timeout=10)
        got = parse(proc.stdout)
        answers.append(got[0] if got else Answer(None, None, f"FAIL curl exit {proc.returncode}"))
    return answers


def outside_address(cluster: Cluster) -> str:
    """The outside host's address on the nodes' network (the kind network's gateway)."""
    out = cluster.node_exec("kind-control-plane", "ip", "-j", "route", "show", "default")
    return str(json.loads(out)[0]["gateway"])


def patch_service(cluster: Cluster, name: str, spec: dict[str, object]) -> None:
    cluster.kubectl("patch", "service", name, "-p", json.dumps({"spec": spec}))


def cluster_ip(cluster: Cluster, name: str) -> str:
    return cluster.kubectl("get", "service", name, "-o", "jsonpath={.spec.clusterIP}").stdout.strip()


def pods_of(cluster: Cluster, selector: str) -> dict[str, str]:
    """name -> node of the running pods matching `selector`."""
    out = json.loads(cluster.kubectl("get", "pods", "-l", selector, "-o", "json").stdout)
    return {p["metadata"]["name"]: p["spec"].get("nodeName", "") for p in out["items"]
            if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")}


def until(check: Callable[[], bool], timeout_s: float, step_s: float = 0.5) -> bool:
    """Poll `check` until it is true or `timeout_s` passes; returns the last result."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(step_s)
    return check()


def fresh_pick_after_timeout(cluster: Cluster, client: str, url: str, first: str,
                             timeout_s: float, tries: int = 8) -> tuple[int, str | None]:
    """S1's second half: wait out the affinity timeout, curl again, until another pod answers.

    Returns (tries used, the pod that answered last). Each try waits timeout_s + 1.5 s of silence.
    """
    pod: str | None = first
    for attempt in range(1, tries + 1):
        time.sleep(timeout_s + 1.5)
        got = from_pod(cluster, client, url)
        pod = got[0].pod if got else None
        if pod is not None and pod != first:
            return attempt, pod
    return tries, pod
