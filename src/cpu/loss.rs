//! Softmax cross-entropy, the training loss: its mean over the batch and its gradient.

use ndarray::{Array2, ArrayView2};

use crate::error::{Error, Result};

/// The loss of one batch and its gradient with respect to the logits.
#[derive(Clone, Debug, PartialEq)]
pub struct CrossEntropy {
    /// `mean_n (logsumexp(z_n) - z_n[label_n])`, as PyTorch's `cross_entropy` (mean reduction).
    pub loss: f32,
    /// `(softmax(z) - onehot(label)) / N`, shaped like the logits.
    pub grad: Array2<f32>,
}

/// Softmax cross-entropy of `logits` `[N, classes]` against `labels` (one class index per
/// row), averaged over the batch. Sums run in f64 (a batch of 128 rows of 1000 classes loses
/// nothing to rounding); a label out of range or a count mismatch is an error.
pub fn softmax_cross_entropy(
    logits: ArrayView2<'_, f32>,
    labels: &[usize],
) -> Result<CrossEntropy> {
    let (n, classes) = logits.dim();
    if labels.len() != n || n == 0 {
        return Err(Error::Shape {
            op: "softmax_cross_entropy",
            expected: format!("one label per logits row ({n} rows, at least 1)"),
            found: vec![labels.len()],
        });
    }
    if let Some(&bad) = labels.iter().find(|&&l| l >= classes) {
        return Err(Error::invalid(
            "label",
            format!("{bad} is not a class of a {classes}-class model"),
        ));
    }
    let mut grad = Array2::<f32>::zeros((n, classes));
    let mut total = 0.0f64;
    for ((row, mut grad_row), &label) in logits.outer_iter().zip(grad.outer_iter_mut()).zip(labels)
    {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
        let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
        let log_sum = max + sum.ln();
        total += log_sum - row[label] as f64;
        for (g, &v) in grad_row.iter_mut().zip(row) {
            *g = (((v as f64 - log_sum).exp()) / n as f64) as f32;
        }
        grad_row[label] -= 1.0 / n as f32;
    }
    Ok(CrossEntropy {
        loss: (total / n as f64) as f32,
        grad,
    })
}
