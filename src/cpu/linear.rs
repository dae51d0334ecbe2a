//! Fully connected layer: `y = x W^T + b`, one threaded GEMM over the whole batch.

use ndarray::{Array1, Array2, ArrayView2};

use super::gemm::{gemm_accumulate, MatRef, Threads};
use crate::error::{Error, Result};

/// A linear layer with PyTorch's layout: weight `[out_features, in_features]`.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Vec<f32>,
    bias: Vec<f32>,
    in_features: usize,
    out_features: usize,
}

impl Linear {
    pub fn new(weight: ArrayView2<'_, f32>, bias: &Array1<f32>) -> Result<Self> {
        let (out_features, in_features) = weight.dim();
        if bias.len() != out_features {
            return Err(Error::Shape {
                op: "Linear::new (bias)",
                expected: format!("[{out_features}]"),
                found: bias.shape().to_vec(),
            });
        }
        Ok(Linear {
            weight: weight.iter().copied().collect(),
            bias: bias.to_vec(),
            in_features,
            out_features,
        })
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// `[N, in] -> [N, out]`.
    pub fn forward(&self, input: ArrayView2<'_, f32>) -> Result<Array2<f32>> {
        self.run(input, false)
    }

    /// Linear followed by ReLU.
    pub fn forward_relu(&self, input: ArrayView2<'_, f32>) -> Result<Array2<f32>> {
        self.run(input, true)
    }

    fn run(&self, input: ArrayView2<'_, f32>, relu: bool) -> Result<Array2<f32>> {
        let (n, features) = input.dim();
        if features != self.in_features {
            return Err(Error::Shape {
                op: "Linear",
                expected: format!("[N, {}]", self.in_features),
                found: input.shape().to_vec(),
            });
        }
        let input = input.as_standard_layout();
        let x = input.as_slice().unwrap_or(&[]);
        let mut out = Array2::from_shape_fn((n, self.out_features), |(_, o)| self.bias[o]);
        if let Some(dst) = out.as_slice_mut() {
            gemm_accumulate(
                dst,
                MatRef::row_major(x, n, self.in_features),
                MatRef::transposed(&self.weight, self.in_features, self.out_features),
                Threads::All,
            );
        }
        if relu {
            out.mapv_inplace(|v| v.max(0.0));
        }
        Ok(out)
    }
}
