//! Scores a file of feature rows with a model, the way the cloud runs it:
//! the parity check against onnxruntime and the inference benchmark drive it.
//!
//! ```text
//! score <kind> <model.onnx> <rows.f32> <out.f32>             # one batch, scores as little-endian f32
//! score <kind> <model.onnx> <rows.f32> --bench <batch> <rounds> # timings per batch as JSON lines
//! ```
//! `rows.f32` holds little-endian f32 values, the features of each row in
//! the kind's order. Benchmark lines: `{"batch":B,"round":R,"seconds":S,"p50_us":..,"p99_us":..}`,
//! each round scoring every row once in batches of `batch` on this thread.

use std::io::Write;
use std::time::Instant;

use fleetline_inference::{ModelKind, Plan};

fn main() {
    if let Err(e) = run() {
        eprintln!("score: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [kind, model, rows, rest @ ..] = args.as_slice() else {
        return Err("usage: score <kind> <model.onnx> <rows.f32> (<out.f32> | --bench <batch> <rounds>)".into());
    };
    let kind = ModelKind::from_name(kind).ok_or_else(|| format!("unknown model kind {kind}"))?;
    let bytes = std::fs::read(model).map_err(|e| format!("{model}: {e}"))?;
    let plan = Plan::load(kind, &bytes).map_err(|e| e.to_string())?;
    let raw = std::fs::read(rows).map_err(|e| format!("{rows}: {e}"))?;
    let values: Vec<f32> = raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let k = kind.features().len();
    match rest {
        [out] => {
            let scores = plan.run(&values).map_err(|e| e.to_string())?;
            let bytes: Vec<u8> = scores.iter().flat_map(|s| s.to_le_bytes()).collect();
            std::fs::write(out, bytes).map_err(|e| format!("{out}: {e}"))
        }
        [flag, batch, rounds] if flag == "--bench" => {
            let batch: usize = batch.parse().map_err(|_| "batch is not a number")?;
            let rounds: usize = rounds.parse().map_err(|_| "rounds is not a number")?;
            let mut stdout = std::io::stdout().lock();
            for round in 0..rounds {
                let mut per_batch = Vec::new();
                let started = Instant::now();
                let mut sink = 0.0f32;
                for chunk in values.chunks(batch * k) {
                    let t = Instant::now();
                    let scores = plan.run(chunk).map_err(|e| e.to_string())?;
                    per_batch.push(t.elapsed().as_secs_f64() * 1e6);
                    sink += scores.first().copied().unwrap_or(0.0);
                }
                let seconds = started.elapsed().as_secs_f64();
                per_batch.sort_by(f64::total_cmp);
                let pct = |p: f64| per_batch[((per_batch.len() - 1) as f64 * p).round() as usize];
                writeln!(
                    stdout,
                    "{{\"batch\":{batch},\"round\":{round},\"rows\":{},\"seconds\":{seconds},\"p50_us\":{},\"p99_us\":{},\"sink\":{sink}}}",
                    values.len() / k,
                    pct(0.5),
                    pct(0.99)
                )
                .map_err(|e| e.to_string())?;
            }
            Ok(())
        }
        _ => Err("expected <out.f32> or --bench <batch> <rounds>".into()),
    }
}
