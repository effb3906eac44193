"""Train the example fraud classifier and write what MLServer and the scripts need.

A synthetic, imbalanced card-transaction set from scikit-learn's `make_classification` (fixed
seed, about 3% fraud, some label noise so the model is honestly unsure about a few), with the
first feature turned into a transaction amount in dollars. A gradient-boosted classifier is
trained on 75% of it; the held-out 25% is kept for `results.py`.

Writes (under --root, default: this folder):
  models/fraud/model.joblib   the fitted classifier, for MLServer's scikit-learn runtime
  data/holdout.csv            held-out transactions: amount, f1..f8, label (1 = fraud)
  data/samples.json           a few held-out transactions to send by hand: confident, uncertain
                              and large-amount ones (used by send.py and the end-to-end tests)

Training takes a few seconds and is deterministic: the same seed gives the same model.

Run it with the MLServer virtualenv's Python, so the pickle matches the server's scikit-learn:
  .venv-mlserver/bin/python train.py
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import joblib
import numpy as np
from sklearn.datasets import make_classification
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.model_selection import train_test_split

SEED = 7
N_SAMPLES = 20_000
FEATURES = ["amount", *(f"f{i}" for i in range(1, 9))]
#: The fallback rule in policy.yaml sends amounts over this to review when the model is down.
LARGE_AMOUNT = 1000.0
HERE = Path(__file__).resolve().parent


def make_data() -> tuple[np.ndarray, np.ndarray]:
    x, y = make_classification(
        n_samples=N_SAMPLES,
        n_features=9,
        n_informative=5,
        n_redundant=2,
        n_clusters_per_class=2,
        weights=[0.97],
        flip_y=0.01,
        class_sep=1.0,
        random_state=SEED,
    )
    # Feature 0 becomes an amount in dollars: log-normal, larger for fraud (it is informative).
    x[:, 0] = np.round(np.exp(4.5 + 1.1 * x[:, 0]), 2)
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=HERE, help="where models/ and data/ go")
    args = parser.parse_args()

    x, y = make_data()
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, stratify=y, random_state=SEED
    )
    model = HistGradientBoostingClassifier(max_iter=200, learning_rate=0.1, random_state=SEED)
    model.fit(x_train, y_train)

    model_dir = args.root / "models" / "fraud"
    data_dir = args.root / "data"
    model_dir.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, model_dir / "model.joblib")

    with (data_dir / "holdout.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([*FEATURES, "label"])
        for row, label in zip(x_test, y_test, strict=True):
            writer.writerow([*(repr(float(v)) for v in row), int(label)])

    proba = model.predict_proba(x_test)
    top = proba.max(axis=1)
    order = np.argsort(top)
    # Two of the most confident legitimate answers and the most confident fraud call, a few the
    # model is unsure about (top probability near 0.6, 0.75 and 0.85) and amounts the fallback
    # rule calls large.
    pred = proba.argmax(axis=1)
    legit = [i for i in order[::-1] if pred[i] == 0][:2]
    fraud = [i for i in order[::-1] if pred[i] == 1][:1]
    picks = {
        "confident": [*legit, *fraud],
        "uncertain": [int(np.argmin(np.abs(top - t))) for t in (0.6, 0.75, 0.85)],
        "large_amount": [int(i) for i in np.flatnonzero(x_test[:, 0] > LARGE_AMOUNT)[:2]],
    }
    samples = {k: [_sample(x_test, y_test, proba, i) for i in v] for k, v in picks.items()}
    (data_dir / "samples.json").write_text(json.dumps(samples, indent=2) + "\n")

    accuracy = float((pred == y_test).mean())
    print(
        f"trained on {len(y_train)} transactions ({y_train.mean():.1%} fraud); "
        f"held-out accuracy {accuracy:.4f} on {len(y_test)}; "
        f"top probability < 0.9 for {(top < 0.9).mean():.1%}"
    )
    print(
        f"wrote {model_dir / 'model.joblib'}, {data_dir / 'holdout.csv'}, "
        f"{data_dir / 'samples.json'}"
    )


def _sample(x: np.ndarray, y: np.ndarray, proba: np.ndarray, i: int) -> dict[str, object]:
    return {
        "features": [float(v) for v in x[i]],
        "label": int(y[i]),
        "predict_proba": [round(float(p), 6) for p in proba[i]],
    }


if __name__ == "__main__":
    main()
