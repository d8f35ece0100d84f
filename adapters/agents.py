"""In-process agents: plain Python functions offered as actions with the @action decorator."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import json
import sys
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from flowledger.domain.definitions import WebhookStep
from flowledger.domain.errors import ConfigurationError
from flowledger.domain.progress import Dispatch
from flowledger.services.ports import AttemptFailed

F = TypeVar("F", bound=Callable[..., Any])
MAX_RESULT_BYTES = 1_048_576


@dataclass(frozen=True, slots=True)
class ActionContext:
    """What an action may want to know about the attempt it runs in."""

    execution_id: str
    step_key: str
    step_id: str
    attempt: int
    attempt_id: str


@dataclass(frozen=True, slots=True)
class ActionSpec:
    """One offered action: its name, capability and function."""

    name: str
    capability: str | None
    fn: Callable[..., Any]
    is_async: bool
    wants_context: bool


class AgentRegistry:
    """The actions offered in this process, by name."""

    def __init__(self) -> None:
        self._actions: dict[str, ActionSpec] = {}

    def action(self, name: str, *, capability: str | None = None) -> Callable[[F], F]:
        """Decorator: offer `fn(input)` or `fn(input, ctx)` as action `name`."""
        if not name or not isinstance(name, str):
            raise ConfigurationError("an action needs a non-empty name")

        def register(fn: F) -> F:
            params = [
                p
                for p in inspect.signature(fn).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
            self._actions[name] = ActionSpec(
                name, capability, fn, inspect.iscoroutinefunction(fn), len(params) >= 2
            )
            return fn

        return register

    def get(self, name: str) -> ActionSpec | None:
        """The action offered under `name`, if any."""
        return self._actions.get(name)

    def names(self) -> list[str]:
        """Every offered action name, sorted."""
        return sorted(self._actions)

    def capabilities(self) -> dict[str, list[str]]:
        """capability -> the actions offering it. A step asks for its `agent_capability`,
        or else for its action by name, so every action is also a capability of its own."""
        found: dict[str, set[str]] = {}
        for spec in self._actions.values():
            for capability in {spec.name, spec.capability or spec.name}:
                found.setdefault(capability, set()).add(spec.name)
        return {c: sorted(names) for c, names in sorted(found.items())}


default_registry = AgentRegistry()


def action(name: str, *, capability: str | None = None) -> Callable[[F], F]:
    """Offer a function as action `name` to workflows run in this process.

    The function takes the step input (a dict) and, if it accepts a second argument, an
    ActionContext; it returns a JSON object. Sync functions run in a thread pool, async
    ones on the event loop. The name of an exception it raises is what a retry policy's
    `non_retryable_errors` matches.
    """
    return default_registry.action(name, capability=capability)


def load_agents(spec: str) -> None:
    """Import a module (dotted name) or a Python file so its @action functions register."""
    path = Path(spec)
    try:
        if spec.endswith(".py") or path.is_file():
            if not path.is_file():
                raise ConfigurationError(f"--agents {spec}: no such file")
            name = f"flowledger_agents_{abs(hash(str(path.resolve())))}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            if module_spec is None or module_spec.loader is None:
                raise ConfigurationError(f"--agents {spec}: cannot load this file")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            importlib.import_module(spec)
    except ConfigurationError:
        raise
    except Exception as exc:
        raise ConfigurationError(f"--agents {spec}: {type(exc).__name__}: {exc}") from exc


class WebhookCaller:
    """The interface the runner needs from the webhook client."""

    async def call(self, step: WebhookStep, body: dict[str, Any]) -> dict[str, Any]:
        """Call the webhook and return its JSON result."""
        raise NotImplementedError


class InProcessRunner:
    """Runs attempts here: actions from a registry, webhooks through a webhook client."""

    def __init__(
        self, registry: AgentRegistry, webhooks: WebhookCaller | None = None, *, threads: int = 32
    ) -> None:
        self.registry = registry
        self.webhooks = webhooks
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="flowledger-agent")

    def offers(self, action_name: str) -> bool:
        """Whether an in-process agent offers the action."""
        return self.registry.get(action_name) is not None

    def agent_for(self, dispatch: Dispatch) -> str | None:
        """Attempts run here: no agent to name."""
        return None

    def route_for(self, dispatch: Dispatch) -> str | None:
        """Attempts run here: nothing was chosen."""
        return None

    async def run(self, dispatch: Dispatch) -> dict[str, Any]:
        """Run one attempt and return its result (a JSON object)."""
        step = dispatch.step
        if isinstance(step, WebhookStep):
            if self.webhooks is None:
                raise AttemptFailed("ConfigurationError", "no webhook client", False)
            return await self.webhooks.call(step, dispatch.input)
        spec = self.registry.get(step.action)
        if spec is None:
            raise AttemptFailed("ActionNotFound", f"no agent offers action {step.action!r}", False)
        context = ActionContext(
            dispatch.execution_id,
            dispatch.key,
            dispatch.step_id,
            dispatch.attempt,
            dispatch.attempt_id,
        )
        return await self.call(spec, dispatch.input, context)

    async def call(self, spec: ActionSpec, data: Any, context: ActionContext) -> dict[str, Any]:
        """Run an action on its input: async ones on the loop, others in the thread pool."""
        args: tuple[Any, ...] = (data, context) if spec.wants_context else (data,)
        if spec.is_async:
            result = await spec.fn(*args)
        else:
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(self._pool, lambda: spec.fn(*args))
        return json_object(result, f"action {spec.name!r}")

    def close(self) -> None:
        """Stop the thread pool (running threads finish on their own)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def json_object(result: Any, what: str) -> dict[str, Any]:
    """A result as a plain JSON object, or AttemptFailed (InvalidResult, not retryable)."""
    if isinstance(result, Awaitable):
        raise AttemptFailed("InvalidResult", f"{what} returned an awaitable", False)
    if not isinstance(result, dict):
        raise AttemptFailed(
            "InvalidResult", f"{what} must return a JSON object, not {type(result).__name__}", False
        )
    try:
        text = json.dumps(result, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise AttemptFailed(
            "InvalidResult", f"{what} returned something that is not JSON: {exc}", False
        ) from None
    if len(text) > MAX_RESULT_BYTES:
        raise AttemptFailed(
            "InvalidResult",
            f"{what} returned {len(text)} bytes; at most {MAX_RESULT_BYTES} are allowed",
            False,
        )
    loaded: dict[str, Any] = json.loads(text)
    return loaded
