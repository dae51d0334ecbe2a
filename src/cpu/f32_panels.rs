//! fp32 convolutions and linear layers on micro-kernels of our own (AVX-512F FMA, and AVX2 +
//! FMA for CPUs without AVX-512), with their portable twin. Each output position's window is read in place from the NCHW image inside a
//! zero border (no im2col), and the weights are packed once, when the model is built, not on
//! every call as the `gemm` crate packs its operands. Measured on a 2-core Zen 5 VM, the
//! torchvision preset at batch 16: 134 img/s on the `gemm` crate (~40% of the time in its
//! packing and small-batch loops, mostly for the linear layers), 285 on this kernel.
//!
//! Layout: the weight `[out, depth]` (OIHW flattened: depth in (channel, kernel row, kernel
//! column) order) is packed in panels of [`PANEL`] output channels: for each depth index the
//! panel's 32 values side by side, two cache lines. A window is `channels * kernel` runs of
//! `kernel` values (one per channel and kernel row) at fixed offsets from its top-left corner.

use std::ops::Range;
use std::sync::Arc;

use ndarray::{Array2, Array4, ArrayView2, ArrayView4};
use rayon::prelude::*;

use super::bias_act::relu as relu_of;
use super::{Conv2d, Linear};
use crate::error::{Error, Result};

/// Output channels per panel: a row's sums for one panel are two AVX-512 registers.
const PANEL: usize = 32;

/// The most rows (output positions) a micro-tile has: the AVX-512 kernel's 12 x 2
/// accumulators, 2 registers of weights and one broadcast fit its 32 registers without spills.
const TILE_ROWS: usize = 12;

/// Depth summed in registers before the partial sums go to the tile buffer and the next
/// block adds to them: sums of 9216 products (fc1) in one chain would grow their rounding
/// error with the whole depth; in blocks, with the block's length plus the number of blocks
/// (the `gemm` crate's depth blocking does the same).
const DEPTH_BLOCK: usize = 256;

/// Sixteen weights (one depth index, half a panel): one cache line, so every load of the
/// packed weight is one aligned line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// A weight `[out, depth]` (a convolution's or a linear layer's) packed in panels (see the
/// module's text). Cheap to clone.
#[derive(Clone)]
pub(super) struct F32Panels {
    /// Panel `p`, depth `d`, half `h` (channels `16h..16h + 16` of the panel) is line
    /// `(p * depth + d) * 2 + h`.
    lines: Arc<[Line]>,
    width: usize,
    depth: usize,
}

impl std::fmt::Debug for F32Panels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "F32Panels [{} x {}]", self.width, self.depth)
    }
}

/// Which code computes the micro-tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kernel {
    /// 12 rows x 32 columns in 24 AVX-512 accumulators.
    Avx512,
    /// 6 rows x 16 columns in 12 AVX2 accumulators (of 16 registers), each panel in two
    /// halves: CPUs without AVX-512 (Zen 2-3, Intel's client cores).
    Avx2,
    /// One product at a time: the twin the tests check the others against (slower than the
    /// `gemm` crate, so never chosen for a model).
    #[cfg_attr(not(test), allow(dead_code))]
    Portable,
}

impl Kernel {
    /// The fastest kernel this CPU runs; `None` without AVX-512F or AVX2 + FMA, where the
    /// model keeps the `gemm` crate's path (the portable twin is slower than that path).
    pub(super) fn best() -> Option<Self> {
        [Kernel::Avx512, Kernel::Avx2]
            .into_iter()
            .find(|kernel| kernel.runs_here())
    }

    /// Whether this CPU has the instructions the kernel needs.
    fn runs_here(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Kernel::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
                Kernel::Avx2 => {
                    std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                }
                Kernel::Portable => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Kernel::Portable
        }
    }

    /// Rows per micro-tile.
    fn tile_rows(self) -> usize {
        match self {
            Kernel::Avx512 | Kernel::Portable => TILE_ROWS,
            Kernel::Avx2 => 6,
        }
    }

    /// The instruction set, for the device line ("AVX-512").
    pub(super) fn name(self) -> &'static str {
        match self {
            Kernel::Avx512 => "AVX-512",
            Kernel::Avx2 => "AVX2",
            Kernel::Portable => "portable",
        }
    }

    /// Every kernel this CPU runs (what the tests check).
    #[cfg(test)]
    fn all_here() -> Vec<Self> {
        let all = [Kernel::Avx512, Kernel::Avx2, Kernel::Portable];
        let here: Vec<Self> = all.into_iter().filter(|k| k.runs_here()).collect();
        if here.len() < all.len() {
            println!("note: only {here:?} run on this CPU; the others are not checked here");
        }
        here
    }
}

/// Where the rows of the product lie: row `r`'s depth index `d` is
/// `data[starts[r] + offsets[d / run] + d % run]` (a window read in place: one offset per
/// channel and kernel row, runs of one kernel row's width).
#[derive(Clone, Copy)]
struct Windows<'a> {
    data: &'a [f32],
    starts: &'a [usize],
    offsets: &'a [usize],
    run: usize,
}

impl Windows<'_> {
    /// Checks that every row lies inside `data` and that the runs make up `depth`.
    ///
    /// Panics only on a programming error inside this crate.
    fn check(&self, depth: usize) {
        assert_eq!(
            self.offsets.len() * self.run,
            depth,
            "internal f32 panel windows: {} runs of {} for a depth of {depth}",
            self.offsets.len(),
            self.run
        );
        let last_start = self.starts.iter().max().copied().unwrap_or(0);
        let last_offset = self.offsets.iter().max().copied().unwrap_or(0);
        assert!(
            self.starts.is_empty() || last_start + last_offset + self.run <= self.data.len(),
            "internal f32 panel windows outside their buffer"
        );
    }
}

impl F32Panels {
    /// Packs `b` (`width * depth` values, row-major: OIHW flattened).
    ///
    /// Panics only on a programming error inside this crate (a length that does not match).
    #[cfg(test)]
    pub(super) fn pack(b: &[f32], width: usize, depth: usize) -> Self {
        Self::repack(b, width, depth, None)
    }

    /// Packs `b` as [`F32Panels::pack`] does, into `spare`'s memory where `spare` is the only
    /// holder of panels of this shape (else into new memory). A training step packs every
    /// weight again after each update (about 250 MB for the paper preset): reusing the last
    /// step's buffer spares the kernel zeroing and mapping that much fresh memory every step,
    /// which measured more than a third of a torchvision step on a 2-core VM.
    ///
    /// Panics only on a programming error inside this crate (a length that does not match).
    pub(super) fn repack(b: &[f32], width: usize, depth: usize, spare: Option<Self>) -> Self {
        assert_eq!(b.len(), width * depth, "internal f32 panel shape");
        let len = width.div_ceil(PANEL) * depth * 2;
        // Built in place (a collected `TrustedLen` iterator), not a `Vec` copied into an `Arc`.
        let zeroed = || (0..len).map(|_| Line([0.0; 16])).collect::<Arc<[Line]>>();
        let mut lines = match spare {
            Some(spare) if spare.lines.len() == len => spare.lines,
            _ => zeroed(),
        };
        if Arc::get_mut(&mut lines).is_none() {
            lines = zeroed(); // shared with a clone of the model: its panels stay as they are
        }
        // Unique here, so this never copies.
        let slots = Arc::make_mut(&mut lines);
        // Threaded: fc1 alone is 151 MB. Every lane is written, the padding lanes past
        // `width` with 0, so reused memory holds nothing of the last packing.
        slots.par_iter_mut().enumerate().for_each(|(at, line)| {
            let (half, d, panel) = (at % 2, at / 2 % depth.max(1), at / 2 / depth.max(1));
            for (lane, value) in line.0.iter_mut().enumerate() {
                let j = panel * PANEL + half * 16 + lane;
                *value = if j < width { b[j * depth + d] } else { 0.0 };
            }
        });
        F32Panels {
            lines,
            width,
            depth,
        }
    }

    /// A convolution's weight, packed.
    pub(super) fn of(conv: &Conv2d) -> Self {
        Self::of_reusing(conv, None)
    }

    /// A convolution's weight, packed into `spare`'s memory where it can be
    /// ([`F32Panels::repack`]).
    pub(super) fn of_reusing(conv: &Conv2d, spare: Option<Self>) -> Self {
        let [weight, _] = conv.parameters();
        let width = conv.out_channels();
        Self::repack(weight, width, weight.len() / width.max(1), spare)
    }

    /// A linear layer's weight `[out, in]`, packed.
    #[cfg(test)]
    pub(super) fn of_linear(linear: &Linear) -> Self {
        Self::of_linear_reusing(linear, None)
    }

    /// A linear layer's weight `[out, in]`, packed into `spare`'s memory where it can be
    /// ([`F32Panels::repack`]).
    pub(super) fn of_linear_reusing(linear: &Linear, spare: Option<Self>) -> Self {
        let [weight, _] = linear.parameters();
        Self::repack(weight, linear.out_features(), linear.in_features(), spare)
    }

    fn panels(&self) -> usize {
        self.width.div_ceil(PANEL)
    }

    /// Output channels `PANEL * panels.start..` (up to the width) for the rows' positions:
    /// `out` holds those channels' planes, `starts.len()` values each, written as
    /// `act(sum + bias)`. Each micro-tile's sums are finished while they are in the L1 cache.
    ///
    /// Panics only on a programming error inside this crate (rows outside their buffer, an
    /// output or bias that does not match).
    fn multiply_finish(
        &self,
        windows: &Windows<'_>,
        panels: Range<usize>,
        (bias, relu): (&[f32], bool),
        out: &mut [f32],
        kernel: Kernel,
    ) {
        let positions = windows.starts.len();
        let first_channel = panels.start * PANEL;
        let channels = (panels.end * PANEL).min(self.width) - first_channel;
        assert!(
            bias.len() == self.width && out.len() == channels * positions,
            "internal f32 panel output: {channels} x {positions} into {}",
            out.len()
        );
        self.each_tile(windows, panels, kernel, |first, panel, sums| {
            let from = panel * PANEL;
            let count = sums.len() / PANEL;
            for ch in 0..PANEL.min(self.width - from) {
                let b = bias[from + ch];
                let plane = (from + ch - first_channel) * positions + first;
                for (r, o) in out[plane..plane + count].iter_mut().enumerate() {
                    let v = sums[r * PANEL + ch] + b;
                    *o = if relu { relu_of(v) } else { v };
                }
            }
        });
    }

    /// Every output channel's plane (`out`: `width` planes of one value per row), its panels
    /// split into `tasks` rayon tasks.
    fn planes(
        &self,
        windows: &Windows<'_>,
        finish: (&[f32], bool),
        out: &mut [f32],
        tasks: usize,
        kernel: Kernel,
    ) {
        let all = self.panels();
        let per_task = all.div_ceil(tasks.max(1)).max(1);
        let positions = windows.starts.len();
        out.par_chunks_mut(per_task * PANEL * positions)
            .enumerate()
            .for_each(|(task, out)| {
                let first = task * per_task;
                let range = first..(first + per_task).min(all);
                self.multiply_finish(windows, range, finish, out, kernel);
            });
    }

    /// Every micro-tile's sums for `panels`, panel by panel (a panel's weights stay in the L2
    /// cache while the rows go by): `done(first row, panel, sums)`, `sums` rows of [`PANEL`];
    /// by `kernel`.
    ///
    /// Panics only on a programming error inside this crate (a kernel this CPU cannot run).
    fn each_tile(
        &self,
        windows: &Windows<'_>,
        panels: Range<usize>,
        kernel: Kernel,
        mut done: impl FnMut(usize, usize, &[f32]),
    ) {
        windows.check(self.depth);
        assert!(
            kernel.runs_here(),
            "internal: the {kernel:?} kernel on this CPU"
        );
        // Tiles of near-equal size: a last tile of one or two rows would run its few
        // accumulators at the FMA's latency, not its throughput.
        let total = windows.starts.len();
        let tiles = total.div_ceil(kernel.tile_rows()).max(1);
        let tile_len = |i: usize| total / tiles + usize::from(i < total % tiles);
        let mut tile = [0.0f32; TILE_ROWS * PANEL];
        for panel in panels {
            let b = &self.lines[panel * self.depth * 2..(panel + 1) * self.depth * 2];
            let mut first = 0;
            for i in 0..tiles {
                let count = tile_len(i);
                if count == 0 {
                    continue;
                }
                let sums = &mut tile[..count * PANEL];
                // Blocks of whole runs, about DEPTH_BLOCK deep, the first overwriting `sums`.
                let runs_per_block = (DEPTH_BLOCK / windows.run).max(1);
                let block_depth = runs_per_block * windows.run;
                for (block, offsets) in windows.offsets.chunks(runs_per_block).enumerate() {
                    let rows = Windows {
                        starts: &windows.starts[first..first + count],
                        offsets,
                        ..*windows
                    };
                    let b = &b[2 * block * block_depth..];
                    let add = block > 0;
                    // SAFETY (both kernels): the CPU has the kernel's instructions (asserted
                    // above); every row's runs lie inside `data` (`check` above), there are
                    // 1..=tile_rows rows, `b` holds two lines per depth index of this block
                    // and the ones after it, and `sums` `count * PANEL` values.
                    match kernel {
                        #[cfg(target_arch = "x86_64")]
                        Kernel::Avx512 => unsafe { tile_avx512(&rows, b, sums, add) },
                        #[cfg(target_arch = "x86_64")]
                        Kernel::Avx2 => unsafe { tile_avx2(&rows, b, sums, add) },
                        _ => tile_portable(&rows, b, sums, add),
                    }
                }
                done(first, panel, sums);
                first += count;
            }
        }
    }
}

/// One panel's sums for up to [`TILE_ROWS`] rows by the kernel, added to `sums` when `add`.
///
/// # Safety
/// AVX-512F; 1..=TILE_ROWS rows, every run inside `data`; `b` holds two lines per depth index
/// (`offsets.len() * run`); `sums.len() == starts.len() * PANEL`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512(rows: &Windows<'_>, b: &[Line], sums: &mut [f32], add: bool) {
    // SAFETY (each arm): the caller's promises.
    macro_rules! tile {
        ($($r:literal)*) => {
            match rows.starts.len() {
                $($r => unsafe { micro_tile::<$r>(rows, b, sums, add) },)*
                _ => unreachable!("tile rows are 1..=TILE_ROWS"),
            }
        };
    }
    tile!(1 2 3 4 5 6 7 8 9 10 11 12)
}

/// One panel's sums for up to 6 rows by the AVX2 kernel, added to `sums` when `add`.
///
/// # Safety
/// AVX2 and FMA; 1..=6 rows, every run inside `data`; `b` holds two lines per depth index
/// (`offsets.len() * run`); `sums.len() == starts.len() * PANEL`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2(rows: &Windows<'_>, b: &[Line], sums: &mut [f32], add: bool) {
    // SAFETY (each arm): the caller's promises.
    macro_rules! tile {
        ($($r:literal)*) => {
            match rows.starts.len() {
                $($r => unsafe { micro_tile_avx2::<$r>(rows, b, sums, add) },)*
                _ => unreachable!("AVX2 tile rows are 1..=6"),
            }
        };
    }
    tile!(1 2 3 4 5 6)
}

/// `ROWS` rows times one panel `b` into `c` (rows of [`PANEL`]), added to `c` when `add`, one
/// half of the panel (16 columns) at a time: `2 * ROWS` AVX2 accumulators; each depth index is
/// one line of `b` (two registers) and one broadcast per row.
///
/// # Safety
/// AVX2 and FMA; `rows.starts.len() == ROWS`, every run inside `rows.data`; `b.len() >= 2 *
/// offsets.len() * run`; `c.len() >= ROWS * PANEL`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn micro_tile_avx2<const ROWS: usize>(
    rows: &Windows<'_>,
    b: &[Line],
    c: &mut [f32],
    add: bool,
) {
    use std::arch::x86_64::*;
    debug_assert!(rows.starts.len() == ROWS && c.len() >= ROWS * PANEL);
    debug_assert!(b.len() >= 2 * rows.offsets.len() * rows.run);
    let mut row = [rows.data.as_ptr(); ROWS];
    for (row, &start) in row.iter_mut().zip(rows.starts) {
        // SAFETY: a row's first value is inside `data` (the caller's promise).
        *row = unsafe { row.add(start) };
    }
    for half in 0..2 {
        let mut low = [_mm256_setzero_ps(); ROWS];
        let mut high = [_mm256_setzero_ps(); ROWS];
        let mut depth = 0;
        for &offset in rows.offsets {
            for k in offset..offset + rows.run {
                // SAFETY: line `2 * depth + half` exists (two per depth index); 64 bytes,
                // 64-aligned, read as two aligned 32-byte registers.
                let (b_low, b_high) = unsafe {
                    let line = b.as_ptr().add(2 * depth + half).cast::<f32>();
                    (_mm256_load_ps(line), _mm256_load_ps(line.add(8)))
                };
                depth += 1;
                for r in 0..ROWS {
                    // SAFETY: `start + offset + k` is inside this row's run (the caller's
                    // promise).
                    let a = _mm256_set1_ps(unsafe { *row[r].add(k) });
                    low[r] = _mm256_fmadd_ps(a, b_low, low[r]);
                    high[r] = _mm256_fmadd_ps(a, b_high, high[r]);
                }
            }
        }
        let c = c.as_mut_ptr();
        for r in 0..ROWS {
            // SAFETY: row `r` of `c` has `PANEL` values from `r * PANEL` (the length promise);
            // this half is its 16 values from `16 * half`.
            unsafe {
                let at_low = c.add(r * PANEL + 16 * half);
                let at_high = at_low.add(8);
                if add {
                    low[r] = _mm256_add_ps(_mm256_loadu_ps(at_low), low[r]);
                    high[r] = _mm256_add_ps(_mm256_loadu_ps(at_high), high[r]);
                }
                _mm256_storeu_ps(at_low, low[r]);
                _mm256_storeu_ps(at_high, high[r]);
            }
        }
    }
}

/// The portable twin of [`tile_avx512`] and [`tile_avx2`]: the same sums in the same order (one product at a
/// time, depth index by depth index): what the tests check the kernel against.
fn tile_portable(rows: &Windows<'_>, b: &[Line], sums: &mut [f32], add: bool) {
    for (&start, sums) in rows.starts.iter().zip(sums.chunks_exact_mut(PANEL)) {
        let mut block = [0.0f32; PANEL];
        for (segment, &offset) in rows.offsets.iter().enumerate() {
            for k in 0..rows.run {
                let a = rows.data[start + offset + k];
                let d = segment * rows.run + k;
                let weights = b[2 * d].0.iter().chain(&b[2 * d + 1].0);
                for (sum, &w) in block.iter_mut().zip(weights) {
                    *sum = a.mul_add(w, *sum);
                }
            }
        }
        for (sum, block) in sums.iter_mut().zip(block) {
            *sum = if add { *sum + block } else { block };
        }
    }
}

/// `ROWS` rows times one panel `b` into `c` (rows of [`PANEL`]), added to `c` when `add`:
/// `2 * ROWS` accumulators; each depth index is two lines of `b` and one broadcast per row.
///
/// # Safety
/// AVX-512F; `rows.starts.len() == ROWS`, every run inside `rows.data`; `b.len() >= 2 *
/// offsets.len() * run`; `c.len() >= ROWS * PANEL`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn micro_tile<const ROWS: usize>(rows: &Windows<'_>, b: &[Line], c: &mut [f32], add: bool) {
    use std::arch::x86_64::*;
    debug_assert!(rows.starts.len() == ROWS && c.len() >= ROWS * PANEL);
    debug_assert!(b.len() >= 2 * rows.offsets.len() * rows.run);
    let mut low = [_mm512_setzero_ps(); ROWS];
    let mut high = [_mm512_setzero_ps(); ROWS];
    let mut row = [rows.data.as_ptr(); ROWS];
    for (row, &start) in row.iter_mut().zip(rows.starts) {
        // SAFETY: a row's first value is inside `data` (the caller's promise).
        *row = unsafe { row.add(start) };
    }
    let mut line = b.as_ptr();
    for &offset in rows.offsets {
        for k in offset..offset + rows.run {
            // SAFETY: the next two lines exist (two per depth index), each 64 bytes and
            // 64-aligned.
            let (b_low, b_high) = unsafe {
                (
                    _mm512_load_ps(line.cast()),
                    _mm512_load_ps(line.add(1).cast()),
                )
            };
            // SAFETY: still inside `b` (or one past its end after the last depth index).
            line = unsafe { line.add(2) };
            for r in 0..ROWS {
                // SAFETY: `start + offset + k` is inside this row's run (the caller's
                // promise).
                let a = _mm512_set1_ps(unsafe { *row[r].add(k) });
                low[r] = _mm512_fmadd_ps(a, b_low, low[r]);
                high[r] = _mm512_fmadd_ps(a, b_high, high[r]);
            }
        }
    }
    let c = c.as_mut_ptr();
    for r in 0..ROWS {
        // SAFETY: row `r` of `c` has `PANEL` values from `r * PANEL` (the length promise).
        unsafe {
            let (at_low, at_high) = (c.add(r * PANEL), c.add(r * PANEL + 16));
            if add {
                low[r] = _mm512_add_ps(_mm512_loadu_ps(at_low), low[r]);
                high[r] = _mm512_add_ps(_mm512_loadu_ps(at_high), high[r]);
            }
            _mm512_storeu_ps(at_low, low[r]);
            _mm512_storeu_ps(at_high, high[r]);
        }
    }
}

/// [`Conv2d::forward`] (or `forward_relu`) by the panels on `kernel`: the same sums (up to
/// the order of the f32 additions), NCHW in and out. Images are threaded one per task when
/// there are at least as many as threads; otherwise each image's panels are split across the
/// threads.
pub(super) fn conv_panels(
    conv: &Conv2d,
    panels: &F32Panels,
    input: ArrayView4<'_, f32>,
    relu: bool,
    kernel: Kernel,
) -> Result<Array4<f32>> {
    let g = conv.geometry("Conv2d (f32 panels)", &input)?;
    let (n, c, h, w) = input.dim();
    let o = conv.out_channels();
    if panels.width != o || panels.depth != g.col_rows() {
        return Err(Error::invalid(
            "Conv2d (f32 panels)",
            format!(
                "weights packed as {panels:?} for a convolution of {o} x {}",
                g.col_rows()
            ),
        ));
    }
    let positions = g.out_height * g.out_width;
    let (in_len, out_len) = (c * h * w, o * positions);
    let (bordered_height, bordered_width) = (h + 2 * g.padding, w + 2 * g.padding);
    let bordered_len = if g.padding > 0 {
        c * bordered_height * bordered_width
    } else {
        0
    };
    let plane = bordered_height * bordered_width;
    // A window's top-left corner in the (bordered) image, per output position; its runs'
    // offsets from there, per channel and kernel row (the weight's depth order).
    let starts: Vec<usize> = (0..g.out_height)
        .flat_map(|oy| (0..g.out_width).map(move |ox| (oy * bordered_width + ox) * g.stride))
        .collect();
    let offsets: Vec<usize> = (0..c)
        .flat_map(|ch| (0..g.kernel).map(move |ky| ch * plane + ky * bordered_width))
        .collect();
    let mut output = vec![0.0f32; n * out_len];
    if n > 0 && out_len > 0 {
        let input = input.as_standard_layout();
        let input = input.as_slice().unwrap_or(&[]);
        let [_, bias] = conv.parameters();
        let threads = rayon::current_num_threads();
        let per_image = |bordered: &mut Vec<f32>, image: &[f32], out: &mut [f32], split: bool| {
            let data = if bordered.is_empty() {
                image
            } else {
                // Only the inside is written: the border stays zero from the allocation.
                for (row, src) in image.chunks_exact(w).enumerate() {
                    let (ch, y) = (row / h, row % h);
                    let at = ch * plane + (y + g.padding) * bordered_width + g.padding;
                    bordered[at..at + w].copy_from_slice(src);
                }
                &bordered[..]
            };
            let windows = Windows {
                data,
                starts: &starts,
                offsets: &offsets,
                run: g.kernel,
            };
            let tasks = if split { threads } else { 1 };
            panels.planes(&windows, (bias, relu), out, tasks, kernel);
        };
        if n >= threads {
            input
                .par_chunks_exact(in_len)
                .zip(output.par_chunks_exact_mut(out_len))
                .for_each_init(
                    || vec![0.0f32; bordered_len],
                    |bordered, (image, out)| per_image(bordered, image, out, false),
                );
        } else {
            let mut bordered = vec![0.0f32; bordered_len];
            for (image, out) in input
                .chunks_exact(in_len)
                .zip(output.chunks_exact_mut(out_len))
            {
                per_image(&mut bordered, image, out, true);
            }
        }
    }
    Array4::from_shape_vec((n, o, g.out_height, g.out_width), output)
        .map_err(|e| Error::invalid("Conv2d output", e.to_string()))
}

/// [`Linear::forward`] (or `forward_relu`) by the panels on `kernel`: `input [n, in]` is `n`
/// rows of runs; the output features' panels are split across the threads, so each thread
/// streams its share of the (large) weight from memory once whatever the batch size.
pub(super) fn linear_panels(
    linear: &Linear,
    panels: &F32Panels,
    input: ArrayView2<'_, f32>,
    relu: bool,
    kernel: Kernel,
) -> Result<Array2<f32>> {
    let (n, features) = input.dim();
    let width = linear.out_features();
    if features != linear.in_features() {
        return Err(Error::Shape {
            op: "Linear (f32 panels)",
            expected: format!("[N, {}]", linear.in_features()),
            found: input.shape().to_vec(),
        });
    }
    if panels.width != width || panels.depth != features {
        return Err(Error::invalid(
            "Linear (f32 panels)",
            format!("weights packed as {panels:?} for a layer of {width} x {features}"),
        ));
    }
    let mut planes = vec![0.0f32; width * n];
    if n > 0 && width > 0 && features > 0 {
        let input = input.as_standard_layout();
        let starts: Vec<usize> = (0..n).map(|r| r * features).collect();
        // Each row as runs of equal length, so that the depth blocks can split it.
        let run = (1..=DEPTH_BLOCK.min(features))
            .rev()
            .find(|run| features.is_multiple_of(*run))
            .unwrap_or(1);
        let offsets: Vec<usize> = (0..features).step_by(run).collect();
        let windows = Windows {
            data: input.as_slice().unwrap_or(&[]),
            starts: &starts,
            offsets: &offsets,
            run,
        };
        let [_, bias] = linear.parameters();
        let threads = rayon::current_num_threads();
        panels.planes(&windows, (bias, relu), &mut planes, threads, kernel);
    } else if features == 0 {
        // No products: every output is its (activated) bias.
        let [_, bias] = linear.parameters();
        for (plane, &b) in planes.chunks_exact_mut(n.max(1)).zip(bias) {
            plane.fill(if relu { relu_of(b) } else { b });
        }
    }
    // Planes `[width, n]` to rows `[n, width]` (a small array: the batch's outputs).
    Ok(Array2::from_shape_vec((width, n), planes)
        .map_err(|e| Error::invalid("Linear output", e.to_string()))?
        .reversed_axes()
        .as_standard_layout()
        .into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array1;

    fn value(i: usize, scale: usize) -> f32 {
        ((i * 7919 % scale) as f32 - (scale / 2) as f32) / 17.0
    }

    /// An `[o, c, k, k]` weight of [`value`]s.
    fn patterned_weight(o: usize, c: usize, k: usize) -> ndarray::Array4<f32> {
        ndarray::Array4::from_shape_fn((o, c, k, k), |(a, b, y, x)| {
            value(((a * 31 + b) * 17 + y) * 13 + x, 97) / 10.0
        })
    }

    /// An `[n, c, h, w]` batch of [`value`]s.
    fn patterned_images(shape: (usize, usize, usize, usize)) -> ndarray::Array4<f32> {
        ndarray::Array4::from_shape_fn(shape, |(i, ch, y, x)| {
            value(((i * 7 + ch) * 41 + y) * 43 + x, 101)
        })
    }

    /// Repacking gives what packing afresh gives, into the spare's memory only where nothing
    /// else holds it and the shape matches, and writes every lane (the padding past the width
    /// too), so nothing of the spare's values survives.
    #[test]
    fn repacking_reuses_only_unshared_memory_and_writes_every_lane() {
        let (width, depth) = (40, 7); // the second panel partial
        let old: Vec<f32> = (0..width * depth).map(|i| value(i, 89)).collect();
        let new: Vec<f32> = (0..width * depth).map(|i| value(i + 5, 263)).collect();
        let bits = |p: &F32Panels| -> Vec<u32> {
            p.lines.iter().flat_map(|l| l.0).map(f32::to_bits).collect()
        };
        let fresh = bits(&F32Panels::pack(&new, width, depth));

        let mut spare = F32Panels::pack(&old, width, depth);
        for line in Arc::get_mut(&mut spare.lines).expect("unshared") {
            line.0 = [f32::NAN; 16];
        }
        let memory = spare.lines.as_ptr();
        let reused = F32Panels::repack(&new, width, depth, Some(spare));
        assert_eq!(
            reused.lines.as_ptr(),
            memory,
            "the spare's memory was not reused"
        );
        assert_eq!(bits(&reused), fresh);

        let spare = F32Panels::pack(&old, width, depth);
        let clone = spare.clone();
        let repacked = F32Panels::repack(&new, width, depth, Some(spare));
        assert_ne!(repacked.lines.as_ptr(), clone.lines.as_ptr());
        assert_eq!(bits(&repacked), fresh);
        assert_eq!(bits(&clone), bits(&F32Panels::pack(&old, width, depth)));

        let other_shape = F32Panels::pack(&old[..32 * depth], 32, depth);
        assert_eq!(
            bits(&F32Panels::repack(&new, width, depth, Some(other_shape))),
            fresh
        );
    }

    /// Windows read in place (several runs per row, rows overlapping), partial panels and
    /// partial tiles: kernel (where the CPU has it) and twin against naive f64 sums.
    #[test]
    fn windowed_products_match_naive_sums() {
        let data: Vec<f32> = (0..3000).map(|i| value(i, 263)).collect();
        // (rows, width, runs, run, run stride)
        for (rows, width, runs, run, stride) in [
            (1, 1, 1, 1, 0),
            (14, 40, 3, 10, 57),
            (25, 70, 5, 3, 6),
            (13, 64, 9, 11, 200),
            // Several depth blocks.
            (5, 40, 40, 11, 60),
            (4, 33, 3, 300, 310),
        ] {
            let depth = runs * run;
            let b: Vec<f32> = (0..width * depth).map(|i| value(i, 89)).collect();
            let starts: Vec<usize> = (0..rows).map(|r| r * 7 + r % 3).collect();
            let offsets: Vec<usize> = (0..runs).map(|s| s * stride).collect();
            let windows = Windows {
                data: &data,
                starts: &starts,
                offsets: &offsets,
                run,
            };
            let panels = F32Panels::pack(&b, width, depth);
            for kernel in Kernel::all_here() {
                let mut c = vec![f32::NAN; width * rows];
                let bias = vec![0.0; width];
                panels.multiply_finish(
                    &windows,
                    0..panels.panels(),
                    (&bias, false),
                    &mut c,
                    kernel,
                );
                for col in 0..width {
                    for r in 0..rows {
                        let terms = (0..depth).map(|d| {
                            let at = starts[r] + offsets[d / run] + d % run;
                            data[at] as f64 * b[col * depth + d] as f64
                        });
                        let want: f64 = terms.clone().sum();
                        // f32 rounding grows with the terms' size, not the (cancelled) sum's.
                        let size: f64 = terms.map(f64::abs).sum();
                        let got = c[col * rows + r] as f64;
                        assert!(
                            (got - want).abs() <= 1e-6 * (1.0 + size),
                            "{kernel:?}, {rows} rows x {width} ({runs} runs of {run}) \
                             at ({r}, {col}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// The whole convolution (bordered copy, window offsets, output planes, bias, ReLU)
    /// against [`Conv2d`]'s im2col + GEMM path, itself checked against a naive convolution.
    #[test]
    fn convolutions_match_the_gemm_path() {
        // (images, in channels, side, out channels, kernel, stride, padding)
        let cases = [
            (2, 3, 35, 64, 11, 4, 2),
            (1, 3, 23, 96, 11, 4, 0),
            (3, 16, 13, 40, 5, 1, 2),
            (1, 24, 9, 70, 3, 1, 1),
            (4, 8, 7, 32, 3, 2, 1),
        ];
        for (n, c, side, o, k, stride, padding) in cases {
            let weight = patterned_weight(o, c, k);
            let bias = Array1::from_shape_fn(o, |i| value(i, 23));
            let conv = Conv2d::new(weight.view(), &bias, stride, padding).expect("conv");
            let input = patterned_images((n, c, side, side));
            let panels = F32Panels::of(&conv);
            for relu in [false, true] {
                let want = if relu {
                    conv.forward_relu(input.view())
                } else {
                    conv.forward(input.view())
                }
                .expect("gemm path");
                let largest = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                for kernel in Kernel::all_here() {
                    let got =
                        conv_panels(&conv, &panels, input.view(), relu, kernel).expect("panels");
                    assert_eq!(got.dim(), want.dim());
                    for ((at, g), w) in got.indexed_iter().zip(want.iter()) {
                        assert!(
                            (g - w).abs() <= 1e-5 * largest,
                            "case {:?} relu {relu} {kernel:?} at {at:?}: {g} vs {w}",
                            (n, c, side, o, k, stride, padding)
                        );
                    }
                }
            }
        }
    }

    /// A stride-1 convolution's input gradient as the forward of its turned convolution
    /// ([`Conv2d::input_gradient_convolution`]) on the panels, against the sum that defines it
    /// in f64: every padding from 0 to `k - 1`, non-square images, channel counts off the
    /// panels' width, batches under and over the thread count. Other strides and paddings of
    /// `k` or more have no such convolution.
    #[test]
    fn turned_convolutions_give_naive_input_gradients() {
        // (images, in channels, height, width, out channels, kernel, padding)
        let cases = [
            (1, 3, 7, 9, 5, 3, 1),
            (3, 17, 13, 11, 33, 5, 2),
            (2, 8, 6, 6, 40, 3, 0),
            (1, 4, 5, 8, 2, 1, 0),
            (4, 16, 9, 7, 20, 5, 4),
        ];
        for (n, c, h, w, o, k, p) in cases {
            let weight = patterned_weight(o, c, k);
            let conv = Conv2d::new(weight.view(), &Array1::zeros(o), 1, p).expect("conv");
            let (oh, ow) = conv.output_size(h, w).expect("output size");
            let grad = patterned_images((n, o, oh, ow));
            let turned = conv
                .input_gradient_convolution()
                .expect("stride 1, padding < k");
            let panels = F32Panels::of(&turned);
            for kernel in Kernel::all_here() {
                let got = conv_panels(&turned, &panels, grad.view(), false, kernel).expect("dx");
                assert_eq!(got.dim(), (n, c, h, w), "case {:?}", (n, c, h, w, o, k, p));
                for ((i, ch, y, x), &g) in got.indexed_iter() {
                    let (mut want, mut size) = (0.0f64, 0.0f64);
                    for (oc, ky, kx) in (0..o).flat_map(|oc| {
                        (0..k).flat_map(move |ky| (0..k).map(move |kx| (oc, ky, kx)))
                    }) {
                        let (oy, ox) = ((y + p).checked_sub(ky), (x + p).checked_sub(kx));
                        if let (Some(oy), Some(ox)) = (oy, ox) {
                            if oy < oh && ox < ow {
                                let term =
                                    weight[(oc, ch, ky, kx)] as f64 * grad[(i, oc, oy, ox)] as f64;
                                want += term;
                                size += term.abs();
                            }
                        }
                    }
                    assert!(
                        (g as f64 - want).abs() <= 1e-6 * (1.0 + size),
                        "case {:?} {kernel:?} at {:?}: {g} vs {want}",
                        (n, c, h, w, o, k, p),
                        (i, ch, y, x)
                    );
                }
            }
        }
        let weight = ndarray::Array4::zeros((2, 3, 3, 3));
        for (stride, padding) in [(2, 1), (1, 3), (1, 4)] {
            let conv =
                Conv2d::new(weight.view(), &Array1::zeros(2), stride, padding).expect("conv");
            assert!(
                conv.input_gradient_convolution().is_none(),
                "stride {stride}, padding {padding}"
            );
        }
    }

    /// Linear layers (a partial panel, an odd input count, batches that split into tiles
    /// unevenly) against [`Linear`]'s GEMM path.
    #[test]
    fn linear_layers_match_the_gemm_path() {
        for (n, features, out) in [(1, 5, 3), (16, 301, 70), (27, 96, 64), (3, 1, 33)] {
            let weight =
                ndarray::Array2::from_shape_fn((out, features), |(o, i)| value(o * 131 + i, 89));
            let bias = Array1::from_shape_fn(out, |i| value(i, 23));
            let linear = Linear::new(weight.view(), &bias).expect("linear");
            let input =
                ndarray::Array2::from_shape_fn((n, features), |(r, i)| value(r * 977 + i, 101));
            let panels = F32Panels::of_linear(&linear);
            for relu in [false, true] {
                let want = if relu {
                    linear.forward_relu(input.view())
                } else {
                    linear.forward(input.view())
                }
                .expect("gemm path");
                let largest = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
                for kernel in Kernel::all_here() {
                    let got = linear_panels(&linear, &panels, input.view(), relu, kernel)
                        .expect("panels");
                    assert_eq!(got.dim(), want.dim());
                    for ((at, g), w) in got.indexed_iter().zip(want.iter()) {
                        assert!(
                            (g - w).abs() <= 1e-5 * largest,
                            "{n} x {features} -> {out}, relu {relu}, {kernel:?} at \
                             {at:?}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    /// A long sum keeps f32's accuracy: 9216 products of 0.1 (fc1's depth) summed in one
    /// chain drift by ~8e-5 of the result; in depth blocks they stay within 5e-6 (2e-6
    /// measured).
    #[test]
    fn long_sums_are_summed_in_blocks() {
        let (n, features) = (3, 9216);
        let linear = Linear::new(
            ndarray::Array2::from_elem((2, features), 1.0f32).view(),
            &Array1::zeros(2),
        )
        .expect("linear");
        let input = ndarray::Array2::from_elem((n, features), 0.1f32);
        let want = features as f64 * f64::from(0.1f32);
        let panels = F32Panels::of_linear(&linear);
        for kernel in Kernel::all_here() {
            let got = linear_panels(&linear, &panels, input.view(), false, kernel).expect("sum");
            for &g in &got {
                let error = (f64::from(g) - want).abs() / want;
                assert!(error <= 5e-6, "{kernel:?}: {g} vs {want} ({error:e})");
            }
        }
    }

    /// Weights packed for another convolution are a typed error, not a wrong answer.
    #[test]
    fn mismatched_packing_is_an_error() {
        let conv = |o| {
            Conv2d::new(
                ndarray::Array4::zeros((o, 3, 3, 3)).view(),
                &Array1::zeros(o),
                1,
                1,
            )
            .expect("conv")
        };
        let input = ndarray::Array4::zeros((1, 3, 8, 8));
        let err = conv_panels(
            &conv(8),
            &F32Panels::of(&conv(16)),
            input.view(),
            true,
            Kernel::Portable,
        );
        assert!(err.is_err());
    }
}
