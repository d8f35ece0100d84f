"""Adaptive routing against a real broker: with a fast and a slow `flowledger agent` offering
one capability, most tasks go to the fast one, each outcome records its agent and why it
was chosen; when the fast one is killed, its work fails over to the slow one and no
execution is lost."""

from __future__ import annotations

import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cli_driver import DATA, Cli, wait_for
from http_driver import Server, start_server
from kafka_broker import Broker

ROUTING = yaml.safe_load((DATA / "routing.yaml").read_text())
REMOTE_AGENTS = DATA / "remote_agents.py"
FAST, SLOW = "fast-1", "slow-1"


def start_agent(
    cli: Cli, processes: list[subprocess.Popen[str]], agent_id: str, latency: float
) -> Path:
    log = cli.home / f"{agent_id}.err"
    env = {**cli.env, "E2E_REMOTE_LATENCY": str(latency)}
    args = ("agent", "--agents", str(REMOTE_AGENTS), "--agent-id", agent_id, "--concurrency", "8")
    processes.append(Cli(cli.home, env=env).start(*args, stderr=log))
    return log


def start(api: httpx.Client, n: int) -> str:
    response = api.post(f"/workflows/{ROUTING['workflow_id']}/executions", json={"input": {"n": n}})
    assert response.status_code == 201, response.text
    execution_id: str = response.json()["execution_id"]
    return execution_id


def completed(api: httpx.Client, ids: list[str]) -> bool:
    return all(api.get(f"/executions/{eid}").json()["status"] == "completed" for eid in ids)


def events(api: httpx.Client, eid: str) -> list[dict[str, Any]]:
    response = api.get(f"/executions/{eid}/events", params={"limit": 1000})
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["events"]
    return found


def outcomes(api: httpx.Client, ids: list[str], kind: str) -> list[dict[str, Any]]:
    """The attributes of the executions' events of one kind, each with its execution id."""
    return [
        {**e["attributes"], "execution_id": eid}
        for eid in ids
        for e in events(api, eid)
        if e["type"] == kind
    ]


def live_agents(server: Server) -> set[str]:
    """The agents serve hears from that read their inbox (so can be routed to)."""
    with server.client() as api:
        roster = api.get("/agents").json()["agents"]
    return {a["agent_id"] for a in roster if a["live"] and a["inbox"]}


def test_most_tasks_go_to_the_fast_agent_and_fail_over_when_it_dies(
    tmp_path: Path,
    kafka_broker: Broker,
    topic_prefix: str,
    processes: list[subprocess.Popen[str]],
) -> None:
    cli = Cli(tmp_path, env={**kafka_broker.env(topic_prefix), "FLOWLEDGER_KAFKA_PARTITIONS": "2"})
    server = start_server(cli)  # loads no agent: every step goes to a remote one
    processes.append(server.proc)
    logs = [start_agent(cli, processes, FAST, 0.05), start_agent(cli, processes, SLOW, 0.5)]
    wait_for("serve to drive", lambda: "took up" in server.log.read_text(), timeout=60)
    for log in logs:
        wait_for(f"{log.stem} to start", lambda log=log: "taking tasks" in log.read_text(), 60)
    wait_for("both agents to be heard", lambda: live_agents(server) >= {FAST, SLOW}, 30)

    with server.client() as api:
        assert api.post("/workflows", json=ROUTING).status_code == 201
        # Two executions one after the other: each agent gets a first task to be measured.
        warm = []
        for n in range(2):
            warm.append(start(api, n))
            wait_for("a first execution", lambda: completed(api, warm), timeout=30)
        first = [(d["agent"], d["route"]) for d in outcomes(api, warm, "StepSucceeded")]
        assert {agent for agent, _ in first} == {FAST, SLOW}, first
        assert all(route.startswith("trying ") for _, route in first), first

        batch = [start(api, n) for n in range(2, 32)]
        wait_for("the batch to complete", lambda: completed(api, batch), timeout=60)
        ran = outcomes(api, batch, "StepSucceeded")
        by_agent = Counter(d["agent"] for d in ran)
        assert len(ran) == 30
        assert by_agent[FAST] >= 21, by_agent  # about 27 of 30: a tenth explores
        assert all(d["route"] for d in ran)
        best = [d["route"] for d in ran if d["agent"] == FAST]
        assert any(r.startswith("best of 2: p50 ") and f"({SLOW}: p50 " in r for r in best), best

        # SIGKILL the fast agent: it says nothing. Until its heartbeats are missed it is
        # still the best, so the tasks of these executions go to its inbox, where nobody
        # reads them; then they are taken from it and retried on the slow agent.
        fast = processes[1]
        fast.send_signal(signal.SIGKILL)
        fast.wait(10)
        after = [start(api, n) for n in range(32, 42)]
        wait_for("the executions after the kill to complete", lambda: completed(api, after), 60)
        lost = outcomes(api, after, "StepRetryScheduled")
        assert lost
        assert {d["agent"] for d in lost} == {FAST}, lost
        assert {d["error"]["type"] for d in lost} == {"AgentLost"}
        failed_over = [d for d in outcomes(api, after, "StepSucceeded") if d["agent"] == SLOW]
        assert any(d["route"].startswith(f"failover: {FAST} stopped sending") for d in failed_over)

        # Nothing lost: every execution completed, with its step succeeding exactly once.
        every = warm + batch + after
        assert completed(api, every)
        succeeded = Counter(d["execution_id"] for d in outcomes(api, every, "StepSucceeded"))
        assert len(succeeded) == 42
        assert set(succeeded.values()) == {1}

        # An execution whose retry failed over (others after the kill may have gone to the
        # slow agent at once, once the fast one was known lost).
        moved = next(d for d in failed_over if d["route"].startswith("failover: "))
        shown = cli("executions", "show", moved["execution_id"])
        assert shown.code == 0, str(shown)
        assert f"on agent {SLOW}" in shown.out
        assert "failover:" in shown.out  # the table may wrap the rest of the reason
        document = cli("executions", "show", moved["execution_id"], "--json").json()
        [step] = document["steps"].values()
        assert step["agent"] == SLOW
        assert step["route"].startswith(f"failover: {FAST} stopped sending")

    assert processes[2].poll() is None, logs[1].read_text()
    assert live_agents(server) == {SLOW}
    if server.proc.poll() is not None:
        pytest.fail(server.log.read_text())
