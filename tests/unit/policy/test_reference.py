"""The committed policy reference is exactly what the code generates (`make docs`)."""

from __future__ import annotations

from pathlib import Path

from sidecar.policy.reference import generate_reference
from sidecar.policy.schema import Policy

REPO = Path(__file__).resolve().parents[3]


def test_committed_reference_matches_the_models() -> None:
    committed = (REPO / "docs" / "policy-reference.md").read_text(encoding="utf-8")
    assert committed == generate_reference(), (
        "docs/policy-reference.md is out of date: run `make docs` and commit the result"
    )


def test_reference_names_every_field() -> None:
    text = generate_reference()
    for name, info in Policy.model_fields.items():
        assert f"`{info.alias or name}`" in text
    assert "## RoutePolicy" in text and "## BreakerPolicy" in text
