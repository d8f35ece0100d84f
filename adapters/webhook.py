"""Webhook steps over httpx: status-code rules of the contract, secrets resolved at call time."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import httpx

from flowledger.adapters.agents import WebhookCaller, json_object
from flowledger.domain.definitions import WebhookStep
from flowledger.services.ports import AttemptFailed

_SECRET = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}")
_RETRYABLE_STATUS = frozenset({408, 429})
MAX_RESPONSE_BYTES = 1_048_576


def resolve_secrets(value: str, env: Mapping[str, str], used: dict[str, str] | None = None) -> str:
    """Replace each `${env:NAME}` with the variable's value; a missing one is an error.

    `used` collects value -> reference, so messages can be redacted before they are stored.
    """

    def lookup(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in env:
            raise AttemptFailed("SecretMissing", f"environment variable {name} is not set", False)
        if used is not None and env[name]:
            used[env[name]] = match.group(0)
        return env[name]

    return _SECRET.sub(lookup, value)


def redact(text: str, used: Mapping[str, str]) -> str:
    """`text` with every resolved secret value put back as its `${env:NAME}` reference."""
    for secret in sorted(used, key=len, reverse=True):
        text = text.replace(secret, used[secret])
        stripped = secret.strip()
        if stripped and stripped != secret:
            text = text.replace(stripped, used[secret])
        text = text.replace(repr(secret)[1:-1], used[secret])
    return text


class WebhookClient(WebhookCaller):
    """Calls webhook steps; the resolved headers never leave this object."""

    def __init__(
        self, client: httpx.AsyncClient | None = None, env: Mapping[str, str] | None = None
    ) -> None:
        self._client = client or httpx.AsyncClient(follow_redirects=False)
        self._env = env if env is not None else os.environ

    async def call(self, step: WebhookStep, body: dict[str, Any]) -> dict[str, Any]:
        """Send the step input as JSON; the JSON response is the result."""
        used: dict[str, str] = {}
        headers = {k: resolve_secrets(v, self._env, used) for k, v in step.headers.items()}
        url = resolve_secrets(step.url, self._env, used)
        try:
            return await self._call(step, url, headers, body)
        except AttemptFailed as exc:
            # Client errors quote what they were given (a URL, a header): never store that.
            raise AttemptFailed(exc.error_type, redact(exc.message, used), exc.retryable) from None

    async def _call(
        self, step: WebhookStep, url: str, headers: dict[str, str], body: dict[str, Any]
    ) -> dict[str, Any]:
        target = f"{step.method} {step.url}"
        try:
            response = await self._client.request(
                step.method,
                url,
                headers=headers,
                json=body if step.method not in ("GET", "DELETE") else None,
                timeout=None,  # the engine bounds the whole attempt with the step's timeout
            )
        except httpx.TransportError as exc:
            raise AttemptFailed(
                "ConnectionError", f"{target}: {type(exc).__name__}: {exc}", True
            ) from None
        except (httpx.InvalidURL, httpx.UnsupportedProtocol, ValueError) as exc:
            raise AttemptFailed(
                "InvalidRequest", f"{target}: {type(exc).__name__}: {exc}", False
            ) from None
        code = response.status_code
        if code >= 500 or code in _RETRYABLE_STATUS:
            raise AttemptFailed("HTTPError", f"{target} answered {code}", True)
        if code >= 300:
            raise AttemptFailed("HTTPError", f"{target} answered {code}", False)
        content = response.content
        if len(content) > MAX_RESPONSE_BYTES:
            raise AttemptFailed(
                "InvalidResult",
                f"{step.url} answered {len(content)} bytes; "
                f"at most {MAX_RESPONSE_BYTES} are allowed",
                False,
            )
        if not content.strip():
            return {"status_code": code}
        try:
            payload = json.loads(content)
        except ValueError:
            raise AttemptFailed(
                "InvalidResult", f"{step.url} answered {code} with a body that is not JSON", False
            ) from None
        if not isinstance(payload, dict):
            payload = {"body": payload}
        return json_object(payload, f"webhook {step.step_id!r}")

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self._client.aclose()
