"""The review API against its own OpenAPI document, with schemathesis: generated requests (valid
and invalid) go to a live admin listener; every answer must be documented, match its schema and
never be a server error. The document served at /reviews/openapi.json is the one tested."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from sidecar.review.openapi import openapi_document
from tests.conftest import simple_policy, write_policy
from tests.support.processes import RunningProcess, sidecar_cmd, start_process

TOKEN = "reviewer-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

schema = schemathesis.openapi.from_dict(openapi_document())


class Admin:
    def __init__(self, url: str, ids: list[str]) -> None:
        self.url = url
        self.ids = ids


@pytest.fixture(scope="module")
def admin(demo_model: RunningProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Admin]:
    """A sidecar whose queue holds a few items (one resolved), so claims and resolves also hit
    real items, not only unknown ids."""
    tmp: Path = tmp_path_factory.mktemp("review-openapi")
    confidence = {"extract": {"kind": "kserve_v2"}, "audit_sample": 0}
    policy = write_policy(tmp, simple_policy(demo_model.ready["url"], confidence=confidence))
    rp = start_process(
        sidecar_cmd("run", "--policy", str(policy), "--port", "0", "--admin-port", "0"),
        env={"SIDECAR_STATE_DIR": str(tmp / "state"), "SIDECAR_REVIEWER_TOKEN": TOKEN},
    )
    try:
        proxy, admin_url = "http://" + rp.ready["proxy"], "http://" + rp.ready["admin"]
        ids = []
        for i in range(4):
            request = urllib.request.Request(
                proxy + "/v2/models/m/infer",
                data=b'{"inputs": []}',
                headers={"x-demo-fault": "confidence=0.7", "x-request-id": f"seed-{i}"},
            )
            with urllib.request.urlopen(request, timeout=10) as resp:
                ids.append(json.loads(resp.read())["review_id"])
        resolve = urllib.request.Request(
            f"{admin_url}/reviews/{ids[0]}/resolve",
            data=b'{"decision": "approve", "reviewer": "seed"}',
            headers={**AUTH, "Content-Type": "application/json"},
        )
        urllib.request.urlopen(resolve, timeout=10).close()
        yield Admin(admin_url, ids)
    finally:
        rp.stop()


def test_the_served_document_is_the_tested_one(admin: Admin) -> None:
    with urllib.request.urlopen(admin.url + "/reviews/openapi.json", timeout=10) as resp:
        assert json.loads(resp.read()) == json.loads(json.dumps(openapi_document()))


@pytest.mark.timeout(60)
@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    database=None,  # nothing written to .hypothesis/ in the work tree
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_review_api_conforms_to_its_openapi_document(case: Any, admin: Admin) -> None:
    path = case.path_parameters or {}
    review_id = path.get("id")
    if (
        isinstance(review_id, str)
        and re.fullmatch(r"[0-9a-f]{32}", review_id)
        and review_id[:1] in "01234567"
    ):
        # Half of the well-formed generated ids point at seeded items (deterministic per case);
        # an id schemathesis made invalid on purpose stays invalid and must be refused.
        path["id"] = admin.ids[int(review_id[0], 16) % len(admin.ids)]
    case.call_and_validate(base_url=admin.url, headers=AUTH, timeout=10)
