"""KServe V2 requests and answers for the fraud example (standard library only).

Shared by send.py and results.py: build the V2 request for one transaction (asking MLServer for
`predict` and `predict_proba`), post it, and read back what the caller got: the decision, the
sidecar's outcome headers and the model's probabilities.
"""

from __future__ import annotations

import csv
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL = "fraud"
INFER_PATH = f"/v2/models/{MODEL}/infer"
FEATURES = ["amount", *(f"f{i}" for i in range(1, 9))]
LABELS = {0: "legit", 1: "fraud"}


def infer_request(features: list[float]) -> dict[str, Any]:
    """One transaction as a V2 request: a [1, 9] FP64 tensor, amount first."""
    return {
        "inputs": [
            {
                "name": "transaction",
                "shape": [1, len(features)],
                "datatype": "FP64",
                "data": [float(v) for v in features],
            }
        ],
        # MLServer's scikit-learn runtime answers `predict` by default; the confidence gate reads
        # the class probabilities, so ask for both.
        "outputs": [{"name": "predict"}, {"name": "predict_proba"}],
    }


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: Any

    @property
    def outcome(self) -> str:
        return self.headers.get("x-sidecar-outcome", "-")

    @property
    def confidence(self) -> float | None:
        value = self.headers.get("x-sidecar-confidence")
        return float(value) if value else None

    def output(self, name: str) -> list[Any] | None:
        outputs = self.body.get("outputs") if isinstance(self.body, dict) else None
        for item in outputs or []:
            if isinstance(item, dict) and item.get("name") == name:
                data = item.get("data")
                return data if isinstance(data, list) else None
        return None

    @property
    def proba(self) -> list[float] | None:
        data = self.output("predict_proba")
        return [float(v) for v in data] if data else None

    @property
    def decision(self) -> str:
        """`legit` / `fraud` from the model, or a fallback's decision (`review`, `approve`)."""
        fallback = self.output("decision")
        if fallback:
            return str(fallback[0])
        predicted = self.output("predict")
        if predicted:
            return LABELS.get(int(predicted[0]), str(predicted[0]))
        proba = self.proba
        if proba:
            return LABELS[max(range(len(proba)), key=proba.__getitem__)]
        return "-"


def post(
    base_url: str, features: list[float], *, request_id: str | None = None, timeout: float = 5.0
) -> Answer:
    headers = {"content-type": "application/json"}
    if request_id:
        headers["x-request-id"] = request_id
    req = urllib.request.Request(
        base_url.rstrip("/") + INFER_PATH,
        data=json.dumps(infer_request(features)).encode(),
        headers=headers,
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw, hdrs = resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as err:
        status, raw, hdrs = err.code, err.read(), err.headers
    try:
        body = json.loads(raw) if raw else None
    except ValueError:
        body = raw.decode("utf-8", "replace")
    return Answer(status, {k.lower(): v for k, v in hdrs.items()}, body)


def read_holdout(path: Path) -> list[tuple[list[float], int]]:
    """The held-out set train.py wrote: (features, label) rows."""
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        if header != [*FEATURES, "label"]:
            raise SystemExit(f"{path}: unexpected columns {header}")
        return [([float(v) for v in row[:-1]], int(row[-1])) for row in reader]
