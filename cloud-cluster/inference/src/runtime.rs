//! ONNX models run with tract: loaded once per version, checked against the
//! feature spec, optimized into a plan, then run on batches of feature rows.
//!
//! A [`Plan`] is immutable and `Send + Sync`; running it is CPU work and
//! belongs on a blocking thread, never on an async executor.

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

use crate::spec::{ModelKind, Signature};

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// tract could not parse the file or does not know an operator in it.
    #[error("model does not load: {0}")]
    Load(String),
    /// The graph's inputs or outputs are not what the feature spec needs.
    #[error("model signature does not match its spec: {0}")]
    Signature(String),
    /// A batch's length is not a multiple of the feature count.
    #[error("batch of {len} values is not rows of {features} features")]
    Batch {
        /// Values given.
        len: usize,
        /// Features per row.
        features: usize,
    },
    /// tract failed while running the plan.
    #[error("model run failed: {0}")]
    Run(String),
}

type Runnable = Arc<TypedRunnableModel>;

/// A loaded, optimized model ready to score batches.
pub struct Plan {
    kind: ModelKind,
    features: usize,
    runnable: Runnable,
    /// Index of the output holding the score (probabilities or values).
    output: usize,
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan").field("kind", &self.kind).field("features", &self.features).finish()
    }
}

impl Plan {
    /// Loads `onnx` (the file's bytes) as a model of `kind`, checks its
    /// signature against the spec (one float32 input `[n, k]` with `k` the
    /// spec's feature count; a classifier's probabilities `[n, 2]` or a
    /// regressor's values `[n, 1]`), and optimizes it once.
    pub fn load(kind: ModelKind, onnx: &[u8]) -> Result<Self, ModelError> {
        let features = kind.features().len();
        let load = |e: TractError| ModelError::Load(format!("{e:#}"));
        let mut onnx_format = tract_onnx::onnx();
        crate::ops::register(&mut onnx_format.op_register);
        let mut model = onnx_format.model_for_read(&mut &onnx[..]).map_err(load)?;
        let inputs = model.input_outlets().map_err(load)?.len();
        if inputs != 1 {
            return Err(ModelError::Signature(format!("{inputs} inputs, the model takes one")));
        }
        // The width the file declares, before the batch dimension is made symbolic.
        let declared = model.input_fact(0).map_err(load)?.shape.dims().nth(1).and_then(|d| d.concretize());
        if let Some(width) = declared.and_then(|d| d.as_i64())
            && width != features as i64
        {
            return Err(ModelError::Signature(format!(
                "input shape [n, {width}] is not [n, {features}] ({} features)",
                kind.name()
            )));
        }
        let n = model.symbols.sym("n");
        model =
            model.with_input_fact(0, f32::fact([TDim::from(n), TDim::from(features as i64)]).into()).map_err(load)?;
        let typed = model.into_typed().map_err(load)?;
        let sig = signature_of(&typed)?;
        kind.check(&sig).map_err(ModelError::Signature)?;
        let output = sig.score_output;
        let runnable = typed.into_optimized().and_then(|m| m.into_runnable()).map_err(load)?;
        Ok(Self { kind, features, runnable, output })
    }

    /// The model's kind.
    pub fn kind(&self) -> ModelKind {
        self.kind
    }

    /// Scores `rows` (row-major, `features` values per row): one number per
    /// row, the risk (probability of the positive class) for a classifier,
    /// the predicted value for a regressor. An empty batch gives an empty
    /// result without running the plan.
    pub fn run(&self, rows: &[f32]) -> Result<Vec<f32>, ModelError> {
        if !rows.len().is_multiple_of(self.features) {
            return Err(ModelError::Batch { len: rows.len(), features: self.features });
        }
        let n = rows.len() / self.features;
        if n == 0 {
            return Ok(Vec::new());
        }
        let input = tract_ndarray::Array2::from_shape_vec((n, self.features), rows.to_vec())
            .map_err(|e| ModelError::Run(e.to_string()))?;
        let input: Tensor = input.into();
        let outputs = self.runnable.run(tvec!(input.into())).map_err(|e| ModelError::Run(format!("{e:#}")))?;
        let out = outputs.get(self.output).ok_or_else(|| ModelError::Run("missing output".into()))?;
        let view = out.to_plain_array_view::<f32>().map_err(|e| ModelError::Run(format!("{e:#}")))?;
        let shape = view.shape().to_vec();
        let cols = match shape.as_slice() {
            [rows_out, c] if *rows_out == n => *c,
            [rows_out] if *rows_out == n => 1,
            other => return Err(ModelError::Run(format!("output shape {other:?} for {n} rows"))),
        };
        let column = self.kind.score_column();
        if column >= cols {
            return Err(ModelError::Run(format!("output has {cols} columns, score is column {column}")));
        }
        let flat: Vec<f32> = view.iter().copied().collect();
        Ok((0..n).map(|r| flat[r * cols + column]).collect())
    }
}

/// Reads the inputs and outputs of a model after type analysis.
fn signature_of(model: &TypedModel) -> Result<Signature, ModelError> {
    let fact_of = |outlet: OutletId| -> Result<(bool, Vec<Option<usize>>), ModelError> {
        let fact = model.outlet_fact(outlet).map_err(|e| ModelError::Signature(format!("{e:#}")))?;
        let shape = fact.shape.iter().map(|d| d.as_i64().and_then(|d| usize::try_from(d).ok())).collect::<Vec<_>>();
        Ok((fact.datum_type == f32::datum_type(), shape))
    };
    let mut sig = Signature::default();
    for o in model.input_outlets().map_err(|e| ModelError::Signature(format!("{e:#}")))? {
        sig.inputs.push(fact_of(*o)?);
    }
    for (ix, o) in model.output_outlets().map_err(|e| ModelError::Signature(format!("{e:#}")))?.iter().enumerate() {
        let (float, shape) = fact_of(*o)?;
        if float && sig.score_output == usize::MAX {
            sig.score_output = ix;
        }
        sig.outputs.push((float, shape));
    }
    Ok(sig)
}
