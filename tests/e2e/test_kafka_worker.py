"""`flowledger worker` with KAFKA_BOOTSTRAP_SERVERS: commands published by a plain Kafka
client (confluent-kafka) register, start, answer and cancel executions in a worker
process; a command it cannot take goes to the DLQ. Against a real broker."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_driver import AGENTS, COMMAND_TIMEOUT, DATA, EXIT_BAD_INPUT, EXIT_OK, Cli, wait_for
from confluent_kafka import Producer
from http_driver import start_server, wait_until
from kafka_broker import Broker

from flowledger.domain.errors import WorkflowNotFound
from flowledger.services.app import FlowledgerApp, execution_id_for

ORDERS = yaml.safe_load((DATA / "orders.yaml").read_text())


def publish(broker: Broker, topic: str, key: str, command: dict[str, Any]) -> None:
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    producer.produce(topic, value=json.dumps(command).encode(), key=key.encode())
    assert producer.flush(30) == 0


def test_a_worker_takes_commands_from_kafka(
    tmp_path: Path,
    kafka_broker: Broker,
    topic_prefix: str,
    processes: list[subprocess.Popen[str]],
) -> None:
    cli = Cli(tmp_path, env=kafka_broker.env(topic_prefix))
    topic = f"{topic_prefix}.commands"
    log = tmp_path / "worker.err"
    worker = cli.start("worker", "--agents", AGENTS, stderr=log)
    processes.append(worker)
    wait_for("the worker to consume commands", lambda: "consuming commands" in log.read_text())

    publish(
        kafka_broker,
        topic,
        "e2e-orders",
        {"command_id": "reg-1", "type": "register_workflow", "definition": ORDERS},
    )
    store = FlowledgerApp(
        env={
            "PERSISTENCE_MODULE": "eventsourcing.sqlite",
            "SQLITE_DBNAME": str(tmp_path / "flowledger.db"),
        }
    )

    def registered() -> bool:
        try:
            store.workflow("e2e-orders")
        except WorkflowNotFound:
            return False
        return True

    # Commands are ordered within a partition only (by key): register before starting.
    wait_for("the workflow to be registered", registered, timeout=60)
    for n in (1, 2):
        publish(
            kafka_broker,
            topic,
            f"order-{n}",
            {
                "command_id": f"start-{n}",
                "type": "start_execution",
                "workflow_id": "e2e-orders",
                "input": {"order": f"o-{n}"},
                "idempotency_key": f"order-{n}",
            },
        )

    def waiting() -> list[dict[str, Any]] | None:
        rows = cli.executions("--status", "waiting")
        return rows if len(rows) == 2 else None

    rows = wait_for("both orders to wait for approval", waiting, timeout=60)
    by_order = {cli.show(r["execution_id"])["input"]["order"]: r["execution_id"] for r in rows}

    publish(
        kafka_broker,
        topic,
        by_order["o-1"],
        {
            "command_id": "approve-1",
            "type": "complete_human_task",
            "execution_id": by_order["o-1"],
            "step_id": "approve",
            "data": {"approved": True},
        },
    )
    publish(
        kafka_broker,
        topic,
        by_order["o-2"],
        {
            "command_id": "cancel-2",
            "type": "cancel_execution",
            "execution_id": by_order["o-2"],
            "reason": "customer changed their mind",
        },
    )
    done = wait_for(
        "o-1 to complete",
        lambda: cli.show(by_order["o-1"])["status"] == "completed" or None,
        timeout=60,
    )
    assert done
    cancelled = wait_for(
        "o-2 to be cancelled",
        lambda: cli.show(by_order["o-2"])["status"] == "cancelled" or None,
        timeout=60,
    )
    assert cancelled
    steps = cli.show(by_order["o-2"])["steps"]
    assert steps["reserve"]["status"] == "compensated"

    store.close()
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=COMMAND_TIMEOUT) == EXIT_OK, log.read_text()


@pytest.mark.parametrize("command", [("worker",), ("serve", "--port", "0")])
def test_a_process_that_cannot_reach_kafka_says_so(tmp_path: Path, command: tuple[str]) -> None:
    cli = Cli(tmp_path, env={"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"})
    result = cli(*command, "--agents", AGENTS, timeout=120)
    assert result.code == EXIT_BAD_INPUT, str(result)
    assert "cannot use Kafka at 127.0.0.1:1" in result.message


def test_serve_takes_commands_from_kafka_too(
    tmp_path: Path,
    kafka_broker: Broker,
    topic_prefix: str,
    processes: list[subprocess.Popen[str]],
) -> None:
    cli = Cli(tmp_path, env=kafka_broker.env(topic_prefix))
    server = start_server(cli, "--agents", AGENTS)
    processes.append(server.proc)
    assert f"consuming commands from {topic_prefix}.commands" in server.output
    topic = f"{topic_prefix}.commands"
    with server.client() as api:
        publish(
            kafka_broker,
            topic,
            "e2e-orders",
            {"command_id": "reg", "type": "register_workflow", "definition": ORDERS},
        )
        wait_for(
            "the workflow to be registered",
            lambda: api.get("/workflows/e2e-orders").status_code == 200,
            timeout=60,
        )
        start = {
            "command_id": "start",
            "type": "start_execution",
            "workflow_id": "e2e-orders",
            "input": {"order": "o-7"},
            "idempotency_key": "order-7",
        }
        publish(kafka_broker, topic, "order-7", start)
        eid = str(execution_id_for("order-7"))
        wait_for(
            "the execution to be stored",
            lambda: api.get(f"/executions/{eid}").status_code == 200,
            timeout=60,
        )
        assert wait_until(api, eid, "waiting", timeout=60)["steps"]["approve"]["status"] == (
            "waiting"
        )
        answer = {
            "command_id": "approve",
            "type": "complete_human_task",
            "execution_id": eid,
            "step_id": "approve",
            "data": {"approved": True},
        }
        publish(kafka_broker, topic, eid, answer)
        assert wait_until(api, eid, "completed", timeout=60)["steps"]["ship"]["status"] == (
            "completed"
        )
    assert server.stop() == EXIT_OK, server.output
    assert "Traceback" not in server.output, server.output
