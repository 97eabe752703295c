"""``ws /v1/jobs/{id}/ws`` over a real websocket connection."""

from __future__ import annotations

import json

import pytest
from websockets.exceptions import ConnectionClosedOK, InvalidStatus
from websockets.sync.client import connect

from coordinator.client import Client
from miner.wire.protocol import parse_timestamp
from tests.coordinator.helpers import ScriptedMiner
from tests.servers import RunningCoordinator

PAYLOAD = {"model": "tiny", "prompt": "hello"}


def test_websocket_pushes_every_state_change(coordinator: RunningCoordinator, coordinator_client: Client) -> None:
    """The socket sends the state on connect and on each change, then closes after the final state."""
    job_id = coordinator_client.submit_job(PAYLOAD)["job_id"]
    url = f"{coordinator.ws_url}/v1/jobs/{job_id}/ws"
    with connect(url, additional_headers={"X-Api-Key": coordinator.client_key}, open_timeout=10) as ws, \
            ScriptedMiner(coordinator) as miner:
        first = json.loads(ws.recv(timeout=10))
        assert first["job_id"] == job_id and first["state"] == "QUEUED"
        parse_timestamp(first["timestamp"])
        miner.register()
        miner.claim()
        assert json.loads(ws.recv(timeout=10))["state"] == "RUNNING"
        miner.result(job_id)
        last = json.loads(ws.recv(timeout=10))
        assert last["state"] == "COMPLETED" and last["job_id"] == job_id
        assert parse_timestamp(last["timestamp"]) >= parse_timestamp(first["timestamp"])
        with pytest.raises(ConnectionClosedOK):
            ws.recv(timeout=10)


def test_websocket_query_parameter_auth_and_cancel(coordinator: RunningCoordinator,
                                                   coordinator_client: Client) -> None:
    """The api_key query parameter authenticates (for browsers), and a cancel is pushed as CANCELLED."""
    job_id = coordinator_client.submit_job(PAYLOAD)["job_id"]
    url = f"{coordinator.ws_url}/v1/jobs/{job_id}/ws?api_key={coordinator.client_key}"
    with connect(url, open_timeout=10) as ws:
        assert json.loads(ws.recv(timeout=10))["state"] == "QUEUED"
        coordinator_client.cancel_job(job_id)
        assert json.loads(ws.recv(timeout=10))["state"] == "CANCELLED"


def test_websocket_on_finished_job_sends_final_state(coordinator: RunningCoordinator,
                                                     coordinator_client: Client) -> None:
    """Connecting to a finished job sends its final state once and closes normally."""
    job_id = coordinator_client.submit_job(PAYLOAD)["job_id"]
    coordinator_client.cancel_job(job_id)
    with connect(f"{coordinator.ws_url}/v1/jobs/{job_id}/ws",
                 additional_headers={"X-Api-Key": coordinator.client_key}, open_timeout=10) as ws:
        assert json.loads(ws.recv(timeout=10))["state"] == "CANCELLED"
        with pytest.raises(ConnectionClosedOK):
            ws.recv(timeout=10)


@pytest.mark.parametrize("case", ["bad_key", "no_key", "unknown_job"])
def test_websocket_refuses_bad_key_or_unknown_job(coordinator: RunningCoordinator, coordinator_client: Client,
                                                  case: str) -> None:
    """A wrong or missing key, or a job this key does not own, is refused at the handshake (403)."""
    job_id = coordinator_client.submit_job(PAYLOAD)["job_id"] if case != "unknown_job" else "nope"
    headers = {"bad_key": {"X-Api-Key": "wrong"}, "no_key": {}}.get(case, {"X-Api-Key": coordinator.client_key})
    with pytest.raises(InvalidStatus) as caught:
        with connect(f"{coordinator.ws_url}/v1/jobs/{job_id}/ws", additional_headers=headers, open_timeout=10):
            pass
    assert caught.value.response.status_code == 403
