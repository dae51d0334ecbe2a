//! The arguments of the cuDNN and cuBLAS calls the layers make, as plain data: built by pure
//! functions from a layer's settings, used by the layers to create the descriptors and make
//! the calls, and replayed on the CPU by `tests/library_calls.rs`, where a naive convolution and
//! a naive GEMM read memory exactly as these arguments tell the library to, and must reproduce
//! the CPU layers. The likeliest first-run failures are here (transposes, leading dimensions,
//! descriptor dims, the KRSC filter layout, padded channels, the fc1 permutation), not in the
//! crate's own kernels.

use ndarray::{Array2, Array4, ArrayView2, ArrayView4};

use crate::config::window_output;
use crate::cuda::launch::to_i32;
use crate::cuda::tensor::Layout;
use crate::error::{Error, Result};

/// What `cudnnConvolutionForward` is told, for one input shape, and its two backward calls
/// with the same descriptors: `cudnnConvolutionBackwardData` reads the filter and the output's
/// gradient (shaped `y`) and writes the input's (shaped `x`); `cudnnConvolutionBackwardFilter`
/// reads `x` and the output's gradient and writes the filter's (shaped and ordered as the
/// filter).
///
/// Memory order follows `layout` for the input, the output and the filter, as cuDNN reads a
/// `CUDNN_TENSOR_NCHW` / `CUDNN_TENSOR_NHWC` descriptor: `x` is NCHW or NHWC, the filter KCRS or
/// KRSC. Cross-correlation (no kernel flip), zero padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvCall {
    pub layout: Layout,
    /// Input dims `[n, c, h, w]` (`c` includes zero-padded channels).
    pub x: [i32; 4],
    /// Filter dims `[k, c, r, s]`.
    pub filter: [i32; 4],
    /// `[pad_h, pad_w]`, `[stride_h, stride_w]`, `[dilation_h, dilation_w]`.
    pub padding: [i32; 2],
    pub stride: [i32; 2],
    pub dilation: [i32; 2],
    /// Output dims `[n, k, oh, ow]` the layer expects (cuDNN's own answer is checked against
    /// them when the plan is made).
    pub y: [i32; 4],
}

impl ConvCall {
    /// The call for a square `kernel` with `in_channels` (padded) input channels and
    /// `out_channels` filters, on inputs `[n, in_channels, height, width]` in `layout`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        layout: Layout,
        [n, height, width]: [usize; 3],
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        const OP: &str = "Conv2dGpu (cuDNN call)";
        let out = |len| window_output(len, kernel, stride, padding);
        let (Some(oh), Some(ow)) = (out(height), out(width)) else {
            return Err(Error::Shape {
                op: OP,
                expected: format!("spatial size >= {kernel} after padding {padding}"),
                found: vec![height, width],
            });
        };
        let i = |what, v| to_i32(OP, what, v);
        Ok(ConvCall {
            layout,
            x: [
                i("n", n)?,
                i("c", in_channels)?,
                i("h", height)?,
                i("w", width)?,
            ],
            filter: [
                i("k", out_channels)?,
                i("c", in_channels)?,
                i("r", kernel)?,
                i("s", kernel)?,
            ],
            padding: [i("padding", padding)?; 2],
            stride: [i("stride", stride)?; 2],
            dilation: [1, 1],
            y: [
                i("n", n)?,
                i("k", out_channels)?,
                i("oh", oh)?,
                i("ow", ow)?,
            ],
        })
    }
}

/// OIHW weights `[out, in, k, k]` in the memory order of a `layout` filter descriptor (KCRS for
/// NCHW, KRSC for NHWC) with `in_channels >= in` input channels: the extra ones get zero
/// filters (the fp16 path pads the RGB input to 8 channels for the tensor cores).
pub fn pack_conv_weights(
    weight: ArrayView4<'_, f32>,
    in_channels: usize,
    layout: Layout,
) -> Result<Vec<f32>> {
    let (out, weight_in, k, k2) = weight.dim();
    if k != k2 || in_channels < weight_in {
        return Err(Error::Shape {
            op: "Conv2dGpu (weights)",
            expected: format!("a square kernel with at most {in_channels} input channels"),
            found: weight.shape().to_vec(),
        });
    }
    let mut packed = vec![0.0; out * in_channels * k * k];
    for ((o, c, i, j), &v) in weight.indexed_iter() {
        let index = match layout {
            Layout::Nchw => ((o * in_channels + c) * k + i) * k + j,
            Layout::Nhwc => ((o * k + i) * k + j) * in_channels + c,
        };
        packed[index] = v;
    }
    Ok(packed)
}

/// OIHW weights `[out, in, k, k]` back from the memory order of a `layout` filter descriptor
/// with `in_channels >= in` channels (the inverse of [`pack_conv_weights`]; the zero-padded
/// channels are dropped): a filter gradient from `cudnnConvolutionBackwardFilter` in the
/// layout of a checkpoint and the CPU.
pub fn unpack_conv_weights(
    packed: &[f32],
    [out, weight_in, k]: [usize; 3],
    in_channels: usize,
    layout: Layout,
) -> Result<Array4<f32>> {
    if in_channels < weight_in || packed.len() != out * in_channels * k * k {
        return Err(Error::Shape {
            op: "Conv2dGpu (filter gradient)",
            expected: format!(
                "{out} x {in_channels} x {k} x {k} values holding {weight_in} real channels"
            ),
            found: vec![packed.len()],
        });
    }
    Ok(Array4::from_shape_fn(
        (out, weight_in, k, k),
        |(o, c, i, j)| {
            packed[match layout {
                Layout::Nchw => ((o * in_channels + c) * k + i) * k + j,
                Layout::Nhwc => ((o * k + i) * k + j) * in_channels + c,
            }]
        },
    ))
}

/// A buffer of a linear layer's that one of its GEMMs reads or writes: what a [`GemmCall`]
/// passes as `A`, `B` and `C`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinearBuffer {
    /// The weight, row-major `[out, in]`.
    Weight,
    /// The input `x`, row-major `[rows, in]`.
    Input,
    /// The output `y`, row-major `[rows, out]`.
    Output,
    /// The output's gradient `dy`, shaped as the output.
    OutputGrad,
    /// The input's gradient `dx`, shaped as the input.
    InputGrad,
    /// The weight's gradient `dW`, shaped as the weight.
    WeightGrad,
}

/// What `cublasGemmEx` is told, in its column-major terms: `C[m x n] = op(A)[m x k] *
/// op(B)[k x n]` with leading dimensions `lda`, `ldb`, `ldc` (alpha 1, beta 0), and which of
/// the layer's buffers `A`, `B` and `C` are: the layer passes pointers by these roles
/// ([`GemmCall::operands`]), so a call's replay on the CPU checks the pointers too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmCall {
    /// `op(A) = A^T` when set (`CUBLAS_OP_T`), else `A` (`CUBLAS_OP_N`); likewise `B`.
    pub transa: bool,
    pub transb: bool,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub lda: i32,
    pub ldb: i32,
    pub ldc: i32,
    pub a: LinearBuffer,
    pub b: LinearBuffer,
    pub c: LinearBuffer,
}

impl GemmCall {
    /// A linear layer's GEMM for `rows` inputs: with the weight row-major `[out, in]` as `A`,
    /// the input row-major `[rows, in]` as `B` and the output row-major `[rows, out]` as `C`,
    /// column-major cuBLAS computes `y^T [out, rows] = W [out, in] * x^T [in, rows]`: `A` read
    /// transposed (its column-major view is `W^T`), `B` as is (its view is `x^T`).
    pub fn linear(out_features: usize, in_features: usize, rows: usize) -> Result<Self> {
        const OP: &str = "LinearGpu (cuBLAS call)";
        let m = to_i32(OP, "out_features", out_features)?;
        let n = to_i32(OP, "rows", rows)?;
        let k = to_i32(OP, "in_features", in_features)?;
        Ok(GemmCall {
            transa: true,
            transb: false,
            m,
            n,
            k,
            lda: k,
            ldb: k,
            ldc: m,
            a: LinearBuffer::Weight,
            b: LinearBuffer::Input,
            c: LinearBuffer::Output,
        })
    }

    /// `(A, B, C)` from `buffers`, each given once with its role: the layer labels every
    /// pointer where it takes it from a named buffer, and the call says which goes where. A
    /// role the call needs and `buffers` lacks is an error.
    pub fn operands<P: Copy>(&self, buffers: &[(LinearBuffer, P)]) -> Result<(P, P, P)> {
        let find = |role: LinearBuffer| {
            buffers
                .iter()
                .find(|(given, _)| *given == role)
                .map(|&(_, buffer)| buffer)
                .ok_or_else(|| {
                    Error::invalid(
                        "LinearGpu (cuBLAS call)",
                        format!("no {role:?} buffer given for {self:?}"),
                    )
                })
        };
        Ok((find(self.a)?, find(self.b)?, find(self.c)?))
    }

    /// The input gradient of a linear layer for `rows` rows: row-major `dx [rows, in] =
    /// dy [rows, out] W [out, in]`, so column-major `dx^T [in, rows] = W^T [in, out] *
    /// dy^T [out, rows]`. `A` is the weight buffer, whose column-major view (leading dimension
    /// `in`) already is `W^T`; `B` is `dy`, whose view (leading dimension `out`) is `dy^T`:
    /// neither is transposed.
    pub fn linear_backward_input(
        out_features: usize,
        in_features: usize,
        rows: usize,
    ) -> Result<Self> {
        let call = GemmCall::linear(out_features, in_features, rows)?;
        Ok(GemmCall {
            transa: false,
            transb: false,
            m: call.k,
            n: call.n,
            k: call.m,
            lda: call.k,
            ldb: call.m,
            ldc: call.k,
            a: LinearBuffer::Weight,
            b: LinearBuffer::OutputGrad,
            c: LinearBuffer::InputGrad,
        })
    }

    /// The weight gradient of a linear layer summed over `rows` rows: row-major
    /// `dW [out, in] = dy^T [out, rows] x [rows, in]`, so column-major `dW^T [in, out] =
    /// x^T [in, rows] * dy [rows, out]`. `A` is the input buffer (its view, leading dimension
    /// `in`, is `x^T`: as is); `B` is `dy` (its view, leading dimension `out`, is `dy^T`: read
    /// transposed). The result is row-major `[out, in]`, the weight's own layout.
    pub fn linear_backward_weight(
        out_features: usize,
        in_features: usize,
        rows: usize,
    ) -> Result<Self> {
        let call = GemmCall::linear(out_features, in_features, rows)?;
        Ok(GemmCall {
            transa: false,
            transb: true,
            m: call.k,
            n: call.m,
            k: call.n,
            lda: call.k,
            ldb: call.m,
            ldc: call.k,
            a: LinearBuffer::Input,
            b: LinearBuffer::OutputGrad,
            c: LinearBuffer::WeightGrad,
        })
    }
}

/// `weight` `[out, C*H*W]` with its columns reordered from (C, H, W) to (H, W, C) order: fc1's
/// weights for NHWC activations, whose flatten is (H, W, C).
pub fn chw_columns_to_hwc(
    weight: ArrayView2<'_, f32>,
    [c, h, w]: [usize; 3],
) -> Result<Array2<f32>> {
    let (out, features) = weight.dim();
    if Some(features) != c.checked_mul(h).and_then(|ch| ch.checked_mul(w)) {
        return Err(Error::Shape {
            op: "fc1 weight",
            expected: format!("[{out}, {c} x {h} x {w}] features"),
            found: vec![out, features],
        });
    }
    Ok(Array2::from_shape_fn((out, features), |(o, g)| {
        // Column g of the NHWC flatten is (y, x, ch) with g = (y * w + x) * c + ch.
        let ch = g % c;
        let x = (g / c) % w;
        let y = g / (c * w);
        weight[[o, (ch * h + y) * w + x]]
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Operands are picked by role, whatever order the layer lists its buffers in; a role the
    /// call needs and the layer did not give is an error, not a null pointer.
    #[test]
    fn gemm_operands_are_picked_by_role() {
        let call = GemmCall::linear_backward_weight(4, 3, 2).unwrap();
        let buffers = [
            (LinearBuffer::WeightGrad, "dw"),
            (LinearBuffer::OutputGrad, "dy"),
            (LinearBuffer::Weight, "w"),
            (LinearBuffer::Input, "x"),
        ];
        assert_eq!(call.operands(&buffers).unwrap(), ("x", "dy", "dw"));
        let forward = GemmCall::linear(4, 3, 2).unwrap();
        assert_eq!(forward.operands(&buffers[1..]).ok(), None);
        let with_output = [(LinearBuffer::Output, "y"), buffers[2], buffers[3]];
        assert_eq!(forward.operands(&with_output).unwrap(), ("w", "x", "y"));
    }

    #[test]
    fn fc1_columns_follow_the_nhwc_flatten() {
        let (c, h, w) = (3, 2, 4);
        // Weight row 0 holds each column's own (C, H, W) index.
        let weight = Array2::from_shape_fn((2, c * h * w), |(o, f)| (o * 1000 + f) as f32);
        let permuted = chw_columns_to_hwc(weight.view(), [c, h, w]).unwrap();
        // An activation a[ch, y, x] flattened NCHW at ch*h*w + y*w + x and NHWC at
        // (y*w + x)*c + ch must meet the same weight.
        for ch in 0..c {
            for y in 0..h {
                for x in 0..w {
                    let chw = (ch * h + y) * w + x;
                    let hwc = (y * w + x) * c + ch;
                    assert_eq!(permuted[[1, hwc]], weight[[1, chw]]);
                }
            }
        }
    }
}
