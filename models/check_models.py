#!/usr/bin/env python3
"""Checks the committed models against their cards and their training script.

For every `models/<name>/`: the ONNX file is valid, its sha256 is the card's, its
one input is float32 `features` [n, k] with k the card's feature count, it uses
only operators tract-onnx 0.23 loads (no ZipMap, Scaler or TreeEnsembleRegressor),
and onnxruntime scoring the held-out table gives the card's metrics. Then the
models are trained again from the committed tables and must come out bit for bit.

  python3 models/check_models.py
"""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
from sklearn.metrics import mean_absolute_error, roc_auc_score

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import train  # noqa: E402

# What tract-onnx 0.23 cannot load (checked against its operator set, see the cards).
TRACT_MISSING = {"ZipMap", "Scaler", "TreeEnsembleRegressor"}


def fail(msg):
    print(f"model check failed: {msg}", file=sys.stderr)
    sys.exit(1)


def main():
    heldout = train.read_csv(os.path.join(HERE, "data", "heldout.csv.gz"))
    builders = {"tire_risk": train.tire_set, "fuel": train.fuel_set, "speed_next": train.speed_set}
    names = sorted(d for d in os.listdir(HERE) if os.path.exists(os.path.join(HERE, d, "card.json")))
    if sorted(builders) != names:
        fail(f"models {names}, expected {sorted(builders)}")
    for name in names:
        card = json.load(open(os.path.join(HERE, name, "card.json")))
        path = os.path.join(HERE, name, "model.onnx")
        data = open(path, "rb").read()
        if hashlib.sha256(data).hexdigest() != card["sha256"]:
            fail(f"{name}: sha256 differs from its card")
        model = onnx.load_from_string(data)
        onnx.checker.check_model(model)
        ops = {n.op_type for n in model.graph.node}
        if ops & TRACT_MISSING:
            fail(f"{name}: uses {sorted(ops & TRACT_MISSING)}")
        if sorted(ops) != card["onnx_ops"]:
            fail(f"{name}: operators {sorted(ops)} are not the card's {card['onnx_ops']}")
        (inp,) = model.graph.input
        dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        if inp.name != "features" or inp.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            fail(f"{name}: input is {inp.name} of type {inp.type.tensor_type.elem_type}")
        if dims[1:] != [len(card["features"])] or [f["name"] for f in card["features"]] != [
            f for f, _, _ in train.FEATURES[name]
        ]:
            fail(f"{name}: input shape {dims} or feature list does not match the card")
        x, y = builders[name](heldout)
        if len(x) != card["heldout"]["rows"]:
            fail(f"{name}: {len(x)} held-out rows, card says {card['heldout']['rows']}")
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        out = session.run(None, {"features": x})
        metrics = card["heldout"]["metrics"]
        if name == "tire_risk":
            probs = out[1][:, 1]
            got = round(float(roc_auc_score(y, probs)), 4)
            if abs(got - metrics["auc"]) > 2e-3:
                fail(f"{name}: AUC {got} against the card's {metrics['auc']}")
        else:
            got = round(float(mean_absolute_error(y, out[0].ravel())), 4)
            if abs(got - metrics["mae"]) > 1e-3 * max(1.0, metrics["mae"]):
                fail(f"{name}: MAE {got} against the card's {metrics['mae']}")
        print(f"{name}: {card['family']}, {len(x)} held-out rows, onnxruntime {got} as on the card")
    # Trained again from the committed tables: the same bytes.
    subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--from-csv", "--check"], check=True)


if __name__ == "__main__":
    main()
