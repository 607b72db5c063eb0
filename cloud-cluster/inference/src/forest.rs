//! Pure: tree ensembles as ONNX-ML describes them (`TreeEnsembleClassifier`,
//! `TreeEnsembleRegressor`), laid out for fast scoring. No I/O, no clock.
//!
//! Each tree is a run of nodes in one vector; a branch names its children
//! by index and a leaf the range of its weights, so scoring a row is one
//! walk per tree and one add per weight. Sums are kept in `f32` in tree
//! order, as onnxruntime does.

/// How a branch compares the feature with its threshold (true: go left).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `x <= t`
    Leq,
    /// `x < t`
    Lt,
    /// `x >= t`
    Gte,
    /// `x > t`
    Gt,
    /// `x == t`
    Eq,
    /// `x != t`
    Neq,
}

impl Mode {
    /// The mode an ONNX `nodes_modes` entry names; `Ok(None)` for `LEAF`.
    pub fn parse(s: &str) -> Result<Option<Self>, String> {
        Ok(Some(match s {
            "BRANCH_LEQ" => Self::Leq,
            "BRANCH_LT" => Self::Lt,
            "BRANCH_GTE" => Self::Gte,
            "BRANCH_GT" => Self::Gt,
            "BRANCH_EQ" => Self::Eq,
            "BRANCH_NEQ" => Self::Neq,
            "LEAF" => return Ok(None),
            other => return Err(format!("unknown node mode {other}")),
        }))
    }

    fn holds(self, x: f32, t: f32) -> bool {
        match self {
            Self::Leq => x <= t,
            Self::Lt => x < t,
            Self::Gte => x >= t,
            Self::Gt => x > t,
            Self::Eq => x == t,
            Self::Neq => x != t,
        }
    }
}

/// How the trees' contributions to one output are combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Aggregate {
    /// Sum (classifiers always sum).
    Sum,
    /// Mean over the trees.
    Average,
    /// Smallest contribution.
    Min,
    /// Largest contribution.
    Max,
}

/// What is applied to the combined scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Post {
    /// Nothing.
    None,
    /// `1 / (1 + e^-x)` per score.
    Logistic,
    /// Softmax over a row's scores.
    Softmax,
}

impl Post {
    /// The transform an ONNX `post_transform` names.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "NONE" => Ok(Self::None),
            "LOGISTIC" => Ok(Self::Logistic),
            "SOFTMAX" => Ok(Self::Softmax),
            other => Err(format!("post_transform {other} is not supported")),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Node {
    Branch { feature: u32, threshold: f32, mode: Mode, nan_true: bool, yes: u32, no: u32 },
    Leaf { from: u32, to: u32 },
}

/// The node and leaf attributes of an ONNX tree ensemble, one entry per
/// node or per leaf weight, as the file lists them.
#[derive(Clone, Debug, Default)]
pub struct Attributes {
    /// `nodes_treeids`
    pub tree_ids: Vec<i64>,
    /// `nodes_nodeids`
    pub node_ids: Vec<i64>,
    /// `nodes_featureids`
    pub feature_ids: Vec<i64>,
    /// `nodes_modes`, parsed (`None` for a leaf)
    pub modes: Vec<Option<Mode>>,
    /// `nodes_values`
    pub values: Vec<f32>,
    /// `nodes_truenodeids`
    pub true_ids: Vec<i64>,
    /// `nodes_falsenodeids`
    pub false_ids: Vec<i64>,
    /// `nodes_missing_value_tracks_true` (empty: all false)
    pub nan_true: Vec<i64>,
    /// `class_treeids` / `target_treeids`
    pub leaf_tree_ids: Vec<i64>,
    /// `class_nodeids` / `target_nodeids`
    pub leaf_node_ids: Vec<i64>,
    /// `class_ids` / `target_ids`
    pub leaf_targets: Vec<i64>,
    /// `class_weights` / `target_weights`
    pub leaf_weights: Vec<f32>,
}

/// A tree ensemble ready to score rows.
#[derive(Clone, Debug, PartialEq)]
pub struct Forest {
    nodes: Vec<Node>,
    roots: Vec<u32>,
    /// (output, weight) per leaf weight.
    weights: Vec<(u32, f32)>,
    outputs: usize,
    features: usize,
    aggregate: Aggregate,
    base: Vec<f32>,
}

impl Forest {
    /// Builds the ensemble from the file's attributes, checking that every
    /// list has one entry per node or leaf, that children exist in their own
    /// tree, and that every tree is reachable from its node 0 without a
    /// cycle. `outputs` is the number of scores per row (classes or
    /// targets); `base` is empty or one value per output.
    pub fn build(a: &Attributes, outputs: usize, aggregate: Aggregate, base: Vec<f32>) -> Result<Self, String> {
        let n = a.tree_ids.len();
        if n == 0 {
            return Err("no nodes".into());
        }
        for (name, len) in [
            ("nodes_nodeids", a.node_ids.len()),
            ("nodes_featureids", a.feature_ids.len()),
            ("nodes_modes", a.modes.len()),
            ("nodes_values", a.values.len()),
            ("nodes_truenodeids", a.true_ids.len()),
            ("nodes_falsenodeids", a.false_ids.len()),
        ] {
            if len != n {
                return Err(format!("{name} has {len} entries for {n} nodes"));
            }
        }
        if !a.nan_true.is_empty() && a.nan_true.len() != n {
            return Err(format!("nodes_missing_value_tracks_true has {} entries for {n} nodes", a.nan_true.len()));
        }
        let leaves = a.leaf_tree_ids.len();
        if a.leaf_node_ids.len() != leaves || a.leaf_targets.len() != leaves || a.leaf_weights.len() != leaves {
            return Err("leaf attributes differ in length".into());
        }
        if outputs == 0 || !(base.is_empty() || base.len() == outputs) {
            return Err(format!("{} base values for {outputs} outputs", base.len()));
        }
        // Position of each (tree, node id) in the sorted order.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| (a.tree_ids[i], a.node_ids[i]));
        let key = |i: usize| (a.tree_ids[i], a.node_ids[i]);
        if order.windows(2).any(|p| key(p[0]) == key(p[1])) {
            return Err("a node id appears twice in a tree".into());
        }
        let index_of = |tree: i64, node: i64| -> Result<u32, String> {
            order
                .binary_search_by_key(&(tree, node), |&i| key(i))
                .map(|p| p as u32)
                .map_err(|_| format!("tree {tree} has no node {node}"))
        };
        // Leaf weights grouped by (tree, node).
        let mut leaf_order: Vec<usize> = (0..leaves).collect();
        leaf_order.sort_by_key(|&i| (a.leaf_tree_ids[i], a.leaf_node_ids[i], i));
        let mut weights = Vec::with_capacity(leaves);
        let mut nodes = Vec::with_capacity(n);
        let mut roots = Vec::new();
        let mut cursor = 0;
        for (pos, &i) in order.iter().enumerate() {
            let tree = a.tree_ids[i];
            if pos == 0 || a.tree_ids[order[pos - 1]] != tree {
                roots.push(index_of(tree, 0).map_err(|_| format!("tree {tree} has no node 0"))?);
            }
            let node = match a.modes[i] {
                Some(mode) => {
                    let feature = u32::try_from(a.feature_ids[i]).map_err(|_| "negative feature id".to_string())?;
                    Node::Branch {
                        feature,
                        threshold: a.values[i],
                        mode,
                        nan_true: a.nan_true.get(i).is_some_and(|v| *v != 0),
                        yes: index_of(tree, a.true_ids[i])?,
                        no: index_of(tree, a.false_ids[i])?,
                    }
                }
                None => {
                    let from = weights.len() as u32;
                    while cursor < leaves {
                        let l = leaf_order[cursor];
                        let at = (a.leaf_tree_ids[l], a.leaf_node_ids[l]);
                        if at < key(i) {
                            return Err(format!("leaf weight for tree {} node {} that is not a leaf", at.0, at.1));
                        }
                        if at != key(i) {
                            break;
                        }
                        let target = usize::try_from(a.leaf_targets[l]).ok().filter(|t| *t < outputs);
                        let target = target.ok_or_else(|| format!("leaf target {} of {outputs}", a.leaf_targets[l]))?;
                        weights.push((target as u32, a.leaf_weights[l]));
                        cursor += 1;
                    }
                    Node::Leaf { from, to: weights.len() as u32 }
                }
            };
            nodes.push(node);
        }
        if cursor != leaves {
            return Err("leaf weights for nodes that are not leaves".into());
        }
        let features = nodes
            .iter()
            .filter_map(|n| if let Node::Branch { feature, .. } = n { Some(*feature as usize + 1) } else { None })
            .max()
            .unwrap_or(0);
        let forest = Self { nodes, roots, weights, outputs, features, aggregate, base };
        forest.check_walks()?;
        Ok(forest)
    }

    /// Every node is reached at most once from its tree's root: a walk
    /// that could loop (a cycle, or a node two parents share) is refused
    /// here, not met while scoring.
    fn check_walks(&self) -> Result<(), String> {
        let mut seen = vec![false; self.nodes.len()];
        for &root in &self.roots {
            let mut stack = vec![root];
            while let Some(at) = stack.pop() {
                if std::mem::replace(&mut seen[at as usize], true) {
                    return Err("a tree has a cycle or a node with two parents".into());
                }
                if let Node::Branch { yes, no, .. } = self.nodes[at as usize] {
                    stack.push(yes);
                    stack.push(no);
                }
            }
        }
        Ok(())
    }

    /// Scores per row before any post-transform.
    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// Features a row must have at least (one more than the highest used).
    pub fn features(&self) -> usize {
        self.features
    }

    /// Number of trees.
    pub fn trees(&self) -> usize {
        self.roots.len()
    }

    /// Scores `rows` (row-major, `width` features each, `width >=
    /// features()`) into `out` (`outputs()` per row): the aggregate of the
    /// leaves each row reaches, plus the base values.
    pub fn score(&self, rows: &[f32], width: usize, out: &mut [f32]) {
        let k = self.outputs;
        let init = match self.aggregate {
            Aggregate::Sum | Aggregate::Average => 0.0,
            Aggregate::Min => f32::INFINITY,
            Aggregate::Max => f32::NEG_INFINITY,
        };
        for (row, scores) in rows.chunks_exact(width).zip(out.chunks_exact_mut(k)) {
            scores.fill(init);
            for &root in &self.roots {
                let mut at = root as usize;
                let (from, to) = loop {
                    match self.nodes[at] {
                        Node::Branch { feature, threshold, mode, nan_true, yes, no } => {
                            let x = row[feature as usize];
                            let go = if x.is_nan() { nan_true } else { mode.holds(x, threshold) };
                            at = if go { yes } else { no } as usize;
                        }
                        Node::Leaf { from, to } => break (from as usize, to as usize),
                    }
                };
                for &(target, w) in &self.weights[from..to] {
                    let s = &mut scores[target as usize];
                    *s = match self.aggregate {
                        Aggregate::Sum | Aggregate::Average => *s + w,
                        Aggregate::Min => s.min(w),
                        Aggregate::Max => s.max(w),
                    };
                }
            }
            if self.aggregate == Aggregate::Average {
                let trees = self.roots.len() as f32;
                scores.iter_mut().for_each(|s| *s /= trees);
            }
            for (s, b) in scores.iter_mut().zip(&self.base) {
                *s += b;
            }
        }
    }
}

/// `1 / (1 + e^-x)`, computed on the side that does not lose the small value.
pub fn logistic(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// Softmax in place.
pub fn softmax(scores: &mut [f32]) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    scores.iter_mut().for_each(|s| *s /= sum);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two stumps on feature 0 and 1: tree 0 gives 1 when x0 <= 0.5 else 2;
    /// tree 1 gives 10 when x1 < 3 else 20 (NaN goes to the true side).
    fn stumps(aggregate: Aggregate) -> Forest {
        let a = Attributes {
            tree_ids: vec![1, 0, 0, 0, 1, 1],
            node_ids: vec![0, 0, 1, 2, 1, 2],
            feature_ids: vec![1, 0, 0, 0, 0, 0],
            modes: vec![Some(Mode::Lt), Some(Mode::Leq), None, None, None, None],
            values: vec![3.0, 0.5, 0.0, 0.0, 0.0, 0.0],
            true_ids: vec![1, 1, 0, 0, 0, 0],
            false_ids: vec![2, 2, 0, 0, 0, 0],
            nan_true: vec![1, 0, 0, 0, 0, 0],
            leaf_tree_ids: vec![0, 0, 1, 1],
            leaf_node_ids: vec![1, 2, 1, 2],
            leaf_targets: vec![0, 0, 0, 0],
            leaf_weights: vec![1.0, 2.0, 10.0, 20.0],
        };
        Forest::build(&a, 1, aggregate, vec![]).expect("builds")
    }

    #[test]
    fn scores_walk_every_tree() {
        let f = stumps(Aggregate::Sum);
        assert_eq!((f.trees(), f.features(), f.outputs()), (2, 2, 1));
        let mut out = [0.0; 4];
        f.score(&[0.0, 0.0, 1.0, 0.0, 0.0, 5.0, 1.0, f32::NAN], 2, &mut out);
        assert_eq!(out, [11.0, 12.0, 21.0, 12.0]);
        let avg = stumps(Aggregate::Average);
        let mut one = [0.0];
        avg.score(&[1.0, 5.0], 2, &mut one);
        assert_eq!(one, [11.0]);
        let max = stumps(Aggregate::Max);
        max.score(&[1.0, 5.0], 2, &mut one);
        assert_eq!(one, [20.0]);
    }

    #[test]
    fn broken_trees_are_refused() {
        let f = stumps(Aggregate::Sum);
        let mut a = Attributes {
            tree_ids: vec![0, 0, 0],
            node_ids: vec![0, 1, 2],
            feature_ids: vec![0, 0, 0],
            modes: vec![Some(Mode::Leq), None, None],
            values: vec![0.0; 3],
            true_ids: vec![1, 0, 0],
            false_ids: vec![2, 0, 0],
            nan_true: vec![],
            leaf_tree_ids: vec![0, 0],
            leaf_node_ids: vec![1, 2],
            leaf_targets: vec![0, 0],
            leaf_weights: vec![1.0, 2.0],
        };
        assert!(Forest::build(&a, 1, Aggregate::Sum, vec![]).is_ok());
        assert!(Forest::build(&a, 1, Aggregate::Sum, vec![0.0, 1.0]).is_err(), "base values");
        a.true_ids[0] = 7;
        assert!(Forest::build(&a, 1, Aggregate::Sum, vec![]).unwrap_err().contains("no node 7"));
        a.true_ids[0] = 0;
        assert!(Forest::build(&a, 1, Aggregate::Sum, vec![]).unwrap_err().contains("cycle"));
        a.true_ids[0] = 1;
        a.leaf_targets[1] = 3;
        assert!(Forest::build(&a, 1, Aggregate::Sum, vec![]).unwrap_err().contains("target"));
        a.leaf_targets[1] = 0;
        a.leaf_node_ids[1] = 0;
        assert!(Forest::build(&a, 1, Aggregate::Sum, vec![]).is_err(), "weight on a branch");
        a.values.pop();
        assert!(Forest::build(&a, 1, Aggregate::Sum, vec![]).unwrap_err().contains("nodes_values"));
        drop(f);
    }

    #[test]
    fn logistic_keeps_small_probabilities() {
        assert!((logistic(0.0) - 0.5).abs() < 1e-7);
        let small = logistic(-20.0);
        assert!((small - 2.061_153_6e-9).abs() / 2.061_153_6e-9 < 1e-5, "{small}");
        assert_eq!(logistic(100.0), 1.0);
        let mut s = [1.0, 2.0, 3.0];
        softmax(&mut s);
        assert!((s.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(s[2] > s[1] && s[1] > s[0]);
    }
}
