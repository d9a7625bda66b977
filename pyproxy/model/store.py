"""The proxy's view of the cluster, and the change tracker that feeds syncs.

Rules kept here (kube-proxy's change trackers, STYLE.md):
- Sources only record: an upsert, a delete, or a whole snapshot. An update that changes
  nothing is dropped and marks nothing.
- `take_changes()` hands out the set of Services whose proxying may differ since the last
  call, and forgets them; the sync applies exactly those.
- `synced` is false until every source has delivered its first complete list: the data
  plane is never programmed from partial data.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from pyproxy.model.objects import EndpointSlice, Node, Service, ServiceKey

SliceKey = tuple[str, str]


class ClusterStore:
    def __init__(self) -> None:
        self.services: dict[ServiceKey, Service] = {}
        self.slices: dict[SliceKey, EndpointSlice] = {}
        self.node: Node | None = None
        self._slices_by_service: dict[ServiceKey, dict[SliceKey, EndpointSlice]] = defaultdict(dict)
        self._changed: set[ServiceKey] = set()
        self._node_changed = False
        self.services_synced = False
        self.slices_synced = False
        self.node_listed = False  # the Node has been looked for once (found or not)

    @property
    def synced(self) -> bool:
        return self.services_synced and self.slices_synced

    def slices_of(self, key: ServiceKey) -> Iterable[EndpointSlice]:
        return self._slices_by_service.get(key, {}).values()

    def upsert_service(self, key: ServiceKey, service: Service | None) -> None:
        """Record a Service's current form; None means it is gone or not ours."""
        previous = self.services.get(key)
        if previous == service:
            return
        if service is None:
            del self.services[key]
        else:
            self.services[key] = service
        self._changed.add(key)

    def upsert_slice(self, key: SliceKey, endpoint_slice: EndpointSlice | None) -> None:
        previous = self.slices.get(key)
        if previous == endpoint_slice:
            return
        if previous is not None:
            self._slices_by_service[previous.service].pop(key, None)
            if not self._slices_by_service[previous.service]:
                del self._slices_by_service[previous.service]
            self._changed.add(previous.service)
        if endpoint_slice is None:
            self.slices.pop(key, None)
        else:
            self.slices[key] = endpoint_slice
            self._slices_by_service[endpoint_slice.service][key] = endpoint_slice
            self._changed.add(endpoint_slice.service)

    def set_node(self, node: Node | None) -> None:
        self.node_listed = True
        if node != self.node:
            # topology hints depend on the zone, source-range firewalls on the node's IPs:
            # when either changes, every service may change
            reaches_services = _service_facts(node) != _service_facts(self.node)
            self.node = node
            self._node_changed = True
            if reaches_services:
                self._changed.update(self.services)

    def replace_all(self, services: Iterable[Service], slices: Iterable[EndpointSlice]) -> None:
        """Install a complete snapshot (standalone manifests, or a re-list)."""
        self.replace_services(services)
        self.replace_slices(slices)

    def replace_services(self, services: Iterable[Service]) -> None:
        fresh = {s.key: s for s in services}
        for key in set(self.services) - set(fresh):
            self.upsert_service(key, None)
        for key, service in fresh.items():
            self.upsert_service(key, service)
        self.services_synced = True

    def replace_slices(self, slices: Iterable[EndpointSlice]) -> None:
        fresh = {s.key: s for s in slices}
        for key in set(self.slices) - set(fresh):
            self.upsert_slice(key, None)
        for key, endpoint_slice in fresh.items():
            self.upsert_slice(key, endpoint_slice)
        self.slices_synced = True

    def mark_all_changed(self) -> None:
        self._changed.update(self.services)

    @property
    def has_changes(self) -> bool:
        return bool(self._changed) or self._node_changed

    def take_changes(self) -> set[ServiceKey]:
        changed, self._changed = self._changed, set()
        self._node_changed = False
        return changed


def _service_facts(node: Node | None) -> tuple[str | None, tuple[str, ...]]:
    """What of the Node the service table reads: its zone and its primary IPs."""
    return (node.zone, node.host_ips) if node else (None, ())
