"""Kafka end to end, against a real broker: remote agents (`flowledger agent`), events on
`<prefix>.events`, and several workers sharing executions on PostgreSQL, surviving
SIGKILL of a worker and of an agent, and a broker restart.

Commands are published, and events read, by confluent-kafka (librdkafka), a client that is
not flowledger's own. Events are read by assigning partitions (no consumer group: its
first join takes about 20 s with librdkafka).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_driver import DATA, Cli, wait_for
from confluent_kafka import Consumer, Producer, TopicPartition
from http_driver import start_server
from kafka_broker import Broker, start_tansu
from postgres_server import PostgresServer

from flowledger.domain.errors import WorkflowNotFound
from flowledger.services.app import FlowledgerApp

REMOTE = yaml.safe_load((DATA / "remote.yaml").read_text())
REMOTE_AGENTS = DATA / "remote_agents.py"
PARTITIONS = 4


def publish(bootstrap: str, topic: str, messages: list[tuple[str, dict[str, Any]]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    for key, command in messages:
        producer.produce(topic, value=json.dumps(command).encode(), key=key.encode())
        producer.poll(0)
    assert producer.flush(30) == 0


def register(bootstrap: str, prefix: str, cli: Cli) -> None:
    """Register the workflow by a command, and wait until it is stored: commands are
    ordered within a partition only, and a start for an unknown workflow is refused."""
    command = {"command_id": "register", "type": "register_workflow", "definition": REMOTE}
    publish(bootstrap, f"{prefix}.commands", [(REMOTE["workflow_id"], command)])
    env = {k: v for k, v in cli.env.items() if k.startswith(("PERSISTENCE", "POSTGRES", "APP"))}
    env.setdefault("PERSISTENCE_MODULE", "eventsourcing.sqlite")
    env.setdefault("SQLITE_DBNAME", str(cli.home / "flowledger.db"))
    store = FlowledgerApp(env=env)

    def registered() -> bool:
        try:
            store.workflow(REMOTE["workflow_id"])
        except WorkflowNotFound:
            return False
        return True

    try:
        wait_for("the workflow to be registered", registered, timeout=60)
    finally:
        store.close()


def starts(first: int, count: int, tag: str = "s") -> list[tuple[str, dict[str, Any]]]:
    return [
        (
            f"{tag}-{n}",
            {
                "command_id": f"{tag}-{n}",
                "type": "start_execution",
                "workflow_id": REMOTE["workflow_id"],
                "input": {"n": n},
                "idempotency_key": f"{tag}-{n}",
            },
        )
        for n in range(first, first + count)
    ]


def read_events(bootstrap: str, topic: str, expected: int, timeout: float = 60) -> list[Any]:
    """Every message on the events topic, once at least `expected` have arrived."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "unused", "enable.auto.commit": False}
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    messages: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                if len(messages) >= expected:
                    return messages
                continue
            assert message.error() is None, message.error()
            messages.append(message)
    finally:
        consumer.close()
    pytest.fail(f"{len(messages)} messages on {topic} after {timeout}s, expected {expected}")


def statuses(cli: Cli) -> Counter[str]:
    result = cli("executions", "list", "--json", "--limit", "1000")
    assert result.code == 0, str(result)
    return Counter(e["status"] for e in result.json())


@pytest.fixture
def pg_cli(
    tmp_path: Path, postgres_server: PostgresServer, kafka_broker: Broker, topic_prefix: str
) -> Iterator[Cli]:
    name = postgres_server.create_database()
    env = {**postgres_server.env(name), **kafka_broker.env(topic_prefix)}
    env |= {"POSTGRES_POOL_SIZE": "4", "FLOWLEDGER_KAFKA_PARTITIONS": str(PARTITIONS)}
    try:
        yield Cli(tmp_path, env=env)
    finally:
        postgres_server.drop_database(name)


def agent_args(agent_id: str) -> list[str]:
    return ["--agents", str(REMOTE_AGENTS), "--agent-id", agent_id]


def start(cli: Cli, processes: list[subprocess.Popen[str]], name: str, *args: str) -> Path:
    log = cli.home / f"{name}.err"
    processes.append(cli.start(*args, stderr=log))
    return log


def test_a_remote_agent_runs_the_steps_and_events_come_out_in_order(
    tmp_path: Path,
    kafka_broker: Broker,
    topic_prefix: str,
    processes: list[subprocess.Popen[str]],
) -> None:
    env = {**kafka_broker.env(topic_prefix), "FLOWLEDGER_KAFKA_PARTITIONS": str(PARTITIONS)}
    cli = Cli(tmp_path, env=env)
    # `serve` (a worker with the HTTP API) loads no agent: every step goes to the agent.
    server = start_server(cli)
    processes.append(server.proc)
    agent = start(cli, processes, "agent", "agent", *agent_args("far"))
    wait_for("serve to drive", lambda: "took up" in server.log.read_text(), timeout=60)
    wait_for("the agent to take tasks", lambda: "taking tasks" in agent.read_text(), timeout=60)
    register(kafka_broker.bootstrap, topic_prefix, cli)
    # The same command three times: one execution.
    publish(kafka_broker.bootstrap, f"{topic_prefix}.commands", starts(1, 1) * 3)

    def done() -> list[dict[str, Any]] | None:
        found = cli.executions("--status", "completed")
        return found or None

    [execution] = wait_for("the execution to complete", done, timeout=90)
    assert statuses(cli) == {"completed": 1}
    doc = cli.show(execution["execution_id"])
    assert doc["data"]["prepared"] == 2
    assert {step["agent"] for step in doc["steps"].values()} == {"far"}
    shown = cli("executions", "show", execution["execution_id"])
    assert "on agent far" in shown.out

    stored = len(cli("audit", "export", execution["execution_id"]).out.splitlines())
    messages = read_events(kafka_broker.bootstrap, f"{topic_prefix}.events", stored)
    assert len(messages) == stored
    bodies = [json.loads(m.value()) for m in messages]
    assert [b["version"] for b in bodies] == list(range(1, stored + 1))
    assert bodies[0]["type"] == "execution_started"
    assert bodies[-1]["type"] == "execution_completed"
    assert {b["workflow_id"] for b in bodies} == {"e2e-remote"}
    assert all(b["hash"] and len(b["hash"]) == 64 for b in bodies)
    for message, body in zip(messages, bodies, strict=True):
        assert message.key().decode() == execution["execution_id"]
        headers = {k: v.decode() for k, v in message.headers()}
        assert headers["event-id"] == body["event_id"]
        assert headers["event-type"] == body["type"]
        assert headers["execution-id"] == execution["execution_id"]
    succeeded = [b for b in bodies if b["type"] == "step_succeeded"]
    assert [b["data"]["agent"] for b in succeeded] == ["far", "far"]

    # The agent announced itself; serve lists it. The timeline names it per attempt.
    with server.client() as api:
        roster = api.get("/agents").json()
        timeline = api.get(f"/executions/{execution['execution_id']}/timeline").json()
    ran = [e for e in timeline["timeline"] if e["event"] == "StepSucceeded"]
    assert [(e["step_key"], e["detail"]["agent"]) for e in ran] == [
        ("prepare", "far"),
        ("finish", "far"),
    ]
    assert roster["kafka"] is True
    [far] = [a for a in roster["agents"] if a["agent_id"] == "far"]
    assert far["live"] is True
    assert set(far["capabilities"]) == {"prep", "remote.prepare", "remote.finish"}


def stored_events(postgres_server: PostgresServer, env: dict[str, str]) -> list[tuple[Any, ...]]:
    with postgres_server.connect(env["POSTGRES_DBNAME"]) as conn:
        return conn.execute(
            "SELECT originator_id::text, originator_version, topic FROM flowledger_events "
            "WHERE topic LIKE '%:Execution.%'"
        ).fetchall()


def test_two_workers_and_two_agents_survive_sigkill(
    pg_cli: Cli,
    postgres_server: PostgresServer,
    kafka_broker: Broker,
    topic_prefix: str,
    processes: list[subprocess.Popen[str]],
) -> None:
    cli = pg_cli
    # Slow enough that much is in flight when they die: 200 executions of two 0.5 s steps
    # on 2 agents running 8 tasks at a time take some 15 s.
    cli.env["E2E_REMOTE_LATENCY"] = "0.5"
    logs = [start(cli, processes, f"worker{n}", "worker") for n in (1, 2)]
    agents = [
        start(cli, processes, f"agent{n}", "agent", *agent_args(f"a{n}"), "--concurrency", "8")
        for n in (1, 2)
    ]
    for log in logs + agents:
        wait_for(
            f"{log.stem} to start",
            lambda log=log: "took up" in log.read_text() or "taking tasks" in log.read_text(),
            timeout=60,
        )
    register(kafka_broker.bootstrap, topic_prefix, cli)
    publish(kafka_broker.bootstrap, f"{topic_prefix}.commands", starts(0, 200))

    def progress() -> bool:
        return statuses(cli).get("completed", 0) >= 20

    wait_for("some executions to complete", progress, timeout=120)
    worker1, agent1 = processes[0], processes[2]
    worker1.send_signal(signal.SIGKILL)
    agent1.send_signal(signal.SIGKILL)
    worker1.wait(10)
    agent1.wait(10)

    def took_over() -> bool:
        return "partitions [0, 1, 2, 3] of 4" in logs[1].read_text()

    # The survivor takes over the dead worker's partitions (after the group's session
    # timeout), and with them its executions.
    wait_for("the other worker to take over", took_over, timeout=120)

    def all_done() -> bool:
        return statuses(cli) == {"completed": 200}

    wait_for("every execution to complete", all_done, timeout=240)
    assert processes[1].poll() is None, logs[1].read_text()
    assert processes[3].poll() is None, agents[1].read_text()
    takeovers = [line for line in logs[1].read_text().splitlines() if "drives the" in line]
    assert "took up 0" not in takeovers[-1], takeovers  # it had executions to take up

    rows = stored_events(postgres_server, cli.env)
    # No step has two successful attempts.
    succeeded = Counter((eid, topic) for eid, _, topic in rows if topic.endswith(".StepSucceeded"))
    assert len(succeeded) == 200
    per_execution: dict[str, int] = defaultdict(int)
    for eid, _, topic in rows:
        if topic.endswith(".StepSucceeded"):
            per_execution[eid] += 1
    assert set(per_execution.values()) == {2}
    # Every stored event reaches the events topic; a duplicate is the same event again.
    messages = read_events(kafka_broker.bootstrap, f"{topic_prefix}.events", len(rows), 120)
    by_id: dict[str, bytes] = {}
    for message in messages:
        body = json.loads(message.value())
        if body["event_id"] in by_id:
            assert by_id[body["event_id"]] == message.value()
        by_id[body["event_id"]] = message.value()
    published = {(json.loads(v)["execution_id"], json.loads(v)["version"]) for v in by_id.values()}
    assert published == {(eid, version) for eid, version, _ in rows}
    # Per execution, in version order (duplicates aside).
    seen: dict[str, int] = {}
    for message in messages:
        body = json.loads(message.value())
        last = seen.get(body["execution_id"], 0)
        assert body["version"] <= last + 1
        seen[body["execution_id"]] = max(last, body["version"])


def test_a_broker_restart_mid_run(
    tmp_path: Path,
    postgres_server: PostgresServer,
    topic_prefix: str,
    processes: list[subprocess.Popen[str]],
) -> None:
    """Tansu keeps its topics in memory, so the restarted broker is empty: flowledger makes
    its topics again, and what was in flight on the broker (tasks, results) is found
    missing by the steps' timeouts and retried."""
    broker = start_tansu(tmp_path / "broker", name="first")
    name = postgres_server.create_database()
    try:
        env = {**postgres_server.env(name), **broker.env(topic_prefix)}
        env |= {"POSTGRES_POOL_SIZE": "4", "FLOWLEDGER_KAFKA_PARTITIONS": str(PARTITIONS)}
        # So that tasks are in flight when it stops: 60 executions of two 1.5 s steps on 16
        # tasks at a time keep the agent busy some 11 s after the last start is taken, far
        # longer than one `executions list` takes even on a loaded machine.
        env["E2E_REMOTE_LATENCY"] = "1.5"
        cli = Cli(tmp_path, env=env)
        worker = start(cli, processes, "worker", "worker")
        agent = start(cli, processes, "agent", "agent", "--agents", str(REMOTE_AGENTS))
        wait_for("the worker to drive", lambda: "took up" in worker.read_text(), timeout=60)
        wait_for("the agent to start", lambda: "taking tasks" in agent.read_text(), timeout=60)
        register(broker.bootstrap, topic_prefix, cli)
        publish(broker.bootstrap, f"{topic_prefix}.commands", starts(0, 60))

        def taken() -> Counter[str] | None:
            found = statuses(cli)
            return found if sum(found.values()) == 60 else None

        assert wait_for("the commands to be taken", taken, 120)["running"] > 0  # mid-run
        broker.stop()
        broker = start_tansu(tmp_path / "broker", name="second", port=broker.port)
        publish(broker.bootstrap, f"{topic_prefix}.commands", starts(60, 20, tag="after"))

        def all_done() -> Counter[str] | None:
            found = statuses(cli)
            return found if found == {"completed": 80} else None

        wait_for("every execution to complete after the restart", all_done, timeout=240)
        assert processes[0].poll() is None, worker.read_text()
        assert processes[1].poll() is None, agent.read_text()
    finally:
        broker.stop()
        postgres_server.drop_database(name)
