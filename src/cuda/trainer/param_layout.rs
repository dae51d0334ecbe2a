//! Where a parameter tensor's order on the device differs from the CPU's, and the one place
//! that converts between them. Channels-last training keeps each convolution's filter as
//! cuDNN's NHWC filter descriptor reads it (OHWI, conv1's input channels zero-padded to 8) and
//! fc1's columns in the (H, W, C) order of its flattened NHWC input; NCHW training keeps the
//! CPU's order. Weights, masters and momentum pass through here on the way in and out, so a
//! checkpoint is in the CPU's order whatever layout the run trained in.

use ndarray::ArrayView4;

use crate::cuda::ops::{chw_columns_to_hwc, pack_conv_weights, unpack_conv_weights};
use crate::cuda::tensor::Layout;
use crate::error::{Error, Result};

/// How one parameter tensor is laid out on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ParamLayout {
    /// The CPU's order: biases, linear layers (but fc1 behind NHWC activations), and every
    /// tensor of an NCHW network whose conv1 takes its input's own channels.
    Same { len: usize },
    /// A convolution's OIHW filter `[out, weight_in, k, k]` as [`pack_conv_weights`] stores it
    /// for `layout` with `in_channels >= weight_in` input channels (the extra ones zero).
    Filter {
        out: usize,
        weight_in: usize,
        k: usize,
        in_channels: usize,
        layout: Layout,
    },
    /// A linear layer's `[out, c * h * w]` weight read by a flattened NHWC input: its columns
    /// in (h, w, c) order where the CPU's are in (c, h, w) order.
    HwcColumns { out: usize, chw: [usize; 3] },
}

impl ParamLayout {
    /// Values on the CPU (and in a checkpoint).
    pub fn host_len(self) -> usize {
        match self {
            ParamLayout::Same { len } => len,
            ParamLayout::Filter {
                out, weight_in, k, ..
            } => out * weight_in * k * k,
            ParamLayout::HwcColumns { out, chw } => out * chw.iter().product::<usize>(),
        }
    }

    /// Values on the device (more than on the CPU where input channels are padded).
    pub fn device_len(self) -> usize {
        match self {
            ParamLayout::Filter {
                out,
                k,
                in_channels,
                ..
            } => out * in_channels * k * k,
            _ => self.host_len(),
        }
    }

    /// The CPU's values in the device's order.
    pub fn to_device(self, host: &[f32]) -> Result<Vec<f32>> {
        self.check("to the device", host.len(), self.host_len())?;
        match self {
            ParamLayout::Same { .. } => Ok(host.to_vec()),
            ParamLayout::Filter {
                out,
                weight_in,
                k,
                in_channels,
                layout,
            } => {
                let weight = ArrayView4::from_shape((out, weight_in, k, k), host)
                    .map_err(|e| Error::invalid("ParamLayout", e.to_string()))?;
                pack_conv_weights(weight, in_channels, layout)
            }
            ParamLayout::HwcColumns { out, chw } => {
                let features = chw.iter().product::<usize>();
                let weight = ndarray::ArrayView2::from_shape((out, features), host)
                    .map_err(|e| Error::invalid("ParamLayout", e.to_string()))?;
                Ok(chw_columns_to_hwc(weight, chw)?.into_raw_vec_and_offset().0)
            }
        }
    }

    /// The device's values in the CPU's order (padded channels dropped): `device` itself where
    /// the order is the same (fc1's 151 MB is not copied again).
    pub fn to_host(self, device: Vec<f32>) -> Result<Vec<f32>> {
        self.check("to the host", device.len(), self.device_len())?;
        match self {
            ParamLayout::Same { .. } => Ok(device),
            ParamLayout::Filter {
                out,
                weight_in,
                k,
                in_channels,
                layout,
            } => Ok(
                unpack_conv_weights(&device, [out, weight_in, k], in_channels, layout)?
                    .into_raw_vec_and_offset()
                    .0,
            ),
            ParamLayout::HwcColumns {
                out,
                chw: [c, h, w],
            } => {
                let features = c * h * w;
                let mut host = vec![0.0; out * features];
                for (o, row) in device.chunks_exact(features).enumerate() {
                    // Device column (y * w + x) * c + ch holds the CPU's (ch * h + y) * w + x.
                    for (g, &v) in row.iter().enumerate() {
                        let (ch, x, y) = (g % c, (g / c) % w, g / (c * w));
                        host[o * features + (ch * h + y) * w + x] = v;
                    }
                }
                Ok(host)
            }
        }
    }

    fn check(self, direction: &str, found: usize, expected: usize) -> Result<()> {
        match found == expected {
            true => Ok(()),
            false => Err(Error::Shape {
                op: "CudaTrainer (parameter layout)",
                expected: format!("{expected} values to convert {direction} as {self:?}"),
                found: vec![found],
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distinct values, so a misplaced one shows.
    fn ramp(len: usize) -> Vec<f32> {
        (0..len).map(|i| i as f32 + 1.0).collect()
    }

    /// conv1 in channels-last: OIHW `[2, 3, 2, 2]` to OHWI with 8 channels, placed by the
    /// NHWC filter descriptor's index `((o * k + i) * k + j) * 8 + c`, written out here rather
    /// than taken from `pack_conv_weights`.
    #[test]
    fn a_channels_last_filter_is_ohwi_with_zero_padded_channels_and_comes_back() {
        let layout = ParamLayout::Filter {
            out: 2,
            weight_in: 3,
            k: 2,
            in_channels: 8,
            layout: Layout::Nhwc,
        };
        assert_eq!((layout.host_len(), layout.device_len()), (24, 64));
        let host = ramp(24);
        let device = layout.to_device(&host).unwrap();
        assert_eq!(device.len(), 64);
        for o in 0..2 {
            for c in 0..8 {
                for i in 0..2 {
                    for j in 0..2 {
                        let got = device[((o * 2 + i) * 2 + j) * 8 + c];
                        let want = match c < 3 {
                            true => host[((o * 3 + c) * 2 + i) * 2 + j],
                            false => 0.0,
                        };
                        assert_eq!(got, want, "o {o} c {c} i {i} j {j}");
                    }
                }
            }
        }
        assert_eq!(layout.to_host(device).unwrap(), host);
    }

    /// fc1 behind NHWC activations: device column `(y * w + x) * c + ch` is the CPU's column
    /// `(ch * h + y) * w + x`, both ways.
    #[test]
    fn hwc_columns_follow_the_nhwc_flatten_both_ways() {
        let [c, h, w] = [3, 2, 4];
        let layout = ParamLayout::HwcColumns {
            out: 2,
            chw: [c, h, w],
        };
        let host = ramp(2 * c * h * w);
        let device = layout.to_device(&host).unwrap();
        let features = c * h * w;
        for o in 0..2 {
            for y in 0..h {
                for x in 0..w {
                    for ch in 0..c {
                        assert_eq!(
                            device[o * features + (y * w + x) * c + ch],
                            host[o * features + (ch * h + y) * w + x],
                        );
                    }
                }
            }
        }
        assert_ne!(device, host);
        assert_eq!(layout.to_host(device).unwrap(), host);
    }

    /// NCHW filters with their own channels, and `Same`, are the CPU's order unchanged.
    #[test]
    fn nchw_filters_and_plain_tensors_keep_the_cpus_order() {
        let filter = ParamLayout::Filter {
            out: 2,
            weight_in: 3,
            k: 2,
            in_channels: 3,
            layout: Layout::Nchw,
        };
        let host = ramp(24);
        assert_eq!(filter.to_device(&host).unwrap(), host);
        assert_eq!(filter.to_host(host.clone()).unwrap(), host);
        let same = ParamLayout::Same { len: 5 };
        assert_eq!(same.to_device(&ramp(5)).unwrap(), ramp(5));
    }

    /// A wrong length either way is a shape error, not a panic or a silent truncation.
    #[test]
    fn a_wrong_length_is_a_shape_error() {
        let layout = ParamLayout::HwcColumns {
            out: 2,
            chw: [3, 2, 2],
        };
        for result in [layout.to_device(&ramp(23)), layout.to_host(ramp(25))] {
            assert!(matches!(result, Err(Error::Shape { .. })), "{result:?}");
        }
    }
}
