#!/usr/bin/env python3
"""Checks the committed models against their cards and their training script.

For every `models/<name>/`: the ONNX file is valid, its sha256 is the card's, its
one input is float32 `features` [n, k] with k the card's feature count, it uses
only operators the cloud loads (tract-onnx 0.23 with Fleetline's tree ensembles: no
ZipMap or Scaler),
and onnxruntime scoring the held-out table gives the card's metrics. Then the
models are trained again from the committed tables and must come out bit for bit.

With `--tract <score>` (the `fleetline-inference` example `score`), every model is
also run by tract, the runtime the cloud uses, on every held-out feature row
(18,000 and more per model) and on as many rows drawn at random around them, and
must give onnxruntime's outputs within 1e-5 relative. For tire risk that is
checked on the trees' sum (the model with its logistic step removed); the
probabilities themselves must agree within 1e-6: both runtimes compute a small
probability as 1 - p in float32, which no runtime gets closer than a few of
float32's steps at 1.0 (1.2e-7 each).

  python3 models/check_models.py [--tract target/debug/examples/score]
"""

import argparse
import tempfile

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

# What tract-onnx 0.23 cannot load, with the tree ensembles the cloud registers itself.
TRACT_MISSING = {"ZipMap", "Scaler"}


def fail(msg):
    print(f"model check failed: {msg}", file=sys.stderr)
    sys.exit(1)


RTOL = 1e-5
ATOL_PROBABILITY = 1e-6


def ort_scores(session, name, x):
    out = session.run(None, {"features": x})
    return out[1][:, 1] if name == "tire_risk" else out[0].ravel()


def tract_scores(score, name, path, x):
    with tempfile.TemporaryDirectory() as d:
        rows, scores = os.path.join(d, "rows.f32"), os.path.join(d, "scores.f32")
        np.ascontiguousarray(x, dtype="<f4").tofile(rows)
        subprocess.run([score, name, path, rows, scores], check=True)
        return np.fromfile(scores, dtype="<f4")


def without_logistic(path):
    """The tree classifier with its post-transform removed: outputs the sum over trees."""
    model = onnx.load(path)
    for node in model.graph.node:
        for attr in node.attribute:
            if node.op_type == "TreeEnsembleClassifier" and attr.name == "post_transform":
                attr.s = b"NONE"
    return model.SerializeToString()


def compare(name, what, got, want, atol):
    if got.shape != want.shape:
        fail(f"{name}: tract gave {got.shape} {what} for {want.shape}")
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    bad = diff > RTOL * np.abs(want) + atol
    if bad.any():
        i = int(np.argmax(bad))
        fail(f"{name}: tract's {what} {got[i]} against onnxruntime's {want[i]} on row {i} ({int(bad.sum())} rows differ)")
    big = np.abs(want) >= 1e-2
    rel = float((diff[big] / np.abs(want[big])).max()) if big.any() else 0.0
    print(f"{name}: tract's {what} equal onnxruntime's on {len(got)} rows "
          f"(largest difference {diff.max():.3g}; relative {rel:.3g} where |onnxruntime| >= 0.01)")


def check_tract(score, name, path, session, x, label):
    rng = np.random.default_rng(17)
    spread = x.std(axis=0) + 1e-3
    drawn = (x[rng.integers(0, len(x), len(x))] + rng.normal(0, 1, x.shape) * spread).astype(np.float32)
    rows = np.concatenate([x, drawn])
    if name == "tire_risk":
        compare(label, "probabilities", tract_scores(score, name, path, rows), ort_scores(session, name, rows),
                ATOL_PROBABILITY)
        with tempfile.TemporaryDirectory() as d:
            raw = os.path.join(d, "sum.onnx")
            open(raw, "wb").write(without_logistic(path))
            raw_session = ort.InferenceSession(raw, providers=["CPUExecutionProvider"])
            compare(label, "tree sums", tract_scores(score, name, raw, rows), ort_scores(raw_session, name, rows), 0.0)
    else:
        compare(label, "values", tract_scores(score, name, path, rows), ort_scores(session, name, rows), 0.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tract", help="the score example of fleetline-inference: compare tract with onnxruntime")
    args = parser.parse_args()
    heldout = train.read_csv(os.path.join(HERE, "data", "heldout.csv.gz"))
    builders = {"tire_risk": train.tire_set, "fuel": train.fuel_set, "speed_next": train.speed_set}
    names = sorted(d for d in os.listdir(HERE) if os.path.exists(os.path.join(HERE, d, "card.json")))
    if sorted(builders) != names:
        fail(f"models {names}, expected {sorted(builders)}")
    files = [(name, "model", "card") for name in names]
    files += [(name, "alternative", "alternative") for name in names
              if os.path.exists(os.path.join(HERE, name, "alternative.json"))]
    for name, stem, card_stem in files:
        card = json.load(open(os.path.join(HERE, name, f"{card_stem}.json")))
        path = os.path.join(HERE, name, f"{stem}.onnx")
        data = open(path, "rb").read()
        if hashlib.sha256(data).hexdigest() != card["sha256"]:
            fail(f"{name}/{stem}: sha256 differs from its card")
        model = onnx.load_from_string(data)
        onnx.checker.check_model(model)
        ops = {n.op_type for n in model.graph.node}
        if ops & TRACT_MISSING:
            fail(f"{name}/{stem}: uses {sorted(ops & TRACT_MISSING)}")
        if sorted(ops) != card["onnx_ops"]:
            fail(f"{name}/{stem}: operators {sorted(ops)} are not the card's {card['onnx_ops']}")
        (inp,) = model.graph.input
        dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        if inp.name != "features" or inp.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            fail(f"{name}/{stem}: input is {inp.name} of type {inp.type.tensor_type.elem_type}")
        if dims[1:] != [len(card["features"])] or [f["name"] for f in card["features"]] != [
            f for f, _, _ in train.FEATURES[name]
        ]:
            fail(f"{name}/{stem}: input shape {dims} or feature list does not match the card")
        x, y = builders[name](heldout)
        if len(x) != card["heldout"]["rows"]:
            fail(f"{name}/{stem}: {len(x)} held-out rows, card says {card['heldout']['rows']}")
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        out = session.run(None, {"features": x})
        metrics = card["heldout"]["metrics"]
        if name == "tire_risk":
            probs = out[1][:, 1]
            got = round(float(roc_auc_score(y, probs)), 4)
            if abs(got - metrics["auc"]) > 2e-3:
                fail(f"{name}/{stem}: AUC {got} against the card's {metrics['auc']}")
        else:
            got = round(float(mean_absolute_error(y, out[0].ravel())), 4)
            if abs(got - metrics["mae"]) > 1e-3 * max(1.0, metrics["mae"]):
                fail(f"{name}/{stem}: MAE {got} against the card's {metrics['mae']}")
        print(f"{name}/{stem}: {card['family']}, {len(x)} held-out rows, onnxruntime {got} as on the card")
        if args.tract:
            check_tract(args.tract, name, path, session, x, f"{name}/{stem}")
    # Trained again from the committed tables: the same bytes.
    subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--from-csv", "--check"], check=True)


if __name__ == "__main__":
    main()
