"""`sidecar reviews export` (labelled examples, redacted) and `sidecar calibrate` reading resolved
reviews straight from a seeded review store, audit samples weighted by 1/audit_sample."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest

from sidecar.cli import build_parser
from sidecar.failures.cli import run_calibrate
from sidecar.review.cli import run_reviews
from sidecar.review.sqlite import DB_NAME, SqliteReviewStore
from sidecar.review.store import Decision, NewReview, Resolution

EMAIL = "someone@example.org"


def new_review(
    i: int, confidence: float, reason: str = "review", route: str = "fraud"
) -> NewReview:
    return NewReview(
        request_id=f"req-{i}",
        trace_id=f"{i:032x}",
        route=route,
        reason=reason,
        action="audit" if reason == "audit" else "escalate",
        confidence=confidence,
        request={
            "method": "POST",
            "path": "/v2/models/fraud/infer?api_key=secret",
            "content_type": "application/json",
            "body": json.dumps({"inputs": [1.0], "email": EMAIL}),
            "body_truncated": False,
        },
        answer={
            "status": 200,
            "content_type": "application/json",
            "body": json.dumps({"outputs": [confidence]}),
            "body_truncated": False,
        },
    )


@pytest.fixture(autouse=True)
def embedded_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SQLite store under --state-dir, whatever the environment says."""
    monkeypatch.delenv("SIDECAR_DATABASE_URL", raising=False)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """60 resolved reviews (wrong below 0.6, right above), 10 audit samples, 2 pending."""

    async def seed() -> None:
        store = SqliteReviewStore(tmp_path / DB_NAME)
        rng = random.Random(1)
        for i in range(60):
            score = rng.uniform(0.5, 0.9)
            item = (await store.enqueue(new_review(i, score))).item
            wrong = score < 0.6
            await store.resolve(
                item.id,
                Resolution(
                    decision=Decision.OVERRIDE if wrong else Decision.APPROVE,
                    reviewer="alice",
                    note=f"mail {EMAIL}" if wrong else None,
                    corrected={"label": "fraud", "contact": EMAIL} if wrong else None,
                ),
            )
        for i in range(60, 70):
            item = (await store.enqueue(new_review(i, 0.97, reason="audit"))).item
            await store.resolve(item.id, Resolution(Decision.APPROVE, "bob"))
        for i in range(70, 72):
            await store.enqueue(new_review(i, 0.7))
        await store.close()

    asyncio.run(seed())
    return tmp_path


def test_reviews_export_writes_redacted_labelled_examples(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args(["reviews", "export", "--state-dir", str(state_dir)])
    assert run_reviews(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 70  # resolved only
    wrong = [x for x in lines if x["label"] == "wrong"]
    right = [x for x in lines if x["label"] == "correct"]
    assert wrong and right and len(wrong) + len(right) == 70
    example = wrong[0]
    assert example["decision"] == "override"
    assert example["input"] == {"inputs": [1.0], "email": "[EMAIL]"}
    assert example["model_answer"] == {"outputs": [example["confidence"]]}
    assert example["corrected_answer"] == {"label": "fraud", "contact": "[EMAIL]"}
    assert example["note"] == "mail [EMAIL]"
    assert example["input_meta"]["path"] == "/v2/models/fraud/infer"  # no query string
    assert EMAIL not in json.dumps(lines) and "api_key=secret" not in json.dumps(lines)

    args = build_parser().parse_args(
        ["reviews", "export", "--state-dir", str(state_dir), "--all", "--no-redact"]
    )
    assert run_reviews(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 72 and sum(1 for x in lines if x["label"] is None) == 2
    assert EMAIL in json.dumps(lines)


def test_reviews_export_without_a_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["reviews", "export", "--state-dir", str(tmp_path)])
    assert run_reviews(args) == 1
    assert "no review store" in capsys.readouterr().err
    assert not (tmp_path / DB_NAME).exists()


def test_calibrate_reads_resolved_reviews_and_weights_audits(
    state_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "upstreams: {model: {url: 'http://127.0.0.1:9'}}\n"
        "routes:\n"
        "  - name: fraud\n"
        "    confidence:\n"
        "      extract: {kind: kserve_v2}\n"
        "      auto_above: 0.8\n"
        "      reject_below: 0.5\n"
        "      audit_sample: 0.05\n"
    )

    def calibrate(*argv: str) -> dict[str, object]:
        args = build_parser().parse_args(
            ["calibrate", "--state-dir", str(state_dir), "--json", *argv]
        )
        assert run_calibrate(args) == 0
        data: dict[str, object] = json.loads(capsys.readouterr().out)
        return data

    data = calibrate("--policy", str(policy), "--route", "fraud")
    examples = data["examples"]
    assert isinstance(examples, dict)
    assert examples["count"] == 70 and examples["audit_sample"] == 0.05
    # 60 reviewed + 10 audits standing for 20 answers each.
    assert examples["weighted_total"] == pytest.approx(60 + 10 * 20)
    proposed = data["proposed"]
    current = data["current"]
    assert isinstance(proposed, dict) and isinstance(current, dict)
    # Every wrong answer scored below 0.6 and every right one above: the cut lands there.
    assert 0.55 <= float(proposed["auto_above"]) <= 0.62
    assert proposed["wrong_auto"] == 0
    assert current["auto_above"] == 0.8 and current["reject_below"] == 0.5

    rate = calibrate("--target-review-rate", "0.1")
    proposed = rate["proposed"]
    assert isinstance(proposed, dict) and float(proposed["review_share"]) <= 0.1 + 1e-9
    assert float(proposed["caught_by_review"]) > float(proposed["random_caught"])
