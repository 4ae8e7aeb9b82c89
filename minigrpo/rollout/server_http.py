"""HTTP to one `vllm serve` process, every failure an error that names the server and says why.

`ServerClient` is vLLM's own trainer-side weight-sync client (`HTTPVLLMWeightSyncClient`: the
`/init_weight_transfer_engine`, `/start_weight_update`, `/update_weights`, `/finish_weight_update`
routes) whose requests raise `ServerError` with the server's message instead of a bare HTTP status,
plus the other routes minigrpo uses. `Liveness` watches a server while a long request is out.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import requests
from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient

from minigrpo.io import InputError


class ServerError(InputError):
    """A vLLM server failed, refused a request, or did not answer in time; `url` names it. An InputError:
    the server is the user's to fix or restart, so the entry points print the message as one line."""

    def __init__(self, url: str, message: str):
        super().__init__(f"vLLM server {url}: {message}")
        self.url = url


class ServerClient(HTTPVLLMWeightSyncClient):
    def __init__(self, url: str, timeout_s: float):
        super().__init__(url, timeout=timeout_s)
        self.url = self.base_url

    def request(self, method: str, path: str, *, json: Any = None, params: dict | None = None,
                read_timeout: float | None = -1.0) -> Any:
        """The decoded JSON answer (None for an empty one). Connecting is bounded by the client's timeout;
        so is reading, unless `read_timeout` says otherwise (None: unbounded, for generation watched by
        `Liveness`)."""
        read = self.timeout if read_timeout is not None and read_timeout < 0 else read_timeout
        try:
            response = requests.request(method, f"{self.base_url}/{path}", json=json, params=params,
                                        timeout=(self.timeout, read))
        except requests.Timeout:
            raise ServerError(self.url, f"no answer to /{path} within {read} s") from None
        except requests.ConnectionError as e:
            raise ServerError(self.url, f"cannot reach it for /{path} ({type(e).__name__}: {e})") from None
        if response.status_code >= 400:
            raise ServerError(self.url, f"/{path} failed with HTTP {response.status_code}: {_message(response)}")
        return response.json() if response.content else None

    def get(self, path: str, **kwargs) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs) -> Any:
        return self.request("POST", path, **kwargs)

    def _post(self, path: str, json: dict[str, Any] | None = None) -> None:  # HTTPVLLMWeightSyncClient's hook
        self.post(path, json=json)


def _message(response: requests.Response) -> str:
    """vLLM's JSON error message ({"error": {"message": ...}} or {"detail": ...}), else the body's start."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        if "detail" in body:
            return str(body["detail"])
    return str(body)[:500]


class Liveness:
    """Asks a server's /health in the background; `check()` raises once it failed or has not answered for
    longer than the timeout, so a dead or hung server is reported within that bound whatever is waiting."""

    def __init__(self, client: ServerClient):
        self.client = client
        self.last_ok = time.monotonic()
        self.error: ServerError | None = None
        self._probe: threading.Thread | None = None

    def check(self) -> None:
        if self.error is not None:
            raise self.error
        silent = time.monotonic() - self.last_ok
        if silent > self.client.timeout:
            raise ServerError(self.client.url, f"did not answer /health for {silent:.0f} s "
                                               f"(rollout.server_timeout_s={self.client.timeout:g})")
        if self._probe is None or not self._probe.is_alive():
            self._probe = threading.Thread(target=self._ask, daemon=True)  # a hung socket must not block exit
            self._probe.start()

    def _ask(self) -> None:
        try:
            self.client.get("health")
            self.last_ok = time.monotonic()
        except ServerError as e:
            self.error = e
