//! Pure: schemas, signal definitions and Confluent's compatibility rules — what a
//! schema says and whether one can read another's data. No I/O.

use serde::{Deserialize, Serialize};

/// Why schema text is refused, in words naming the signal.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSchema(pub String);

/// Compatibility modes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Compatibility {
    /// New reads latest.
    #[default]
    Backward,
    /// New reads every earlier version.
    BackwardTransitive,
    /// Latest reads new.
    Forward,
    /// Every earlier version reads new.
    ForwardTransitive,
    /// Both ways with the latest.
    Full,
    /// Both ways with every earlier version.
    FullTransitive,
    /// No check.
    None,
}

/// One signal of a schema.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalDef {
    /// VSS path.
    pub path: String,
    /// Wire kind id.
    pub kind: u16,
    /// `delta` or `cyclic/<modulus>`.
    pub encoding: String,
    /// Engineering value = raw × 10^scale_exp.
    pub scale_exp: i8,
    /// Unit symbol.
    pub unit: String,
    /// Lowest valid value.
    pub min: f64,
    /// Highest valid value.
    pub max: f64,
}

impl SignalDef {
    /// Whether `value` lies within the valid range (NaN never does).
    #[inline]
    pub fn accepts(&self, value: f64) -> bool {
        value >= self.min && value <= self.max
    }
}

/// A parsed, checked schema.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schema {
    /// Signals, sorted by kind.
    pub signals: Vec<SignalDef>,
}

impl Schema {
    /// Parses and checks schema text (JSON); sorts signals by kind.
    pub fn parse(text: &str) -> Result<Self, InvalidSchema> {
        let mut s: Schema =
            serde_json::from_str(text).map_err(|e| InvalidSchema(format!("schema does not parse: {e}")))?;
        s.signals.sort_by_key(|d| d.kind);
        for w in s.signals.windows(2) {
            if w[0].kind == w[1].kind {
                return Err(InvalidSchema(format!("kind {} is listed twice", w[0].kind)));
            }
        }
        let mut paths: Vec<&str> = s.signals.iter().map(|d| d.path.as_str()).collect();
        paths.sort_unstable();
        if let Some(w) = paths.windows(2).find(|w| w[0] == w[1]) {
            return Err(InvalidSchema(format!("path {} is listed twice", w[0])));
        }
        for d in &s.signals {
            if d.path.is_empty() || !d.min.is_finite() || !d.max.is_finite() || d.min > d.max {
                return Err(InvalidSchema(format!(
                    "signal {} ({}): needs a path and a finite range min ≤ max",
                    d.kind, d.path
                )));
            }
            let ok = d.encoding == "delta"
                || d.encoding.strip_prefix("cyclic/").is_some_and(|m| m.parse::<u32>().is_ok_and(|m| m > 1));
            if !ok {
                return Err(InvalidSchema(format!("signal {}: encoding must be delta or cyclic/<modulus>", d.kind)));
            }
        }
        Ok(s)
    }

    /// The SDK's signal table (schema 1).
    pub fn signal_table() -> Self {
        use fleetline_wire::signals::{SIGNALS, WireType};
        let signals = SIGNALS
            .iter()
            .map(|s| SignalDef {
                path: s.path.into(),
                kind: s.kind.0,
                encoding: match s.wire {
                    WireType::Delta => "delta".into(),
                    WireType::Cyclic { modulus } => format!("cyclic/{modulus}"),
                },
                scale_exp: s.scale_exp,
                unit: s.unit.symbol().into(),
                min: s.min,
                max: s.max,
            })
            .collect();
        Self { signals }
    }

    /// Canonical text: what is stored and compared.
    pub fn canonical(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// A signal by kind.
    #[inline]
    pub fn signal(&self, kind: u16) -> Option<&SignalDef> {
        self.signals.binary_search_by_key(&kind, |d| d.kind).ok().map(|i| &self.signals[i])
    }
}

/// Why `reader` cannot read data written under `writer` (empty: it can).
pub fn can_read(reader: &Schema, writer: &Schema) -> Vec<String> {
    let mut out = Vec::new();
    for w in &writer.signals {
        match reader.signal(w.kind) {
            None => out.push(format!("kind {} ({}) is not in the reading schema", w.kind, w.path)),
            Some(r) => {
                if (r.path.as_str(), r.unit.as_str(), r.encoding.as_str(), r.scale_exp)
                    != (w.path.as_str(), w.unit.as_str(), w.encoding.as_str(), w.scale_exp)
                {
                    out.push(format!(
                        "kind {} changes meaning ({} {} → {} {})",
                        w.kind, w.path, w.unit, r.path, r.unit
                    ));
                } else if r.min > w.min || r.max < w.max {
                    out.push(format!(
                        "kind {} ({}): range {}..{} does not hold {}..{}",
                        w.kind, w.path, r.min, r.max, w.min, w.max
                    ));
                }
            }
        }
    }
    out
}

/// Why `new` is incompatible with `earlier` versions (oldest first) under `mode`.
pub fn check(mode: Compatibility, new: &Schema, earlier: &[&Schema]) -> Vec<String> {
    use Compatibility::*;
    let against: &[&Schema] = match mode {
        None => return Vec::new(),
        Backward | Forward | Full => earlier.last().map(std::slice::from_ref).unwrap_or_default(),
        BackwardTransitive | ForwardTransitive | FullTransitive => earlier,
    };
    let mut out = Vec::new();
    for old in against {
        if matches!(mode, Backward | BackwardTransitive | Full | FullTransitive) {
            out.extend(can_read(new, old).into_iter().map(|m| format!("backward: {m}")));
        }
        if matches!(mode, Forward | ForwardTransitive | Full | FullTransitive) {
            out.extend(can_read(old, new).into_iter().map(|m| format!("forward: {m}")));
        }
    }
    out
}
