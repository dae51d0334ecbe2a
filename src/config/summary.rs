//! The seed's summary table (layer, activation, filter, weights, biases, parameters), read off
//! the [`Plan`].

use std::fmt;

use super::plan::{Plan, StageOp};

/// Which kind of row a [`LayerRow`] describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    Conv,
    Pool,
    Linear,
}

/// One row of the summary table (the seed's table for [`super::AlexNetConfig::paper`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerRow {
    /// "Conv1", "Pool1", "FC1", ...
    pub name: String,
    pub kind: LayerKind,
    /// Output activation shape: `[C, H, W]` for conv and pool rows, `[features]` for linear rows.
    pub output: Vec<usize>,
    /// Square filter side for convolutions, `None` otherwise.
    pub filter: Option<usize>,
    pub weights: usize,
    pub biases: usize,
}

impl LayerRow {
    pub fn params(&self) -> usize {
        // The plan checked that every count fits; saturate rather than wrap on the bias.
        self.weights.saturating_add(self.biases)
    }
}

impl Plan {
    /// The summary table's rows: conv, pool and linear stages (LRN has no row of its own).
    pub fn summary_rows(&self) -> Vec<LayerRow> {
        self.stages
            .iter()
            .filter_map(|stage| {
                let (kind, display, filter) = match stage.op {
                    StageOp::Conv { kernel, .. } => (LayerKind::Conv, "Conv", Some(kernel)),
                    StageOp::MaxPool(_) => (LayerKind::Pool, "Pool", None),
                    StageOp::Linear { .. } => (LayerKind::Linear, "FC", None),
                    StageOp::Lrn(_) => return None,
                };
                let number = stage.name.trim_start_matches(char::is_alphabetic);
                let (weights, biases) = stage
                    .params
                    .as_ref()
                    .map_or((0, 0), |p| (p.weight.len(), p.bias.len()));
                Some(LayerRow {
                    name: format!("{display}{number}"),
                    kind,
                    output: stage.output.clone(),
                    filter,
                    weights,
                    biases,
                })
            })
            .collect()
    }
}

/// Formats rows like the seed's table, with thousands separators.
pub(super) struct SummaryTable(pub Vec<LayerRow>);

impl fmt::Display for SummaryTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "| {:<6} | {:<10} | {:<6} | {:>10} | {:>6} | {:>10} |",
            "Layer", "Activation", "Filter", "Weights", "Biases", "Parameters"
        )?;
        writeln!(
            f,
            "|{:-<8}|{:-<12}|{:-<8}|{:-<12}|{:-<8}|{:-<12}|",
            "", "", "", "", "", ""
        )?;
        let mut total = 0;
        for row in &self.0 {
            let activation = row
                .output
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join("x");
            let filter = row.filter.map_or("-".to_string(), |k| format!("{k}x{k}"));
            writeln!(
                f,
                "| {:<6} | {:<10} | {:<6} | {:>10} | {:>6} | {:>10} |",
                row.name,
                activation,
                filter,
                thousands(row.weights),
                thousands(row.biases),
                thousands(row.params())
            )?;
            total += row.params();
        }
        write!(
            f,
            "| {:<6} | {:<10} | {:<6} | {:>10} | {:>6} | {:>10} |",
            "Total",
            "",
            "",
            "",
            "",
            thousands(total)
        )
    }
}

/// `62378344` -> `62,378,344`.
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}
