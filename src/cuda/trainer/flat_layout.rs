//! Where the trainable tensors lie in the trainer's flat buffers (the f32 gradients, the
//! momentum and, in mixed precision, the f16 or bf16 weight gradients at the same offsets).
//! Each layer's weight gradient is written there by cuDNN or cuBLAS, whose faster kernels
//! load and store 16 bytes at a time and want aligned addresses: so every weight starts on a
//! [`WEIGHT_ALIGN`]-value boundary (256 bytes in f32, as a fresh allocation does), whatever
//! the lengths before it. The gaps are SGD padding segments, which the update leaves alone. A
//! bias follows its weight directly: the crate's own kernels write it, one value at a time.

use crate::cuda::ops::SgdSegment;
use crate::error::{Error, Result};

/// The values every weight's offset is a multiple of.
pub(super) const WEIGHT_ALIGN: usize = 64;

/// The flat buffers' segments, built layer by layer.
#[derive(Debug, Default)]
pub(super) struct FlatLayout {
    /// What SGD walks: the tensors in network order and the gaps between them.
    segments: Vec<SgdSegment>,
    /// Where each trainable tensor starts, in network order.
    offsets: Vec<usize>,
    len: usize,
}

impl FlatLayout {
    /// Adds a trainable layer's weight and bias segments (never padding); gives where the
    /// weight starts, aligned, the bias following it.
    pub fn push_layer(&mut self, weight: SgdSegment, bias: SgdSegment) -> usize {
        let gap = self.len.next_multiple_of(WEIGHT_ALIGN) - self.len;
        if gap > 0 {
            self.segments.push(SgdSegment::padding(gap));
            self.len += gap;
        }
        let at = self.len;
        for tensor in [weight, bias] {
            self.offsets.push(self.len);
            self.segments.push(tensor);
            self.len += tensor.len;
        }
        at
    }

    pub fn segments(&self) -> &[SgdSegment] {
        &self.segments
    }

    /// The flat buffers' length, gaps included.
    pub fn len(&self) -> usize {
        self.len
    }

    /// How many trainable tensors there are (gaps not counted).
    pub fn tensor_count(&self) -> usize {
        self.offsets.len()
    }

    /// Each trainable tensor's values in `flat` (laid out as this), in network order.
    pub fn split(&self, flat: &[f32]) -> Result<Vec<Vec<f32>>> {
        self.tensor_ranges()
            .map(|range| {
                flat.get(range)
                    .map(<[f32]>::to_vec)
                    .ok_or_else(|| Error::invalid("CudaTrainer", "a tensor beyond the flat buffer"))
            })
            .collect()
    }

    /// The flat buffer holding `tensors` (one per trainable tensor, in network order, each of
    /// its length) at their offsets, the gaps 0.
    pub fn join(&self, tensors: &[Vec<f32>]) -> Result<Vec<f32>> {
        let lens: Vec<usize> = tensors.iter().map(Vec::len).collect();
        let want: Vec<usize> = self.tensor_ranges().map(|r| r.len()).collect();
        if lens != want {
            return Err(Error::Shape {
                op: "CudaTrainer",
                expected: format!("tensors of {want:?} values"),
                found: lens,
            });
        }
        let mut flat = vec![0.0; self.len];
        for (range, values) in self.tensor_ranges().zip(tensors) {
            flat[range].copy_from_slice(values);
        }
        Ok(flat)
    }

    fn tensor_ranges(&self) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        self.segments
            .iter()
            .filter(|s| !s.padding)
            .zip(&self.offsets)
            .map(|(segment, &at)| at..at + segment.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::SgdConfig;

    fn layer(layout: &mut FlatLayout, weight: usize, bias: usize) -> usize {
        let config = SgdConfig::default();
        layout.push_layer(
            SgdSegment::named("w.weight", weight, &config),
            SgdSegment::named("w.bias", bias, &config),
        )
    }

    /// Odd lengths (the tests' small network has a 7-channel convolution): every weight still
    /// starts on the boundary, each gap is one padding segment, and the bias follows its weight.
    #[test]
    fn every_weight_starts_aligned_whatever_came_before() {
        let mut layout = FlatLayout::default();
        assert_eq!(layer(&mut layout, 504, 7), 0);
        assert_eq!(layer(&mut layout, 432, 6), 512);
        assert_eq!(layer(&mut layout, 128, 64), 960);
        // 960 + 192 is a multiple of 64 already: no gap.
        assert_eq!(layer(&mut layout, 5, 5), 1152);
        assert_eq!(layout.len(), 1162);
        assert_eq!(layout.tensor_count(), 8);
        let padding: Vec<(usize, bool)> = layout
            .segments()
            .iter()
            .map(|s| (s.len, s.padding))
            .collect();
        assert_eq!(
            padding,
            [
                (504, false),
                (7, false),
                (1, true),
                (432, false),
                (6, false),
                (10, true),
                (128, false),
                (64, false),
                (5, false),
                (5, false),
            ]
        );
    }

    /// Tensors go in at their offsets and come out as they went in; the gaps are 0.
    #[test]
    fn join_and_split_put_each_tensor_at_its_offset() {
        let mut layout = FlatLayout::default();
        layer(&mut layout, 3, 1);
        layer(&mut layout, 2, 2);
        let tensors = vec![
            vec![1.0, 2.0, 3.0],
            vec![4.0],
            vec![5.0, 6.0],
            vec![7.0, 8.0],
        ];
        let flat = layout.join(&tensors).unwrap();
        assert_eq!(flat.len(), 68);
        assert_eq!(&flat[..5], &[1.0, 2.0, 3.0, 4.0, 0.0]);
        assert_eq!(&flat[64..], &[5.0, 6.0, 7.0, 8.0]);
        assert!(flat[4..64].iter().all(|&v| v == 0.0));
        assert_eq!(layout.split(&flat).unwrap(), tensors);
        // Wrong lengths are an error, not a shifted buffer.
        assert!(layout.join(&tensors[..3]).is_err());
        assert!(layout
            .join(&[vec![0.0; 4], vec![], vec![], vec![]])
            .is_err());
        assert!(layout.split(&flat[..67]).is_err());
    }
}
