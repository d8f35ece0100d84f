#!/usr/bin/env bash
# The Quickstart's first command: set up a virtualenv, then run the document-processing
# example on the embedded default (SQLite in ./.flowledger, in-process agents, no Kafka).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
if [ ! -x .venv/bin/flowledger ]; then
  "$PY" -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet -e .
fi
FL=.venv/bin/flowledger
AGENTS=examples/agents.py
WF=examples/document_processing.yaml
export NOTIFY_TOKEN=${NOTIFY_TOKEN:-demo-token}
export FLOWLEDGER_HOME=${FLOWLEDGER_HOME:-.flowledger}

# The workflow's last step posts to a webhook: a small receiver stands in for it.
.venv/bin/python examples/receiver.py 8099 &
receiver=$!
trap 'kill $receiver 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  .venv/bin/python -c "import socket; socket.create_connection(('127.0.0.1', 8099), 0.2)" \
    2>/dev/null && break
  sleep 0.1
done

echo "== 1. validate the definition"
$FL validate $WF

echo "== 2. an invoice: OCR + metadata in parallel, a loop over its pages, validation with retries"
$FL run $WF --agents $AGENTS --input '{"document_url": "https://example.com/invoice-1042.pdf"}'

echo "== 3. a contract: it waits for legal's review (exit code 3)"
set +e
$FL run $WF --agents $AGENTS --json \
  --input '{"document_url": "https://example.com/contract-7.pdf"}' > "$FLOWLEDGER_HOME/contract.json"
code=$?
set -e
[ "$code" -eq 3 ] || { echo "expected exit 3 (waiting for a person), got $code"; exit 1; }
contract=$(.venv/bin/python -c "import json,sys; print(json.load(open(sys.argv[1]))['execution_id'])" \
  "$FLOWLEDGER_HOME/contract.json")
echo "execution $contract waits for contract_review (assignee: legal)"

echo "== 4. legal approves; the execution runs to the end"
$FL complete "$contract" contract_review --data '{"approved": true, "notes": "standard terms"}' \
  --agents $AGENTS

echo "== 5. an unknown document: the classifier gives up, a person is asked (error handler)"
set +e
$FL run $WF --agents $AGENTS --json \
  --input '{"document_url": "https://example.com/scan-0001.pdf"}' > "$FLOWLEDGER_HOME/unknown.json"
code=$?
set -e
[ "$code" -eq 3 ] || { echo "expected exit 3 (waiting for a person), got $code"; exit 1; }
unknown=$(.venv/bin/python -c "import json,sys; print(json.load(open(sys.argv[1]))['execution_id'])" \
  "$FLOWLEDGER_HOME/unknown.json")
$FL complete "$unknown" human_review --data '{"doc_type": "receipt"}' --agents $AGENTS

echo "== 6. every execution in the store"
$FL executions list

echo "== 7. a day's batch: 24 more invoices, so the optimizer has enough runs to go by"
for n in $(seq 1 24); do
  $FL run $WF --agents $AGENTS --json \
    --input "{\"document_url\": \"https://example.com/invoice-$((2000 + n)).pdf\"}" > /dev/null
done

echo "== 8. the optimizer's report on these runs: critical path, bottlenecks, recommendations"
$FL optimize document-processing

echo
echo "== the web console over this store: run"
echo "   FLOWLEDGER_HOME=$FLOWLEDGER_HOME NOTIFY_TOKEN=$NOTIFY_TOKEN .venv/bin/flowledger serve --agents $AGENTS"
echo "   and open http://127.0.0.1:8080/ (executions, graphs, timelines, the inbox, the optimizer)"
