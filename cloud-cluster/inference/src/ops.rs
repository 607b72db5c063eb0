//! Tree ensembles in tract: `TreeEnsembleClassifier` and
//! `TreeEnsembleRegressor` registered with tract's ONNX operator table and
//! scored by [`Forest`].
//!
//! tract-onnx 0.23 does not load `TreeEnsembleRegressor`; its own
//! `TreeEnsembleClassifier` refuses a binary classifier with one base value
//! (what skl2onnx writes) and walks a tree's leaves from the start of the
//! whole ensemble's leaf table on every row, so scoring cost grows with the
//! ensemble's size squared. Both are replaced here.

use std::sync::Arc;

use tract_onnx::model::{OnnxOpRegister, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::forest::{Aggregate, Attributes, Forest, Mode, Post, logistic, softmax};

/// Registers the two tree-ensemble operators, replacing tract's own.
pub fn register(ops: &mut OnnxOpRegister) {
    ops.insert("TreeEnsembleClassifier", classifier);
    ops.insert("TreeEnsembleRegressor", regressor);
}

/// What the node computes after the trees.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Head {
    /// Class labels (int64) and one probability per label. `binary`: the
    /// trees score one column, the second label's, and the first is its
    /// complement (ONNX-ML's binary case).
    Classes { labels: Vec<i64>, binary: bool },
    /// `n` values per row.
    Values,
}

/// The operator: a forest, its post-transform and what it outputs.
#[derive(Clone, Debug)]
struct TreeOp {
    forest: Arc<Forest>,
    post: Post,
    head: Head,
}

// Two nodes are the same operator when they share the forest (weights are
// floats: comparing them would not be an equivalence).
impl PartialEq for TreeOp {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.forest, &other.forest) && self.post == other.post && self.head == other.head
    }
}

impl Eq for TreeOp {}

fn attrs(node: &NodeProto, leaf: &str) -> TractResult<Attributes> {
    let modes: Vec<&str> = node.get_attr_vec("nodes_modes")?;
    let modes = modes.into_iter().map(|m| Mode::parse(m).map_err(|e| format_err!(e))).collect::<TractResult<_>>()?;
    Ok(Attributes {
        tree_ids: node.get_attr_vec("nodes_treeids")?,
        node_ids: node.get_attr_vec("nodes_nodeids")?,
        feature_ids: node.get_attr_vec("nodes_featureids")?,
        modes,
        values: node.get_attr_vec("nodes_values")?,
        true_ids: node.get_attr_vec("nodes_truenodeids")?,
        false_ids: node.get_attr_vec("nodes_falsenodeids")?,
        nan_true: node.get_attr_opt_vec("nodes_missing_value_tracks_true")?.unwrap_or_default(),
        leaf_tree_ids: node.get_attr_vec(&format!("{leaf}_treeids"))?,
        leaf_node_ids: node.get_attr_vec(&format!("{leaf}_nodeids"))?,
        leaf_targets: node.get_attr_vec(&format!("{leaf}_ids"))?,
        leaf_weights: node.get_attr_vec(&format!("{leaf}_weights"))?,
    })
}

fn post_transform(node: &NodeProto) -> TractResult<Post> {
    let post: Option<&str> = node.get_attr_opt("post_transform")?;
    Post::parse(post.unwrap_or("NONE")).map_err(|e| format_err!(e))
}

fn classifier(_ctx: &ParsingContext<'_>, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    if node.get_attr_opt_vec::<String>("classlabels_strings")?.is_some() {
        bail!("TreeEnsembleClassifier with string labels is not supported (int64 labels only)");
    }
    let labels: Vec<i64> = node.get_attr_vec("classlabels_int64s")?;
    let a = attrs(node, "class")?;
    let post = post_transform(node)?;
    let base: Vec<f32> = node.get_attr_opt_vec("base_values")?.unwrap_or_default();
    // ONNX-ML's binary case: two labels, every weight on class 0, at most one
    // base value. The trees then score the second label.
    let binary = labels.len() == 2 && a.leaf_targets.iter().all(|t| *t == 0) && base.len() <= 1;
    let outputs = if binary { 1 } else { labels.len() };
    let forest = Forest::build(&a, outputs, Aggregate::Sum, base).map_err(|e| format_err!(e))?;
    let op = TreeOp { forest: Arc::new(forest), post, head: Head::Classes { labels, binary } };
    Ok((expand(op), vec![]))
}

fn regressor(_ctx: &ParsingContext<'_>, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let targets: i64 = node.get_attr("n_targets")?;
    let targets = usize::try_from(targets).ok().filter(|t| *t > 0).ok_or_else(|| format_err!("n_targets {targets}"))?;
    let aggregate = match node.get_attr_opt::<&str>("aggregate_function")?.unwrap_or("SUM") {
        "SUM" => Aggregate::Sum,
        "AVERAGE" => Aggregate::Average,
        "MIN" => Aggregate::Min,
        "MAX" => Aggregate::Max,
        other => bail!("aggregate_function {other} is not supported"),
    };
    let post = post_transform(node)?;
    if post == Post::Softmax {
        bail!("a regressor with a softmax post_transform is not supported");
    }
    let a = attrs(node, "target")?;
    let base: Vec<f32> = node.get_attr_opt_vec("base_values")?.unwrap_or_default();
    let forest = Forest::build(&a, targets, aggregate, base).map_err(|e| format_err!(e))?;
    Ok((expand(TreeOp { forest: Arc::new(forest), post, head: Head::Values }), vec![]))
}

impl TreeOp {
    /// Scores per row in the output (two for the binary case).
    fn width(&self) -> usize {
        match &self.head {
            Head::Classes { labels, .. } => labels.len(),
            Head::Values => self.forest.outputs(),
        }
    }
}

impl Expansion for TreeOp {
    fn name(&self) -> StaticName {
        "FleetlineTreeEnsemble".into()
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(if matches!(self.head, Head::Classes { .. }) { 2 } else { 1 })
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        let scores = match self.head {
            Head::Classes { .. } => {
                check_output_arity(outputs, 2)?;
                s.equals(&outputs[0].datum_type, DatumType::I64)?;
                s.equals(&outputs[0].rank, 1)?;
                s.equals(&outputs[0].shape[0], &inputs[0].shape[0])?;
                &outputs[1]
            }
            Head::Values => {
                check_output_arity(outputs, 1)?;
                &outputs[0]
            }
        };
        s.equals(&inputs[0].rank, 2)?;
        s.equals(&scores.datum_type, DatumType::F32)?;
        s.equals(&scores.rank, 2)?;
        s.equals(&scores.shape[0], &inputs[0].shape[0])?;
        s.equals(&scores.shape[1], self.width().to_dim())?;
        Ok(())
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        model.wire_node(prefix, self.clone(), inputs)
    }
}

impl Op for TreeOp {
    fn name(&self) -> StaticName {
        "FleetlineTreeEnsemble".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{} trees, {:?}, {:?}", self.forest.trees(), self.post, self.head)])
    }

    op_as_typed_op!();
}

impl EvalOp for TreeOp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext<'_>, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let input = input.cast_to::<f32>()?;
        let shape = input.shape();
        ensure!(shape.len() == 2, "tree ensemble input of rank {}, expected 2", shape.len());
        let (n, width) = (shape[0], shape[1]);
        ensure!(width >= self.forest.features(), "{width} features, the trees use {}", self.forest.features());
        let rows = input.try_as_plain_ram()?.as_slice::<f32>()?;
        let k = self.forest.outputs();
        let mut raw = vec![0f32; n * k];
        self.forest.score(rows, width, &mut raw);
        match &self.head {
            Head::Values => {
                if self.post == Post::Logistic {
                    raw.iter_mut().for_each(|s| *s = logistic(*s));
                }
                Ok(tvec!(tract_ndarray::Array2::from_shape_vec((n, k), raw)?.into_tvalue()))
            }
            Head::Classes { labels, binary } => {
                let classes = labels.len();
                let mut probs = vec![0f32; n * classes];
                let mut chosen = Vec::with_capacity(n);
                for (r, out) in probs.chunks_exact_mut(classes).enumerate() {
                    let row = &raw[r * k..(r + 1) * k];
                    if *binary {
                        let s = row[0];
                        let (p0, p1) = match self.post {
                            Post::Logistic => {
                                let p = logistic(s);
                                (logistic(-s), p)
                            }
                            // Without a transform, ONNX-ML gives the binary case's
                            // scores as (-s, s); a softmax over them is logistic(2s).
                            Post::None => (-s, s),
                            Post::Softmax => (logistic(-2.0 * s), logistic(2.0 * s)),
                        };
                        out.copy_from_slice(&[p0, p1]);
                        chosen.push(labels[usize::from(p1 > p0)]);
                    } else {
                        out.copy_from_slice(row);
                        match self.post {
                            Post::Logistic => out.iter_mut().for_each(|s| *s = logistic(*s)),
                            Post::Softmax => softmax(out),
                            Post::None => {}
                        }
                        let best = out.iter().enumerate().fold(0, |best, (i, v)| if *v > out[best] { i } else { best });
                        chosen.push(labels[best]);
                    }
                }
                Ok(tvec!(
                    tract_ndarray::Array1::from_vec(chosen).into_tvalue(),
                    tract_ndarray::Array2::from_shape_vec((n, classes), probs)?.into_tvalue()
                ))
            }
        }
    }
}

impl TypedOp for TreeOp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let n = inputs[0].shape[0].clone();
        let scores = f32::fact([n.clone(), self.width().to_dim()]);
        Ok(match self.head {
            Head::Classes { .. } => tvec!(i64::fact([n]), scores),
            Head::Values => tvec!(scores),
        })
    }

    as_op!();
}
