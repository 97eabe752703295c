"""A bounded property-based run of schemathesis against the coordinator's own /openapi.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.generation import GenerationMode

from tests.coordinator.helpers import capabilities
from tests.servers import run_coordinator

EXAMPLES_PER_OPERATION = 25
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]
FUZZ_MINER = "fuzz-miner"
NO_INPUT = frozenset({"/health", "/v1/health", "/v1/receipts/key"})  # no parameters, no body


def test_openapi_document_is_3_1_and_complete(tmp_path: Path) -> None:
    """/openapi.json is OpenAPI 3.1 and documents every client and miner endpoint with its 4xx answers."""
    with run_coordinator(tmp_path / "c.db", rate_limits=None) as coord:
        document = httpx.get(f"{coord.url}/openapi.json").json()
    assert document["openapi"].startswith("3.1")
    paths = document["paths"]
    for path in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/result", "/v1/jobs/{job_id}/cancel",
                 "/v1/jobs/{job_id}/payment", "/v1/jobs/{job_id}/receipt", "/v1/jobs/{job_id}/receipts",
                 "/v1/miners/register", "/v1/miners/heartbeat", "/v1/miners/poll", "/v1/miners/{job_id}/result",
                 "/v1/miners/{job_id}/fail"):
        assert path in paths, path
        for operation in paths[path].values():
            assert {"401", "422"} <= set(operation["responses"]), path
    assert "425" in paths["/v1/jobs/{job_id}/result"]["get"]["responses"]
    assert "204" in paths["/v1/miners/poll"]["post"]["responses"]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_schemathesis_finds_no_server_error_or_schema_violation(tmp_path: Path, mode: GenerationMode) -> None:
    """Generated requests to every operation get no 5xx and no answer outside the documented schema."""
    with run_coordinator(tmp_path / "c.db", rate_limits=None, max_poll_wait=0.2) as coord:
        miner_headers = {"X-Api-Key": coord.miner_key, "X-Miner-ID": FUZZ_MINER}
        registered = httpx.post(f"{coord.url}/v1/miners/register", headers=miner_headers,
                                json={"capabilities": capabilities(None)})
        assert registered.status_code == 200
        schema = schemathesis.openapi.from_url(f"{coord.url}/openapi.json")
        checks = CHECKS + [negative_data_rejection if mode is GenerationMode.NEGATIVE else positive_data_acceptance]
        operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
        assert len(operations) >= 12
        for operation in operations:
            is_miner = operation.path.startswith("/v1/miners")
            headers = miner_headers if is_miner else {"X-Api-Key": coord.client_key}
            if mode is GenerationMode.NEGATIVE:  # X-Miner-ID is a documented parameter: let it be mutated
                headers = {"X-Api-Key": headers["X-Api-Key"]}
                if operation.path in NO_INPUT:
                    continue  # nothing to make invalid
            exercise(operation, mode, coord.url, headers, checks)


def exercise(operation: Any, mode: GenerationMode, base_url: str, headers: dict[str, str],
             checks: list[Any]) -> None:
    """Run the generated cases of one operation against the server."""

    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=base_url, headers=headers, checks=checks, timeout=10)

    run()
