"""The cluster source's interface to the API server, and its fallback on the official client.

Rules kept here:
- `Transport` is the only interface the watch loop sees (a fake implements it in tests).
  `kube_http.HttpTransport` implements it on the standard library (the serving path);
  `ClientTransport` implements it on the official, synchronous `kubernetes` client, only for
  kubeconfigs whose user needs an `auth-provider` plug-in, reading raw JSON
  (`_preload_content=False`): objects stay API-shaped dicts (camelCase), never models.
- Connect by kubeconfig, by an explicit master (kube-proxy's --master: it overrides the
  kubeconfig's server, and with no kubeconfig uses the pod's service-account credentials
  when present), or in-cluster. An explicit master never depends on the `kubernetes`
  ClusterIP, which this very proxy programs.
- Every call has a connect timeout and a read timeout; on a watch the read timeout is the
  silence after which the connection is presumed dead.
- Non-2xx answers become `StatusError(code, message)`; the loop decides what they mean.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import threading
from collections.abc import Callable, Generator, Mapping
from contextlib import closing
from typing import Any, Protocol

from pyproxy.sources.kube_config import SERVICE_ACCOUNT_DIR, master_url
from pyproxy.sources.kube_watch import Kind, WatchTiming, json_lines

log = logging.getLogger("pyproxy.kube")

__all__ = ["SERVICE_ACCOUNT_DIR", "master_url"]  # re-exported: the fallback's settings use them


class SourceError(RuntimeError):
    """The API server cannot be reached or answered with an error (retried by the loop)."""


class StatusError(SourceError):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# -- connecting ---------------------------------------------------------------------------


def client_configuration(kubeconfig: str, master: str) -> Any:
    """A kubernetes.client.Configuration from a kubeconfig, an explicit master, or in-cluster.

    `master` overrides the kubeconfig's server (as kube-proxy's --master does). With
    `master` and no kubeconfig, the pod's service-account token and CA are used when
    present, so a DaemonSet can reach the API server directly rather than through the
    `kubernetes` ClusterIP that this very proxy programs.
    """
    from kubernetes import client, config
    from kubernetes.config import kube_config

    cfg = client.Configuration()
    if kubeconfig:
        untyped: Any = kube_config  # the config loaders carry no type hints
        merged = untyped.KubeConfigMerger(kubeconfig)
        if merged.config is None:
            raise config.ConfigException(f"{kubeconfig}: no kubeconfig found")
        loader = untyped.KubeConfigLoader(config_dict=merged.config, config_base_path=None)
        loader.load_and_set(cfg)
        if master:
            # The loader's token-refresh hook copies its host into the configuration before
            # every request (from any watch thread): the override must live in the loader.
            loader.host = master_url(master)
            cfg.host = loader.host
    elif master and os.path.exists(f"{SERVICE_ACCOUNT_DIR}/token"):
        _load_service_account(cfg, master_url(master))
    elif master:
        cfg.host = master_url(master)
    else:
        load_incluster_config: Any = config.load_incluster_config
        load_incluster_config(client_configuration=cfg)
    return cfg


def _load_service_account(cfg: Any, url: str) -> None:
    from kubernetes.config import incluster_config

    loader: Any = incluster_config.InClusterConfigLoader
    host, _, port = url.split("://", 1)[1].rpartition(":")
    loader(
        token_filename=f"{SERVICE_ACCOUNT_DIR}/token",
        cert_filename=f"{SERVICE_ACCOUNT_DIR}/ca.crt",
        environ={"KUBERNETES_SERVICE_HOST": host.strip("[]") or "localhost", "KUBERNETES_SERVICE_PORT": port or "443"},
    ).load_and_set(cfg)


def client_transport(kubeconfig: str, master: str) -> ClientTransport:
    """Connect settings -> a transport on the `kubernetes` package (reads files: call it off
    the event loop). Only for what `kube_config` does not handle (auth-provider users)."""
    from kubernetes import client

    try:
        cfg = client_configuration(kubeconfig, master)
    except Exception as err:  # the loaders raise whatever a bad file trips them on (TypeError, KeyError...)
        where = kubeconfig or master or "in-cluster config"
        raise SourceError(f"cannot load API server connection settings ({where}): {err}") from None
    return ClientTransport(client.ApiClient(cfg))


# -- transport: the only code that talks to the API server ---------------------------------


WatchStream = Generator[Any, None, None]


class Transport(Protocol):
    def list_page(self, kind: Kind, continue_token: str | None, timing: WatchTiming) -> Mapping[str, Any]: ...

    def watch(self, kind: Kind, resource_version: str, timing: WatchTiming, timeout: int) -> WatchStream: ...

    def interrupt(self) -> None: ...

    def post_event(self, namespace: str, body: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class ClientTransport:
    """List and watch with the official client, reading raw JSON (no model objects)."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        self.api_client = api_client
        core, discovery = client.CoreV1Api(api_client), client.DiscoveryV1Api(api_client)
        self._calls: dict[str, Callable[..., Any]] = {
            "Service": core.list_service_for_all_namespaces,
            "EndpointSlice": discovery.list_endpoint_slice_for_all_namespaces,
            "Node": core.list_node,
        }
        self._lock = threading.Lock()
        self._open: set[Any] = set()

    def _call(self, kind: Kind, **kwargs: Any) -> Any:
        import urllib3.exceptions
        from kubernetes.client.exceptions import ApiException

        selectors = {"label_selector": kind.label_selector, "field_selector": kind.field_selector}
        try:
            return self._calls[kind.name](
                **{k: v for k, v in selectors.items() if v}, _preload_content=False, **kwargs
            )
        except ApiException as err:
            raise StatusError(int(err.status or 0), status_message(err.body, str(err.reason))) from None
        except urllib3.exceptions.HTTPError as err:
            raise SourceError(f"{type(err).__name__}: {err}") from None

    def list_page(self, kind: Kind, continue_token: str | None, timing: WatchTiming) -> Mapping[str, Any]:
        extra = {"_continue": continue_token} if continue_token else {}
        response = self._call(
            kind, limit=timing.page_size, _request_timeout=(timing.connect_timeout, timing.list_timeout), **extra
        )
        with closing(response):
            body = json.loads(response.data)
        if not isinstance(body, Mapping):
            raise SourceError(f"list of {kind.name}: answer is not an object")
        return body

    def watch(self, kind: Kind, resource_version: str, timing: WatchTiming, timeout: int) -> WatchStream:
        response = self._call(
            kind, watch=True, resource_version=resource_version, allow_watch_bookmarks=True,
            timeout_seconds=timeout, _request_timeout=(timing.connect_timeout, timing.silence_timeout),
        )
        import urllib3.exceptions

        with self._lock:
            self._open.add(response)
        try:
            for line in json_lines(response.stream(64 * 1024, decode_content=True)):
                yield json.loads(line)
        except urllib3.exceptions.ReadTimeoutError:
            # Silent for `silence_timeout`: the connection may be dead. End this watch; the
            # loop watches again from the last resourceVersion (and backs off if that fails).
            log.info("%s: no watch event for %gs; watching again", kind.name, timing.silence_timeout)
        except urllib3.exceptions.HTTPError as err:
            raise SourceError(f"{type(err).__name__}: {err}") from None
        finally:
            with self._lock:
                self._open.discard(response)
            response.close()

    def interrupt(self) -> None:
        """Unblock watches waiting for bytes (called from another thread at shutdown)."""
        with self._lock:
            responses = list(self._open)
        for response in responses:
            try:
                response.shutdown()
            except Exception:  # already closed: nothing to unblock
                pass


    def post_event(self, namespace: str, body: Mapping[str, Any]) -> None:
        # Raw JSON on purpose: the client's Event model turns eventTime into a datetime and
        # writes it back without the microseconds the API server's MicroTime insists on.
        request = self.api_client.param_serialize(
            "POST", "/apis/events.k8s.io/v1/namespaces/{namespace}/events", path_params={"namespace": namespace},
            header_params={"Content-Type": "application/json", "Accept": "application/json"},
            body=dict(body), auth_settings=["BearerToken"],
        )
        response = self.api_client.call_api(*request, _request_timeout=(5, 5))
        data = response.read()
        if not 200 <= response.status <= 299:
            raise StatusError(int(response.status), status_message(data, "posting an Event failed"))

    def close(self) -> None:
        self.api_client.close()


def status_message(body: Any, default: str) -> str:
    try:
        status = json.loads(body) if body else None
    except (TypeError, ValueError):
        return default
    return str(status.get("message") or default) if isinstance(status, Mapping) else default


def is_transient(err: BaseException) -> bool:
    """Errors after which the loop reconnects (anything the network or server can cause)."""
    return isinstance(err, (SourceError, OSError, ValueError, http.client.HTTPException))
