//! The network's input tensor on the device: u8 HWC images normalised ([`PrepareInput`], CPU
//! twin [`crate::image::U8Batch::to_nchw_f32`]) or an f32 NCHW batch reordered and padded
//! ([`relayout_f32_input`], CPU twin `tensor::to_physical` of the zero-padded batch); launchers
//! of `kernels/prepare.cu`.

use cudarc::driver::{CudaView, LaunchConfig};

use super::shape_err;
use crate::cuda::abi::{AlexnetPrepareParams, AlexnetRelayoutParams};
use crate::cuda::device::Gpu;
use crate::cuda::dtype::GpuFloat;
use crate::cuda::launch::{abi_shape, element_count, grid_1d, Launch};
use crate::cuda::registry::Kernel;
use crate::cuda::tensor::{GpuTensor, Layout};
use crate::error::{Error, Result};

/// u8 HWC images (a [`crate::image::U8Batch`]'s pixels) to a normalised tensor with the
/// `prepare_input` kernel: `(x / 255 - mean[c]) / std[c]`, into NCHW or NHWC of any `C >= 3`
/// (channels past 3 are written as zeros: e.g. 8 for the fp16 tensor-core path).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PrepareInput {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for PrepareInput {
    /// torchvision's ImageNet normalisation.
    fn default() -> Self {
        PrepareInput {
            mean: crate::image::IMAGENET_MEAN,
            std: crate::image::IMAGENET_STD,
        }
    }
}

impl PrepareInput {
    pub fn new(mean: [f32; 3], std: [f32; 3]) -> Result<Self> {
        if mean.iter().any(|m| !m.is_finite()) || std.iter().any(|s| !s.is_finite() || *s == 0.0) {
            return Err(Error::invalid(
                "normalisation",
                format!("mean {mean:?} must be finite, std {std:?} finite and non-zero"),
            ));
        }
        Ok(PrepareInput { mean, std })
    }

    /// The kernel's parameters and launch shape for `src_len` bytes of images into a
    /// `[n, c, h, w]` output in `layout`: what [`PrepareInput::forward`] passes, after checking
    /// that the bytes are `n` images of `h x w x 3` and that `c >= 3`.
    #[doc(hidden)]
    pub fn args(
        &self,
        [n, c, h, w]: [usize; 4],
        layout: Layout,
        src_len: usize,
    ) -> Result<(AlexnetPrepareParams, LaunchConfig)> {
        const OP: &str = "PrepareInput::forward";
        if c < 3 {
            return Err(shape_err(
                OP,
                "an output of at least 3 channels",
                &[n, c, h, w],
            ));
        }
        let want = element_count(&[n, h, w, 3])?;
        if src_len as u64 != want {
            return Err(shape_err(
                OP,
                format!("{n} images of {h}x{w}x3 bytes = {want} bytes"),
                &[src_len],
            ));
        }
        let params = AlexnetPrepareParams {
            out: abi_shape(OP, [n, c, h, w], layout == Layout::Nhwc)?,
            mean: self.mean,
            std: self.std,
        };
        Ok((params, grid_1d(OP, element_count(&[n, c, h, w])?)?))
    }

    /// `src` holds `n` images of `h x w x 3` bytes, where `dst` is `[n, c, h, w]` (`c >= 3`).
    pub fn forward<T: GpuFloat>(
        &self,
        gpu: &Gpu,
        src: &CudaView<'_, u8>,
        dst: &mut GpuTensor<T>,
    ) -> Result<()> {
        const OP: &str = "PrepareInput::forward";
        let (params, cfg) = self.args(dst.dims4(OP)?, dst.layout(), src.len())?;
        // SAFETY: prepare_input(const unsigned char *src, T *dst, AlexnetPrepareParams); `src`
        // holds n*h*w*3 bytes and `dst` n*c*h*w elements of `params.out` (checked above); one
        // thread per output element.
        unsafe {
            Launch::new(gpu, Kernel::PrepareInput, T::DTYPE)?
                .buffer(src)
                .buffer(dst.data_mut())
                .params(&params)
                .launch(cfg)
        }
    }
}

/// The `relayout_f32_to` kernel's parameters and launch shape for an f32 NCHW source of
/// `src_len` values with `src_channels` channels into a `[n, c, h, w]` output in `layout`: what
/// [`relayout_f32_input`] passes, after checking that the source is `n x src_channels x h x w`
/// and that `c >= src_channels`.
#[doc(hidden)]
pub fn relayout_args(
    [n, c, h, w]: [usize; 4],
    layout: Layout,
    src_channels: usize,
    src_len: usize,
) -> Result<(AlexnetRelayoutParams, LaunchConfig)> {
    const OP: &str = "relayout_f32_input";
    if src_channels == 0 || c < src_channels {
        return Err(shape_err(
            OP,
            format!("an output of at least the source's {src_channels} channels (and 1)"),
            &[n, c, h, w],
        ));
    }
    let want = element_count(&[n, src_channels, h, w])?;
    if src_len as u64 != want {
        return Err(shape_err(
            OP,
            format!("an f32 NCHW source of {n}x{src_channels}x{h}x{w} = {want} values"),
            &[src_len],
        ));
    }
    let params = AlexnetRelayoutParams {
        out: abi_shape(OP, [n, c, h, w], layout == Layout::Nhwc)?,
        src_channels: u32::try_from(src_channels)
            .map_err(|_| shape_err(OP, "fewer than 2^32 channels", &[src_channels]))?,
    };
    Ok((params, grid_1d(OP, element_count(&[n, c, h, w])?)?))
}

/// `src`, an f32 NCHW batch of `src_channels` channels, into `dst` (`[n, c, h, w]`, `c >=
/// src_channels`) with the `relayout_f32_to` kernel: rounded to `dst`'s type once, reordered to
/// its layout, channels past the source's zero. A caller's normalised f32 batch goes up as it
/// is and becomes, e.g., the fp16 network's 8-channel NHWC input on the device, with no host
/// pass over it.
pub fn relayout_f32_input<T: GpuFloat>(
    gpu: &Gpu,
    src: &CudaView<'_, f32>,
    src_channels: usize,
    dst: &mut GpuTensor<T>,
) -> Result<()> {
    let (params, cfg) = relayout_args(
        dst.dims4("relayout_f32_input")?,
        dst.layout(),
        src_channels,
        src.len(),
    )?;
    // SAFETY: relayout_f32_to(const float *src, T *dst, AlexnetRelayoutParams); `src` holds
    // n*src_channels*h*w floats and `dst` n*c*h*w elements of `params.out` (checked above); `dst`
    // is borrowed exclusively, so it does not overlap `src`; one thread per output element.
    unsafe {
        Launch::new(gpu, Kernel::RelayoutF32To, T::DTYPE)?
            .buffer(src)
            .buffer(dst.data_mut())
            .params(&params)
            .launch(cfg)
    }
}
