"""Client of the SMS v3 control-plane endpoints the data plane needs.

Token authentication (``X-Auth-Token``, reference 3.2) over HTTPS with the
``requests`` library; an error body (3.3: ``error_code``, ``error_msg``)
becomes :class:`ControlPlaneError` carrying the SMS code. 429 and 5xx answers
and connection failures are retried with exponential backoff and jitter,
honouring ``Retry-After``; other 4xx answers are not retried. Nothing logged
or raised ever contains the token.
"""
from __future__ import annotations

import email.utils
import json
import logging
import random
import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import requests

from smsrepl.errors import ConfigError, ControlPlaneError, ControlPlaneUnavailable

log = logging.getLogger("smsrepl.agent.client")

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
#: answers that are worth retrying
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


def _path_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not _ID.match(value):
        raise ConfigError(f"{what} {value!r} is not a valid identifier")
    return quote(value, safe="")


class ControlPlane:
    def __init__(self, endpoint: str, token: str, *, verify: bool | str = True, timeout: tuple[float, float] = (5.0, 30.0),
                 retries: int = 6, backoff: float = 0.5, max_backoff: float = 30.0,
                 session: requests.Session | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
        if not endpoint.startswith("https://"):
            raise ConfigError(f"control plane endpoint {endpoint!r} must be https://")
        if not token:
            raise ConfigError("control plane token is empty")
        self.endpoint = endpoint.rstrip("/")
        self._token = token
        self.verify = verify
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.session = session or requests.Session()
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"ControlPlane({self.endpoint!r}, token=<redacted>)"

    # --- the endpoints ---------------------------------------------------------
    def get_task(self, task_id: str) -> dict:
        """5.4.5: the task (type, migration_ip, syncing, speed_limit, target_server, ...)."""
        return self.request("GET", f"/v3/tasks/{_path_id(task_id, 'task id')}")

    def get_command(self, server_id: str) -> dict:
        """5.5.1: the next command for this source (START, STOP, SYNC, DELETE, SKIP, ...)."""
        return self.request("GET", f"/v3/sources/{_path_id(server_id, 'source server id')}/command")

    def post_command_result(self, server_id: str, body: dict) -> dict | None:
        """5.5.2"""
        return self.request("POST", f"/v3/sources/{_path_id(server_id, 'source server id')}/command_result", body)

    def get_certkey(self, task_id: str) -> dict:
        """5.7.1"""
        return self.request("GET", f"/v3/tasks/{_path_id(task_id, 'task id')}/certkey")

    def get_passphrase(self, task_id: str) -> dict:
        """5.4.11"""
        return self.request("GET", f"/v3/tasks/{_path_id(task_id, 'task id')}/passphrase")

    def get_speed_limit(self, task_id: str) -> dict:
        """5.4.9"""
        return self.request("GET", f"/v3/tasks/{_path_id(task_id, 'task id')}/speed-limit")

    def get_configuration(self, task_id: str) -> dict:
        """5.10.2"""
        return self.request("GET", f"/v3/tasks/{_path_id(task_id, 'task id')}/configuration-setting")

    def put_progress(self, task_id: str, body: dict) -> dict | None:
        """5.4.8"""
        return self.request("PUT", f"/v3/tasks/{_path_id(task_id, 'task id')}/progress", body)

    def put_state(self, source_id: str, body: dict) -> dict | None:
        """5.3.6"""
        return self.request("PUT", f"/v3/sources/{_path_id(source_id, 'source server id')}/changestate", body)

    def post_consistency_result(self, task_id: str, body: dict) -> dict | None:
        """5.4.14"""
        return self.request("POST", f"/v3/tasks/{_path_id(task_id, 'task id')}/consistency-result", body)

    def post_network_check(self, task_id: str, body: dict) -> dict | None:
        """5.9.1"""
        return self.request("POST", f"/v3/{_path_id(task_id, 'task id')}/update-network-check-info", body)

    # --- transport -------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None) -> Any:
        """One call with retries; the decoded JSON answer (None for an empty one)."""
        url = self.endpoint + path
        data = None if body is None else json.dumps(body, ensure_ascii=False).encode()
        headers = {"X-Auth-Token": self._token, "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json;charset=utf8"
        last: str = ""
        for attempt in range(self.retries + 1):
            try:
                resp = self.session.request(method, url, data=data, headers=headers, timeout=self.timeout,
                                            verify=self.verify, allow_redirects=False)
            except requests.RequestException as exc:
                last = f"{type(exc).__name__}"  # the exception text may quote the request: not logged
                log.warning("%s %s: no answer (%s), attempt %d", method, path, last, attempt + 1)
                if attempt < self.retries:
                    self._sleep(self._delay(attempt, None))
                continue
            log.debug("%s %s -> %d", method, path, resp.status_code)
            if resp.status_code < 300:
                return resp.json() if resp.content else None
            if resp.status_code in RETRY_STATUS and attempt < self.retries:
                log.warning("%s %s -> %d, retrying (attempt %d)", method, path, resp.status_code, attempt + 1)
                self._sleep(self._delay(attempt, resp.headers.get("Retry-After")))
                continue
            raise self._error(method, path, resp)
        raise ControlPlaneUnavailable(f"{method} {path}: the control plane did not answer after "
                                      f"{self.retries + 1} attempts ({last})")

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(self.max_backoff * 4, max(0.0, float(retry_after)))
            except ValueError:
                when = email.utils.parsedate_to_datetime(retry_after) if retry_after else None
                if when is not None:
                    return min(self.max_backoff * 4, max(0.0, when.timestamp() - time.time()))
        base = min(self.max_backoff, self.backoff * (2 ** attempt))
        return base * (0.5 + random.random() / 2)

    @staticmethod
    def _error(method: str, path: str, resp: requests.Response) -> ControlPlaneError:
        code = msg = None
        try:
            body = resp.json()
            if isinstance(body, dict):
                code, msg = body.get("error_code"), body.get("error_msg")
        except ValueError:
            pass
        text = msg or (resp.reason or "error")
        return ControlPlaneError(f"{method} {path}: HTTP {resp.status_code}: {text}", status=resp.status_code,
                                 code=code if isinstance(code, str) else None)
