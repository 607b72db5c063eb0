#!/usr/bin/env python3
"""Predictions per second per core and time per batch: tract (the cloud's runtime,
through the `score` example of fleetline-inference) against onnxruntime, on the
same models, the same rows and this machine, in one run.

Rows: the held-out feature rows of each model, repeated to `--rows`. Each runtime
scores all of them in batches of 1, 32 and 512 rows (a commit scores every window
closed since the last one: tens to hundreds of rows), on one thread
(onnxruntime with one intra- and one inter-op thread), `--rounds` times. Times
include each runtime's own call overhead: building the input tensor and reading
the output, in Rust for tract and in Python for onnxruntime. Prints per model and
batch size the median and spread (min-max) over rounds of rows/s and of the
per-batch p50 and p99, and tract's ratio to onnxruntime.

  python3 models/bench_inference.py --tract target/release/examples/score [--rows 100000] [--rounds 5]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import train  # noqa: E402

BATCHES = (1, 32, 512)


def ort_round(session, name, rows, batch):
    per_batch = []
    started = time.perf_counter()
    for i in range(0, len(rows), batch):
        t = time.perf_counter()
        out = session.run(None, {"features": rows[i:i + batch]})
        _ = out[1][:, 1] if name == "tire_risk" else out[0].ravel()
        per_batch.append((time.perf_counter() - t) * 1e6)
    seconds = time.perf_counter() - started
    per_batch.sort()
    pct = lambda p: per_batch[round((len(per_batch) - 1) * p)]  # noqa: E731
    return {"seconds": seconds, "p50_us": pct(0.5), "p99_us": pct(0.99)}


def summary(rounds, n):
    rates = [n / r["seconds"] for r in rounds]
    p50 = [r["p50_us"] for r in rounds]
    p99 = [r["p99_us"] for r in rounds]
    return {
        "rows_per_s": statistics.median(rates), "rows_per_s_spread": [min(rates), max(rates)],
        "p50_us": statistics.median(p50), "p50_us_spread": [min(p50), max(p50)],
        "p99_us": statistics.median(p99), "p99_us_spread": [min(p99), max(p99)],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tract", required=True, help="release build of the score example")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    heldout = train.read_csv(os.path.join(HERE, "data", "heldout.csv.gz"))
    builders = {"tire_risk": train.tire_set, "fuel": train.fuel_set, "speed_next": train.speed_set}
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    for name, make in builders.items():
        x, _ = make(heldout)
        rows = np.ascontiguousarray(np.resize(x, (args.rows, x.shape[1])), dtype=np.float32)
        path = os.path.join(HERE, name, "model.onnx")
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        with tempfile.TemporaryDirectory() as d:
            file = os.path.join(d, "rows.f32")
            rows.astype("<f4").tofile(file)
            for batch in BATCHES:
                # Alternate the runtimes round by round so drift hits both alike.
                tract, onnx = [], []
                for _ in range(args.rounds):
                    out = subprocess.run([args.tract, name, path, file, "--bench", str(batch), "1"],
                                         check=True, capture_output=True, text=True).stdout
                    tract.append(json.loads(out.splitlines()[-1]))
                    onnx.append(ort_round(session, name, rows, batch))
                t, o = summary(tract, len(rows)), summary(onnx, len(rows))
                print(json.dumps({
                    "model": name, "batch": batch, "rows": len(rows), "rounds": args.rounds,
                    "tract": t, "onnxruntime": o,
                    "ratio_rows_per_s": round(t["rows_per_s"] / o["rows_per_s"], 2),
                    "ratio_p50": round(t["p50_us"] / o["p50_us"], 2),
                    "ratio_p99": round(t["p99_us"] / o["p99_us"], 2),
                }), flush=True)


if __name__ == "__main__":
    main()
