//! Bias + optional ReLU in place: launcher of `kernels/bias_act.cu`; CPU twin
//! [`crate::cpu::bias_act_inplace`].

use cudarc::driver::{CudaSlice, CudaViewMut, LaunchConfig};

use super::shape_err;
use crate::cuda::abi::{
    AlexnetBiasActParams, AlexnetBiasColumnsParams, AlexnetBiasGradParams,
    AlexnetReluBackwardParams, ALEXNET_BIAS_COLUMNS_BLOCK, ALEXNET_BIAS_COLUMNS_TILE,
    ALEXNET_BIAS_GRAD_BLOCK, ALEXNET_BIAS_GRAD_PER_THREAD, ALEXNET_BIAS_PARTIALS,
};
use crate::cuda::device::Gpu;
use crate::cuda::dtype::{GpuDtype, GpuFloat};
use crate::cuda::launch::{element_count, grid_1d, grid_rows, to_u32, Launch};
use crate::cuda::registry::Kernel;
use crate::cuda::tensor::{GpuTensor, Layout};
use crate::error::Result;

/// The kernel's parameters and launch shape for a tensor of `shape` in `layout` and a bias of
/// `bias_len`: what [`bias_act`] passes.
#[doc(hidden)]
pub fn bias_act_args(
    shape: &[usize],
    layout: Layout,
    bias_len: usize,
    relu: bool,
) -> Result<(AlexnetBiasActParams, LaunchConfig)> {
    const OP: &str = "bias_act";
    let [_, channels, inner] = channel_axis(OP, shape, layout)?;
    if bias_len != channels {
        return Err(shape_err(OP, format!("a bias of {channels}"), &[bias_len]));
    }
    let params = AlexnetBiasActParams {
        len: element_count(shape)?,
        channels: to_u32(OP, "channels", channels)?,
        inner: to_u32(OP, "inner", inner)?,
        relu: u32::from(relu),
    };
    Ok((params, grid_1d(OP, params.len)?))
}

/// `[outer, channels, inner]`: the channel axis of a tensor of `shape` in `layout` (C of a 4-D
/// tensor in either layout, the columns of a 2-D `[rows, cols]` one) and the element counts
/// outside and inside it in memory order.
fn channel_axis(op: &'static str, shape: &[usize], layout: Layout) -> Result<[usize; 3]> {
    Ok(match (shape, layout) {
        (&[n, c, h, w], Layout::Nchw) => [n, c, h * w],
        (&[n, c, h, w], Layout::Nhwc) => [n * h * w, c, 1],
        (&[rows, cols], Layout::Nchw) => [rows, cols, 1],
        (other, _) => return Err(shape_err(op, "[N, C, H, W] or [rows, cols]", other)),
    })
}

/// `x += bias[channel]`, then ReLU if `relu`, in place, with the `bias_act` kernel. The channel
/// axis is C of a 4-D tensor (either layout) or the columns of a 2-D `[rows, cols]` tensor.
pub fn bias_act<T: GpuFloat>(
    gpu: &Gpu,
    x: &mut GpuTensor<T>,
    bias: &CudaSlice<T>,
    relu: bool,
) -> Result<()> {
    let (params, cfg) = bias_act_args(x.shape(), x.layout(), bias.len(), relu)?;
    // SAFETY: bias_act(T *x, const T *bias, AlexnetBiasActParams): `x` holds `len` elements and
    // `bias` holds `channels` (checked above); `x` is written in place, `bias` only read, and
    // they are distinct buffers (one borrowed shared, the other exclusively).
    unsafe {
        Launch::new(gpu, Kernel::BiasAct, T::DTYPE)?
            .buffer(x.data_mut())
            .buffer(bias)
            .params(&params)
            .launch(cfg)
    }
}

/// The `relu_backward` kernel's parameters and launch shape for `len` elements: what
/// [`relu_backward`] passes.
#[doc(hidden)]
pub fn relu_backward_args(len: usize) -> Result<(AlexnetReluBackwardParams, LaunchConfig)> {
    let params = AlexnetReluBackwardParams { len: len as u64 };
    Ok((params, grid_1d("relu_backward", params.len)?))
}

/// The ReLU's backward for training, in place: `grad` is zeroed wherever the ReLU's `output`
/// is not positive (as [`crate::cpu::relu_backward`]); both the same shape, f32 or f16.
pub fn relu_backward<T: GpuFloat>(
    gpu: &Gpu,
    output: &GpuTensor<T>,
    grad: &mut GpuTensor<T>,
) -> Result<()> {
    if grad.shape() != output.shape() || grad.layout() != output.layout() {
        return Err(shape_err(
            "relu_backward",
            format!("a gradient shaped like the output {:?}", output.shape()),
            grad.shape(),
        ));
    }
    let (params, cfg) = relu_backward_args(output.len())?;
    // SAFETY: relu_backward(const T *output, T *grad, AlexnetReluBackwardParams); both hold
    // `len` elements (same shape, checked above); `grad` is borrowed exclusively.
    unsafe {
        Launch::new(gpu, Kernel::ReluBackward, T::DTYPE)?
            .buffer(output.data())
            .buffer(grad.data_mut())
            .params(&params)
            .launch(cfg)
    }
}

/// The `bias_grad` kernel's parameters and launch shape for a gradient of `shape` in `layout`
/// (channel axis as for [`bias_act`]): what [`bias_grad`] passes. One block per channel, of
/// [`bias_grad_block`] threads.
#[doc(hidden)]
pub fn bias_grad_args(
    shape: &[usize],
    layout: Layout,
) -> Result<(AlexnetBiasGradParams, LaunchConfig)> {
    const OP: &str = "bias_grad";
    let [outer, channels, inner] = channel_axis(OP, shape, layout)?;
    element_count(shape)?; // the index arithmetic below cannot overflow
    let params = AlexnetBiasGradParams {
        outer: outer as u64,
        inner: inner as u64,
        channels: to_u32(OP, "channels", channels)?,
    };
    let mut cfg = grid_rows(OP, params.channels)?;
    cfg.block_dim = (bias_grad_block(outer.saturating_mul(inner)), 1, 1);
    Ok((params, cfg))
}

/// Threads per `bias_grad` block for a channel of `positions` values: a power of two from a warp
/// up to `ALEXNET_BIAS_GRAD_BLOCK`, the smallest that leaves no thread more than
/// `ALEXNET_BIAS_GRAD_PER_THREAD` positions where the block can be that large. A block runs one
/// channel, so a large channel (conv1's 128 x 55 x 55 at batch 128) wants every thread and every
/// load in flight the block can hold, and a small one (a linear layer's 128 rows) no more threads
/// than it has positions for, nor the deeper reduction tree they bring.
#[doc(hidden)]
pub fn bias_grad_block(positions: usize) -> u32 {
    const WARP: u32 = 32;
    let wanted = positions.div_ceil(ALEXNET_BIAS_GRAD_PER_THREAD as usize);
    let wanted = u32::try_from(wanted).unwrap_or(u32::MAX);
    wanted
        .checked_next_power_of_two()
        .unwrap_or(ALEXNET_BIAS_GRAD_BLOCK)
        .clamp(WARP, ALEXNET_BIAS_GRAD_BLOCK)
}

/// Blocks `bias_grad_columns` aims for: about what an H100 or H200 (132 SMs) keeps resident at
/// 256 threads a block, so that every SM has loads in flight. Fewer where the partial sums
/// would not fit or the rows would leave a split less than [`BIAS_COLUMNS_MIN_ROWS`].
const BIAS_COLUMNS_TARGET_BLOCKS: usize = 1024;

/// The fewest rows a split of `bias_grad_columns` gets (8 for each warp of its block), so a
/// short gradient (a linear layer's 128 rows) is not spread thinner than its loads.
const BIAS_COLUMNS_MIN_ROWS: usize = 64;

/// The parameters and launch shapes of `bias_grad_columns` (the partial sums) and
/// `bias_grad_finish` (each channel's total) for a gradient of `shape` in `layout` whose channel
/// axis is innermost (NHWC, a linear layer's `[rows, cols]`): what [`bias_grad`] passes. `None`
/// for any other gradient, and for one with more channels than the partial sums hold a split
/// of: [`bias_grad_args`]'s one block per channel sums those.
#[doc(hidden)]
pub fn bias_grad_columns_args(
    shape: &[usize],
    layout: Layout,
) -> Result<Option<(AlexnetBiasColumnsParams, LaunchConfig, LaunchConfig)>> {
    const OP: &str = "bias_grad";
    let [rows, channels, inner] = channel_axis(OP, shape, layout)?;
    let room = (ALEXNET_BIAS_PARTIALS as usize)
        .checked_div(channels)
        .unwrap_or(0);
    if inner != 1 || room == 0 {
        return Ok(None);
    }
    element_count(shape)?; // the kernel's row * channels + c cannot overflow
    let tiles = channels.div_ceil(ALEXNET_BIAS_COLUMNS_TILE as usize);
    let wanted = (BIAS_COLUMNS_TARGET_BLOCKS / tiles)
        .min(room)
        .min(rows.div_ceil(BIAS_COLUMNS_MIN_ROWS))
        .max(1);
    // Rows shared out evenly, then as many splits as that takes: none of them empty.
    let rows_per_split = rows.div_ceil(wanted).max(1);
    let splits = rows.div_ceil(rows_per_split).max(1);
    let params = AlexnetBiasColumnsParams {
        rows: rows as u64,
        rows_per_split: rows_per_split as u64,
        channels: to_u32(OP, "channels", channels)?,
        splits: to_u32(OP, "splits", splits)?,
    };
    let sums = LaunchConfig {
        grid_dim: (to_u32(OP, "blocks", tiles * splits)?, 1, 1),
        block_dim: (ALEXNET_BIAS_COLUMNS_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    Ok(Some((params, sums, grid_1d(OP, channels as u64)?)))
}

/// A bias's gradient for training: `out[c]` = the sum of `grad` over every position of channel
/// `c` (every image, every pixel; every row of a 2-D gradient), in f64, written as f32 (the
/// master gradient, also for f16 gradients). `out` holds one value per channel. Where the
/// channel axis is innermost the rows are split across blocks, each reading whole rows, and
/// the splits' partial sums (kept on the GPU) added after; otherwise one block sums each
/// channel. Either way in a fixed order: the same result from run to run.
pub fn bias_grad<T: GpuFloat>(
    gpu: &Gpu,
    grad: &GpuTensor<T>,
    out: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let Some((params, sums, finish)) = bias_grad_columns_args(grad.shape(), grad.layout())? else {
        return bias_grad_per_channel(gpu, grad, out);
    };
    check_bias_grad_len(params.channels, out)?;
    // Held across both launches: another thread's bias gradient, queued on the same stream
    // between them, would overwrite the partial sums before they are added.
    let mut partials = gpu.bias_partials()?;
    // SAFETY: bias_grad_columns(const T *grad, double *partials, AlexnetBiasColumnsParams):
    // `grad` holds rows * channels elements (its own shape); the kernel writes splits *
    // channels partial sums, at most ALEXNET_BIAS_PARTIALS (`bias_grad_columns_args`), which
    // is what the GPU allocated; the partials are borrowed exclusively (the lock).
    unsafe {
        Launch::new(gpu, Kernel::BiasGradColumns, T::DTYPE)?
            .buffer(grad.data())
            .buffer(&mut *partials)
            .params(&params)
            .launch(sums)?;
    }
    // SAFETY: bias_grad_finish(const double *partials, float *bias_grad,
    // AlexnetBiasColumnsParams): it reads the splits * channels partial sums just written (same
    // stream, so after them) and writes `channels` values into `out`, which holds exactly that
    // many (checked above) and is borrowed exclusively.
    unsafe {
        Launch::new(gpu, Kernel::BiasGradFinish, GpuDtype::F32)?
            .buffer(&*partials)
            .buffer(out)
            .params(&params)
            .launch(finish)
    }
}

/// `out` must hold one value per channel.
fn check_bias_grad_len(channels: u32, out: &CudaViewMut<'_, f32>) -> Result<()> {
    if out.len() != channels as usize {
        return Err(shape_err(
            "bias_grad",
            format!("{channels} bias gradients"),
            &[out.len()],
        ));
    }
    Ok(())
}

/// [`bias_grad`] with one block per channel (`bias_grad_f32`/`_f16`).
fn bias_grad_per_channel<T: GpuFloat>(
    gpu: &Gpu,
    grad: &GpuTensor<T>,
    out: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let (params, cfg) = bias_grad_args(grad.shape(), grad.layout())?;
    check_bias_grad_len(params.channels, out)?;
    // SAFETY: bias_grad(const T *grad, float *bias_grad, AlexnetBiasGradParams): `grad` holds
    // outer * channels * inner elements (its own shape) and `out` exactly `channels` (checked
    // above); `out` is borrowed exclusively, so it overlaps nothing the kernel reads.
    unsafe {
        Launch::new(gpu, Kernel::BiasGrad, T::DTYPE)?
            .buffer(grad.data())
            .buffer(out)
            .params(&params)
            .launch(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARTIALS: usize = ALEXNET_BIAS_PARTIALS as usize;
    const TILE: usize = ALEXNET_BIAS_COLUMNS_TILE as usize;

    /// `(splits, rows per split, blocks)` for a gradient of `shape` in `layout`, checking
    /// what holds for every split: each row in exactly one split, none empty, the partial
    /// sums within the GPU's room, one block per split and tile of 32 channels.
    fn split(shape: &[usize], layout: Layout) -> Option<(usize, usize, u32)> {
        let (p, sums, finish) = bias_grad_columns_args(shape, layout).unwrap()?;
        let (rows, per, splits) = (
            p.rows as usize,
            p.rows_per_split as usize,
            p.splits as usize,
        );
        let channels = p.channels as usize;
        assert!(
            splits * per >= rows && (splits - 1) * per < rows.max(1),
            "{shape:?}"
        );
        assert!(splits * channels <= PARTIALS, "{shape:?}");
        assert_eq!(sums.grid_dim.0 as usize, splits * channels.div_ceil(TILE));
        assert!(finish.grid_dim.0 * finish.block_dim.0 >= p.channels);
        Some((splits, per, sums.grid_dim.0))
    }

    #[test]
    fn only_gradients_with_the_channel_axis_innermost_are_summed_by_columns() {
        assert_eq!(split(&[4, 96, 55, 55], Layout::Nchw), None);
        assert!(split(&[4, 96, 55, 55], Layout::Nhwc).is_some());
        assert!(split(&[128, 4096], Layout::Nchw).is_some());
        // More channels than the partial sums hold one split of: one block per channel.
        assert!(split(&[8, PARTIALS], Layout::Nchw).is_some());
        assert_eq!(split(&[8, PARTIALS + 1], Layout::Nchw), None);
        assert_eq!(split(&[8, 0], Layout::Nchw), None);
    }

    /// The splits at AlexNet's batch-128 shapes: enough blocks to fill a 132-SM GPU for the
    /// convolutions' large gradients, no more partial sums than the room, and a linear layer's
    /// 128 rows kept in splits of 64.
    #[test]
    fn the_rows_are_split_for_occupancy_within_the_room() {
        // conv1 NHWC: 387,200 rows of 96 channels: 3 tiles, the room's 341 splits.
        assert_eq!(
            split(&[128, 96, 55, 55], Layout::Nhwc),
            Some((341, 1136, 1023))
        );
        // conv3: 21,632 rows of 384: 12 tiles x 85 splits (1,024 / 12, also the room's).
        assert_eq!(
            split(&[128, 384, 13, 13], Layout::Nhwc),
            Some((85, 255, 1020))
        );
        // fc1's gradient: 128 rows in two splits of 64, 128 tiles.
        assert_eq!(split(&[128, 4096], Layout::Nchw), Some((2, 64, 256)));
        // Few rows: one split; none at all: one empty split, whose channels sum to 0.
        assert_eq!(split(&[3, 10], Layout::Nchw), Some((1, 3, 1)));
        assert_eq!(split(&[0, 10], Layout::Nchw), Some((1, 1, 1)));
    }
}
