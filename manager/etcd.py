"""etcd's v3 API for a manager group, through its JSON gateway (the etcd3gw client): the
few calls the group makes (transactions, ranges, leases, a member's status), across the
group's etcd endpoints. A call that cannot reach one endpoint tries the next; every call
has a timeout (etcd3gw's default is none).

etcd's authentication (``etcd_user``): the gateway's token, asked for once and again
whenever etcd says it is no longer valid. TLS: https URLs, ``etcd_ca_file``, a client
certificate.

Pure of threads: each Etcd is used by one thread (the group's).
"""
from __future__ import annotations

import base64
import json
import logging
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)


class EtcdUnavailable(Exception):
    """No endpoint answered in time, or etcd could not do it (no quorum): ``text`` says which."""

    def __init__(self, text: str, no_leader: bool = False) -> None:
        super().__init__(text)
        self.text, self.no_leader = text, no_leader


def b64(value: str | bytes) -> str:
    return base64.b64encode(value.encode() if isinstance(value, str) else value).decode()


def unb64(value: str | None) -> bytes:
    return base64.b64decode(value or "")


def prefix_end(prefix: str) -> str:
    """The range_end of every key starting with ``prefix``, base64."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return b64(bytes(raw))


class Etcd:
    def __init__(self, urls: str, timeout: float, ca_file: str = "", cert_file: str = "", key_file: str = "",
                 user: str = "", password_file: str = "") -> None:
        import etcd3gw  # the ``group`` extra
        import requests

        self._clients = []
        for url in urls.split(","):
            parts = urlsplit(url)
            # The environment is not asked: REQUESTS_CA_BUNDLE would replace etcd_ca_file, and
            # an HTTP proxy has no business between a manager and its etcd.
            session = requests.Session()
            session.trust_env = False
            session.verify = ca_file or True
            if cert_file:
                session.cert = (cert_file, key_file)
            self._clients.append(etcd3gw.client(host=parts.hostname or "127.0.0.1", port=parts.port or 2379,
                                                protocol=parts.scheme, timeout=timeout, api_path="/v3/", session=session))
        self._exceptions = etcd3gw.exceptions
        self._user, self._password_file = user, password_file
        self._current = 0
        self.timeout = timeout

    def call(self, path: str, body: dict, timeout: float | None = None) -> dict:
        """POST ``body`` to ``/v3/<path>`` of the first endpoint that answers; EtcdUnavailable
        when none does, or when etcd answered that it cannot (no leader, a timeout)."""
        last = ""
        for _ in range(len(self._clients)):
            client = self._clients[self._current]
            try:
                if self._user and "Authorization" not in client.session.headers:
                    self._authenticate(client)
                return self._post(client, path, body, timeout)
            except self._exceptions.Etcd3Exception as exc:
                detail = str(getattr(exc, "detail_text", "") or exc)
                if self._user and "invalid auth token" in detail:
                    client.session.headers.pop("Authorization", None)  # asked for again on the next call
                if isinstance(exc, (self._exceptions.ConnectionFailedError, self._exceptions.ConnectionTimeoutError)) \
                        and "etcdserver" not in detail:  # this endpoint is unreachable: the next one
                    last = f"{client.base_url}: {detail[:200] or type(exc).__name__}"
                    self._current = (self._current + 1) % len(self._clients)
                    continue
                raise EtcdUnavailable(f"{client.base_url}: {_reason(detail)}", no_leader="no leader" in detail) from None
        raise EtcdUnavailable(f"no etcd endpoint answered ({last})")

    def _post(self, client: Any, path: str, body: dict, timeout: float | None) -> dict:
        if timeout is None:
            return client.post(client.get_url(path), json=body)
        saved, client.timeout = client.timeout, timeout
        try:
            return client.post(client.get_url(path), json=body)
        finally:
            client.timeout = saved

    def _authenticate(self, client: Any) -> None:
        with open(self._password_file) as fh:
            password = fh.read().strip()
        answer = self._post(client, "auth/authenticate", {"name": self._user, "password": password}, None)
        client.session.headers["Authorization"] = answer["token"]

    # ---- the calls the group makes ------------------------------------------------------

    def txn(self, compare: list[dict], success: list[dict], failure: tuple[dict, ...] = ()) -> tuple[bool, dict]:
        """(succeeded, etcd's answer) of a transaction."""
        answer = self.call("kv/txn", {"compare": compare, "success": success, "failure": list(failure)})
        return bool(answer.get("succeeded", False)), answer

    def range(self, key: str, prefix: bool = False, serializable: bool = False) -> list[dict]:
        """The key-values at ``key`` (every key under it with ``prefix``): key and value
        decoded, revisions as ints."""
        body: dict[str, Any] = {"key": b64(key)}
        if prefix:
            body["range_end"] = prefix_end(key)
        if serializable:
            body["serializable"] = True
        return [decoded(kv) for kv in self.call("kv/range", body).get("kvs", [])]

    def grant(self, ttl: int) -> int:
        return int(self.call("lease/grant", {"TTL": ttl})["ID"])

    def keepalive(self, lease: int, timeout: float) -> int:
        """The lease's TTL after renewing it; 0 or less: it is gone."""
        answer = self.call("lease/keepalive", {"ID": lease}, timeout)
        return int(answer.get("result", answer).get("TTL", 0))

    def revoke(self, lease: int) -> None:
        self.call("kv/lease/revoke", {"ID": lease}, timeout=self.timeout)

    def leaderless(self) -> bool:
        """True when an endpoint answers and says its cluster has no leader (quorum lost);
        False when one has a leader, or none answers."""
        for client in self._clients:
            try:
                status = self._post(client, "maintenance/status", {}, min(self.timeout, 0.5))
            except self._exceptions.Etcd3Exception:
                continue
            return not status.get("leader")
        return False


def decoded(kv: dict) -> dict:
    return {"key": unb64(kv.get("key")).decode(), "value": unb64(kv.get("value")),
            "create_revision": int(kv.get("create_revision", 0)), "mod_revision": int(kv.get("mod_revision", 0)),
            "lease": int(kv.get("lease", 0))}


def _reason(detail: str) -> str:
    """etcd's own words from an error body, e.g. 'etcdserver: request timed out'."""
    try:
        body = json.loads(detail)
    except ValueError:
        return detail[:200]
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        error = error.get("message", error)
    return str(error)[:200]
