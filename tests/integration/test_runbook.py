"""Every `sidecar_*` metric docs/runbook.md names is exported at `/metrics` of a running sidecar
(scraped, not taken from the code), so an operator never searches for a metric that is not
there."""

from __future__ import annotations

import re

import aiohttp
import pytest

from tests.conftest import REPO, SidecarFactory, simple_policy

pytestmark = pytest.mark.timeout(60)


async def test_every_metric_the_runbook_names_is_exported(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = start_sidecar(simple_policy(model_url))
    async with http.get(sc.admin_url + "/metrics") as resp:
        assert resp.status == 200
        body = await resp.text()
    exported = set(re.findall(r"^# TYPE (\S+) ", body, re.MULTILINE))
    exported |= {line.split("{")[0].split(" ")[0] for line in body.splitlines() if line[:1] != "#"}
    text = (REPO / "docs" / "runbook.md").read_text(encoding="utf-8")
    named = set(re.findall(r"\bsidecar_[a-z0-9_]+", text))
    assert len(named) >= 15, sorted(named)
    missing = sorted(named - exported)
    assert not missing, f"named in the runbook but not exported at /metrics: {missing}"
