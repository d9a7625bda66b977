"""`cmd/kind demo`: SCENARIOS.md walked through in the kind cluster, printed as a user sees it.

Rules it keeps: it runs against the cluster `cmd/kind up` made (pyproxy applied), applies the
same scenario YAML the kind tier uses, and prints each command with the pods that answered
and the client address they saw. It asserts nothing; the kind tier does. It leaves the
scenario objects in place for a look around (`cmd/kind kubectl get svc,pods`).
"""

from __future__ import annotations

from collections import Counter

from tests.kind import scenarios as sc
from tests.kind.cluster import Cluster


def show(title: str, answers: list[sc.Answer]) -> None:
    counts = Counter(f"{a.pod}  ClientIP={a.client_ip}" if a.pod else a.error for a in answers)
    print(f"  {title}")
    for line, n in counts.most_common():
        print(f"    {n:4d}  {line}")


def main(cluster: Cluster) -> int:
    print("== applying the scenarios' Deployments and Services")
    sc.apply_all(cluster)
    url = "http://sample-session-affinity:8080/"

    print("\n== S1: ClientIP affinity, timeoutSeconds 10 (kubectl exec client-cp -- curl ...)")
    first = sc.from_pod(cluster, "client-cp", url, count=5, pause_s=1)
    show("5 requests, 1 s apart:", first)
    pod = first[0].pod or ""
    tries, moved = sc.fresh_pick_after_timeout(cluster, "client-cp", url, pod, timeout_s=10)
    print(f"  then 11.5 s of silence before each request: a fresh pick landed on {moved} "
          f"after {tries} silence(s) (each fresh pick may land on the same pod again)")

    print("\n== S2: kubectl patch ... sessionAffinity None, then ClientIP again")
    sc.patch_service(cluster, "sample-session-affinity", {"sessionAffinity": "None"})
    show("None: 30 requests", sc.from_pod(cluster, "client-worker", url, count=30))
    sc.patch_service(cluster, "sample-session-affinity", {"sessionAffinity": "ClientIP"})
    show("ClientIP: 10 requests", sc.from_pod(cluster, "client-worker", url, count=10))

    print("\n== S3: 100 requests to webpod (ClientIP, default timeout) | sort | uniq -c")
    show("", sc.from_pod(cluster, "client-worker", "http://webpod/", count=100))

    outside = sc.outside_address(cluster)
    nodes = {n.name: n.address for n in cluster.nodes()}
    print(f"\n== S5: NodePorts from a host outside the cluster ({outside})")
    for name, ip in nodes.items():
        show(f"Local   curl http://{ip}:30085/  ({name})", sc.from_outside(cluster, f"http://{ip}:30085/", 6))
    show(f"Cluster curl http://{nodes['kind-control-plane']}:30086/",
         sc.from_outside(cluster, f"http://{nodes['kind-control-plane']}:30086/", 9))
    show(f"LoadBalancer Local, worker pods only, via {nodes['kind-control-plane']}:30087 (dropped)",
         sc.from_outside(cluster, f"http://{nodes['kind-control-plane']}:30087/", 1))

    print("\n== S7: multi-port Service (80 -> 8080, 443 -> 8443)")
    for port in (80, 443):
        show(f"curl http://multi:{port}/", sc.from_pod(cluster, "client-cp", f"http://multi:{port}/", 3))

    print("\n== S8: cluster DNS through the kube-dns ClusterIP (UDP, then TCP)")
    for transport in ("+notcp", "+tcp"):
        out = cluster.kubectl("exec", "client-cp", "--", "dig", "+short", transport,
                              "webpod.default.svc.cluster.local").stdout.strip()
        print(f"  dig {transport} webpod.default.svc.cluster.local -> {out}")
    return 0
