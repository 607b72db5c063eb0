#!/usr/bin/env python3
"""Trains Fleetline's predictive models on simulator runs and exports them as ONNX.

Data: `fleetline-sim demo` runs (one seed to train on, another held out), each
leaving a lake (the `aggregates` dataset's closed one-minute windows per vehicle)
and `ground-truth.json` (every injected incident: vehicle, kind, wheel, start,
end). From them:

  tire_risk   classifier: does a tire of this vehicle have a leak or puncture
              developing (an incident active in the window)? From the pressure
              and leak-rate features of the window and the one before it.
  fuel        regressor: litres a window should use from how it was driven; a
              large positive residual flags theft or a fault. Trained on windows
              without a fuel incident.
  speed_next  regressor (gradient-boosted trees): the next window's average
              speed from the last three.

Every model takes one float32 tensor `features` [n, k] in the order of its card
and is exported without ZipMap or Scaler (tract-onnx 0.23 loads neither; the
cloud registers its own tree-ensemble operators, for both classifiers and
regressors).
Each goes to `models/<name>/model.onnx` with `card.json` (features in order with
units, training and held-out sizes and seeds, metrics on the held-out seed).

The extracted tables are written to `models/data/{train,heldout}.csv.gz`. Training
from them is deterministic: `train.py --from-csv` reproduces the committed
models bit for bit (checked by `--check`). Running the simulator again does not
give the same rows — its clock starts at the wall-clock time of the run, so
window boundaries and noise draws fall differently.

  models/train.py --sim target/release/fleetline-sim        # simulate, extract, train
  models/train.py --from-csv                                 # train from the committed tables
  models/train.py --from-csv --check                         # and compare with the committed models
"""

import argparse
import csv
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile

import duckdb
import numpy as np
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.ensemble import GradientBoostingClassifier, GradientBoostingRegressor
from sklearn.linear_model import LinearRegression
from sklearn.metrics import mean_absolute_error, precision_score, recall_score, roc_auc_score

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN_SEED = 101
HELDOUT_SEED = 202
RUN = {"vehicles": 500, "time_scale": 20, "duration": "120s"}
THRESHOLD = 0.5

# Columns of the extracted tables, with units.
COLUMNS = [
    ("device_id", ""),
    ("start_ms", "Unix ms"),
    ("distance_km", "km"),
    ("avg_speed_kmh", "km/h"),
    ("max_speed_kmh", "km/h"),
    ("fuel_used_l", "l"),
    ("tire_pressure_min_kpa", "kPa"),
    ("tire_pressure_mean_kpa", "kPa"),
    ("tire_pressure_max_kpa", "kPa"),
    ("leak_rate_kpa_h", "kPa/h"),
    ("tire_incident", "0/1"),
    ("fuel_incident", "0/1"),
]

# Features of each model, in input order: (name, unit, how it is made from windows).
FEATURES = {
    "tire_risk": [
        ("tire_pressure_min_kpa", "kPa", "lowest tire pressure in the window"),
        ("tire_pressure_mean_kpa", "kPa", "mean tire pressure in the window"),
        ("tire_pressure_spread_kpa", "kPa", "highest minus lowest tire pressure in the window"),
        ("leak_rate_kpa_h", "kPa/h", "fastest temperature-compensated pressure loss of any tire in the window"),
        ("leak_rate_prev_kpa_h", "kPa/h", "the same in the window before"),
        ("pressure_min_change_kpa", "kPa", "lowest pressure minus the window before's"),
    ],
    "fuel": [
        ("distance_km", "km", "distance driven in the window"),
        ("avg_speed_kmh", "km/h", "mean speed in the window"),
        ("max_speed_kmh", "km/h", "highest speed in the window"),
    ],
    "speed_next": [
        ("avg_speed_kmh", "km/h", "mean speed in the window"),
        ("avg_speed_prev_kmh", "km/h", "mean speed in the window before"),
        ("avg_speed_prev2_kmh", "km/h", "mean speed two windows before"),
        ("max_speed_kmh", "km/h", "highest speed in the window"),
        ("distance_km", "km", "distance driven in the window"),
    ],
}


def simulate(sim, seed, workdir):
    data = os.path.join(workdir, f"seed-{seed}")
    subprocess.run(
        [sim, "demo", "--vehicles", str(RUN["vehicles"]), "--time-scale", str(RUN["time_scale"]),
         "--duration", RUN["duration"], "--seed", str(seed), "--data-dir", data],
        check=True, stdout=subprocess.DEVNULL,
    )
    return data


def extract(data_dir):
    """One row per (vehicle, closed one-minute window), with incident labels."""
    truth = json.load(open(os.path.join(data_dir, "ground-truth.json")))
    rows = duckdb.connect().execute(f"""
        SELECT device_id, epoch_ms(window_start), distance_m, avg_speed_kmh, max_speed_kmh, fuel_used_l,
               tire_pressure_min_kpa, tire_pressure_mean_kpa, tire_pressure_max_kpa, leak_rate_kpa_h,
               epoch_ms(window_end)
        FROM read_parquet('{data_dir}/lake/aggregates/**/*.parquet', hive_partitioning = true)
        WHERE "window" = '1m'
        ORDER BY device_id, window_start
    """).fetchall()
    by_device = {}
    for t in truth:
        by_device.setdefault(t["device_id"], []).append(t)
    out = []
    for (dev, start, dist_m, avg, mx, fuel, pmin, pmean, pmax, leak, end) in rows:
        def active(kinds):
            return int(any(t["kind"] in kinds and t["start_ms"] < end and start < t["end_ms"]
                           for t in by_device.get(dev, [])))
        out.append({
            "device_id": dev, "start_ms": start, "distance_km": (dist_m or 0.0) / 1000.0,
            "avg_speed_kmh": avg, "max_speed_kmh": mx, "fuel_used_l": fuel,
            "tire_pressure_min_kpa": pmin, "tire_pressure_mean_kpa": pmean, "tire_pressure_max_kpa": pmax,
            "leak_rate_kpa_h": leak,
            "tire_incident": active(("slow_leak", "puncture")),
            "fuel_incident": active(("fuel_theft", "refuel")),
        })
    return out


def write_csv(rows, path):
    with gzip.GzipFile(path, "wb", mtime=0) as raw, io.TextIOWrapper(raw, newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow([c for c, _ in COLUMNS])
        for r in rows:
            w.writerow(["" if r[c] is None else (repr(r[c]) if isinstance(r[c], float) else r[c]) for c, _ in COLUMNS])


def read_csv(path):
    rows = []
    with gzip.open(path, "rt", newline="") as f:
        for r in csv.DictReader(f):
            row = {}
            for c, _ in COLUMNS:
                v = r[c]
                if c == "device_id":
                    row[c] = v
                elif c in ("start_ms", "tire_incident", "fuel_incident"):
                    row[c] = int(v)
                else:
                    row[c] = None if v == "" else float(v)
            rows.append(row)
    return rows


def windows_by_vehicle(rows):
    out = {}
    for r in rows:
        out.setdefault(r["device_id"], []).append(r)
    for ws in out.values():
        ws.sort(key=lambda r: r["start_ms"])
    return out


def consecutive(a, b):
    return b["start_ms"] - a["start_ms"] == 60_000


def tire_set(rows):
    x, y = [], []
    for ws in windows_by_vehicle(rows).values():
        for prev, cur in zip(ws, ws[1:]):
            if not consecutive(prev, cur):
                continue
            vals = [cur["tire_pressure_min_kpa"], cur["tire_pressure_mean_kpa"], cur["tire_pressure_max_kpa"],
                    cur["leak_rate_kpa_h"], prev["leak_rate_kpa_h"], prev["tire_pressure_min_kpa"]]
            if any(v is None for v in vals):
                continue
            pmin, pmean, pmax, leak, leak_prev, pmin_prev = vals
            x.append([pmin, pmean, pmax - pmin, leak, leak_prev, pmin - pmin_prev])
            y.append(cur["tire_incident"])
    return np.array(x, dtype=np.float32), np.array(y)


def fuel_set(rows):
    x, y = [], []
    for r in rows:
        vals = [r["distance_km"], r["avg_speed_kmh"], r["max_speed_kmh"], r["fuel_used_l"]]
        if any(v is None for v in vals) or r["fuel_incident"]:
            continue
        x.append(vals[:3])
        y.append(vals[3])
    return np.array(x, dtype=np.float32), np.array(y, dtype=np.float32)


def speed_set(rows):
    x, y = [], []
    for ws in windows_by_vehicle(rows).values():
        for a, b, c, d in zip(ws, ws[1:], ws[2:], ws[3:]):
            if not (consecutive(a, b) and consecutive(b, c) and consecutive(c, d)):
                continue
            vals = [c["avg_speed_kmh"], b["avg_speed_kmh"], a["avg_speed_kmh"], c["max_speed_kmh"],
                    c["distance_km"], d["avg_speed_kmh"]]
            if any(v is None for v in vals):
                continue
            x.append(vals[:5])
            y.append(vals[5])
    return np.array(x, dtype=np.float32), np.array(y, dtype=np.float32)


def export(model, name, n_features, classifier):
    options = {id(model): {"zipmap": False}} if classifier else None
    onx = convert_sklearn(model, initial_types=[("features", FloatTensorType([None, n_features]))],
                          options=options, target_opset={"": 17, "ai.onnx.ml": 3})
    onx.producer_name = "fleetline-models"
    onx.producer_version = "1"
    onx.doc_string = f"Fleetline {name} model"
    # skl2onnx names the graph with a random UUID and lists the operator sets in
    # the order of a Python set: a fixed name and a sorted list keep the bytes
    # reproducible from one run to the next.
    onx.graph.name = f"fleetline_{name}"
    if classifier:
        fold_base_value(onx)
    imports = sorted((o.domain, o.version) for o in onx.opset_import)
    del onx.opset_import[:]
    for domain, version in imports:
        onx.opset_import.add(domain=domain, version=version)
    return onx


def fold_base_value(onx):
    """Moves a binary tree classifier's one base value into the leaves of its
    first tree. skl2onnx gives a binary classifier one base value; tract-onnx
    0.23 wants one per class label (two) and refuses the node. Every row
    reaches exactly one leaf of tree 0, so adding the base value to those
    leaves gives the same sum; onnxruntime's scores move by at most 4e-7."""
    (node,) = [n for n in onx.graph.node if n.op_type == "TreeEnsembleClassifier"]
    attrs = {a.name: a for a in node.attribute}
    base = attrs.get("base_values")
    if base is None:
        return
    if len(base.floats) != 1 or any(c != 0 for c in attrs["class_ids"].ints):
        raise SystemExit("only a binary classifier with one base value is folded")
    value = base.floats[0]
    weights = attrs["class_weights"].floats
    for i, tree in enumerate(attrs["class_treeids"].ints):
        if tree == 0:
            weights[i] = float(np.float32(weights[i] + value))
    node.attribute.remove(base)


# Family of each regressor: the one with the lower held-out error, the other's
# error kept on the card. Linear for fuel (trees do no better), gradient-boosted
# trees for the next window's speed (about an eighth lower error).
REGRESSORS = {"fuel": "linear", "speed_next": "trees"}


def make_regressor(family):
    if family == "linear":
        return LinearRegression()
    return GradientBoostingRegressor(n_estimators=60, max_depth=3, learning_rate=0.1, random_state=7)


def train(train_rows, heldout_rows):
    models = {}
    x, y = tire_set(train_rows)
    hx, hy = tire_set(heldout_rows)
    clf = GradientBoostingClassifier(n_estimators=60, max_depth=3, learning_rate=0.1, random_state=7)
    clf.fit(x, y)
    p = clf.predict_proba(hx)[:, 1]
    metrics = {
        "auc": round(float(roc_auc_score(hy, p)), 4) if len(set(hy)) > 1 else None,
        f"precision_at_{THRESHOLD}": round(float(precision_score(hy, p >= THRESHOLD, zero_division=0)), 4),
        f"recall_at_{THRESHOLD}": round(float(recall_score(hy, p >= THRESHOLD, zero_division=0)), 4),
        "positives": int(hy.sum()),
    }
    models["tire_risk"] = (clf, True, len(x), int(y.sum()), len(hx), metrics,
                           {"output": "probabilities [n, 2]; column 1 is the risk", "alert_threshold": THRESHOLD})
    for name, make in (("fuel", fuel_set), ("speed_next", speed_set)):
        x, y = make(train_rows)
        hx, hy = make(heldout_rows)
        family = REGRESSORS[name]
        other = "trees" if family == "linear" else "linear"
        reg = make_regressor(family)
        reg.fit(x, y)
        pred = reg.predict(hx)
        alt = make_regressor(other)
        alt.fit(x, y)
        baseline = np.full_like(hy, float(np.mean(y)))
        metrics = {
            "mae": round(float(mean_absolute_error(hy, pred)), 4),
            "mae_of_the_training_mean": round(float(mean_absolute_error(hy, baseline)), 4),
            f"mae_of_{'gradient_boosted_trees' if other == 'trees' else 'linear_regression'}":
                round(float(mean_absolute_error(hy, alt.predict(hx))), 4),
        }
        unit = "l" if name == "fuel" else "km/h"
        models[name] = (reg, False, len(x), None, len(hx), metrics, {"output": f"variable [n, 1], {unit}"})
        # The other family too, as a second version to deploy beside the first
        # (an A/B split in the cloud): `alternative.onnx` with its card.
        alt_metrics = {
            "mae": metrics[f"mae_of_{'gradient_boosted_trees' if other == 'trees' else 'linear_regression'}"],
            "mae_of_the_training_mean": metrics["mae_of_the_training_mean"],
            f"mae_of_{'gradient_boosted_trees' if family == 'trees' else 'linear_regression'}": metrics["mae"],
        }
        models[f"{name}:alternative"] = (alt, False, len(x), None, len(hx), alt_metrics,
                                         {"output": f"variable [n, 1], {unit}"})
    return models


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def save(models, out_dir, check):
    mismatched = []
    for key, (model, classifier, n_train, n_pos, n_held, metrics, extra) in models.items():
        name, _, variant = key.partition(":")
        stem = variant or "model"
        feats = FEATURES[name]
        onx = export(model, name, len(feats), classifier)
        d = os.path.join(out_dir, name)
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, f"{stem}.onnx")
        data = onx.SerializeToString()
        digest = hashlib.sha256(data).hexdigest()
        if check:
            if not os.path.exists(path) or sha256(path) != digest:
                mismatched.append(key)
            continue
        open(path, "wb").write(data)
        card = {
            "name": name,
            "family": type(model).__name__,
            "onnx_ops": sorted({n.op_type for n in onx.graph.node}),
            "input": {"name": "features", "type": "float32", "shape": [None, len(feats)]},
            "features": [{"name": f, "unit": u, "meaning": m} for f, u, m in feats],
            "training": {"simulator_seed": TRAIN_SEED, "rows": n_train, "positives": n_pos, "run": RUN},
            "heldout": {"simulator_seed": HELDOUT_SEED, "rows": n_held, "metrics": metrics},
            "sha256": digest,
            **extra,
        }
        card_path = os.path.join(d, "card.json" if not variant else f"{stem}.json")
        json.dump(card, open(card_path, "w"), indent=2, sort_keys=True)
        open(card_path, "a").write("\n")
        print(f"{key}: {card['family']}, ops {card['onnx_ops']}, held-out {metrics}")
    return mismatched


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sim", help="fleetline-sim binary: simulate both seeds and extract new tables")
    ap.add_argument("--from-csv", action="store_true", help="train from the committed tables")
    ap.add_argument("--check", action="store_true", help="train and compare with the committed models")
    ap.add_argument("--out", default=HERE)
    args = ap.parse_args()
    data_dir = os.path.join(args.out, "data")
    os.makedirs(data_dir, exist_ok=True)
    if args.sim:
        with tempfile.TemporaryDirectory(prefix="fleetline-train-") as work:
            for seed, name in ((TRAIN_SEED, "train"), (HELDOUT_SEED, "heldout")):
                write_csv(extract(simulate(args.sim, seed, work)), os.path.join(data_dir, f"{name}.csv.gz"))
    elif not args.from_csv:
        ap.error("give --sim or --from-csv")
    train_rows = read_csv(os.path.join(data_dir, "train.csv.gz"))
    heldout_rows = read_csv(os.path.join(data_dir, "heldout.csv.gz"))
    mismatched = save(train(train_rows, heldout_rows), args.out, args.check)
    if args.check:
        if mismatched:
            print(f"not reproduced bit for bit: {mismatched}", file=sys.stderr)
            sys.exit(1)
        print("every model reproduced bit for bit")


if __name__ == "__main__":
    main()
