//! bf16 products on AVX512-BF16 (`vdpbf16ps`) by a micro-kernel of our own, with its portable
//! twin. numkong's kernels (see [`super::bf16`]) reached 260-400 GFLOP/s on one Zen 5 core at the
//! convolutions' shapes (the 363-deep conv1 was the slowest); this kernel, measured the same way,
//! 510-535. It runs the convolutions and the linear layers wherever the CPU has AVX512-BF16
//! but not AMX; numkong keeps AMX CPUs (its tile kernels, not measured here).
//!
//! Layout: `B [width, depth]` is packed into panels of [`PANEL`] columns, each a run of depth
//! pairs: for pair `k`, the 32 columns' values `(B[j, 2k], B[j, 2k + 1])` side by side, the two
//! cache lines `vdpbf16ps` reads as its second operand. `A`'s rows are read in place, two bf16
//! values (one 32-bit word) at a time, broadcast to every lane.

use std::sync::Arc;

/// Columns per panel: the sums of a row's panel are two AVX-512 registers of f32.
pub(crate) const PANEL: usize = 32;

/// Rows per micro-tile: 12 x 2 accumulators, 2 registers of `B` and one broadcast of `A` fit
/// the 32 AVX-512 registers without spills.
const TILE_ROWS: usize = 12;

/// Sixteen depth pairs of one panel half (16 columns): one cache line, so the packed buffer is
/// 64-byte aligned and every load of `B` is one line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u32; 16]);

/// `B [width, depth]` rounded to bf16 and packed in panels (see the module's text). Cheap to
/// clone.
#[derive(Clone)]
pub(crate) struct Panels {
    /// Panel `p`, depth pair `k`, half `h` (columns `16h..16h + 16` of the panel) is line
    /// `(p * pairs + k) * 2 + h`.
    lines: Arc<[Line]>,
    width: usize,
    pairs: usize,
}

impl std::fmt::Debug for Panels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Panels [{} x {}]", self.width, self.row_len())
    }
}

/// Whether [`Panels::multiply`] runs the AVX512-BF16 kernel on this CPU (else its portable
/// twin).
pub(crate) fn kernel_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl Panels {
    /// Packs `b` (`width * depth` values, row-major f32), rounding each value to bf16. An odd
    /// depth is padded with one zero.
    ///
    /// Panics only on a programming error inside this crate (a length that does not match).
    pub(crate) fn pack(b: &[f32], width: usize, depth: usize) -> Self {
        assert_eq!(b.len(), width * depth, "internal bf16 panel shape");
        let pairs = depth.div_ceil(2);
        let panels = width.div_ceil(PANEL);
        let bits = |j: usize, d: usize| -> u32 {
            if j < width && d < depth {
                u32::from(super::bf16::bf16_bits(b[j * depth + d]))
            } else {
                0
            }
        };
        let mut lines = vec![Line([0; 16]); panels * pairs * 2];
        for (at, line) in lines.iter_mut().enumerate() {
            let (half, k, panel) = (at % 2, at / 2 % pairs.max(1), at / 2 / pairs.max(1));
            for (lane, word) in line.0.iter_mut().enumerate() {
                let j = panel * PANEL + half * 16 + lane;
                // The lower half of the word is the even element (little-endian pairs).
                *word = bits(j, 2 * k) | bits(j, 2 * k + 1) << 16;
            }
        }
        Panels {
            lines: lines.into(),
            width,
            pairs,
        }
    }

    /// Columns of the product (rows of `B`).
    pub(crate) fn width(&self) -> usize {
        self.width
    }

    /// Row length of the sums [`Panels::multiply`] writes: the width rounded up to whole
    /// panels (the padding columns' sums are 0).
    pub(crate) fn padded_width(&self) -> usize {
        self.width.next_multiple_of(PANEL)
    }

    /// Row length of `A`: the depth rounded up to even (the padding value must be 0).
    pub(crate) fn row_len(&self) -> usize {
        self.pairs * 2
    }

    /// A layer's output rows: `out [rows, width]` (row-major) = `act(A · Bᵀ + bias)` rounded
    /// to bf16 ([`finish`]), `A`'s rows where `rows` says, on the calling thread. Each
    /// micro-tile's sums are finished while they are still in the L1 cache (no `[rows, width]`
    /// f32 buffer goes through memory).
    ///
    /// Panics only on a programming error inside this crate (rows that do not fit their
    /// buffer, a bias or output that does not match the width).
    pub(crate) fn multiply_finish(
        &self,
        rows: &Rows<'_>,
        bias: &[f32],
        relu: bool,
        out: &mut [numkong::bf16],
    ) {
        assert!(
            bias.len() == self.width && out.len() == rows.starts.len() * self.width,
            "internal bf16 panel output: {} rows of {} into {} (bias {})",
            rows.starts.len(),
            self.width,
            out.len(),
            bias.len()
        );
        let mut tile = [0.0f32; TILE_ROWS * PANEL];
        self.each_tile(rows, &mut tile, false, |first, panel, sums| {
            let from = panel * PANEL;
            let bias = &bias[from..from + PANEL.min(self.width - from)];
            let count = sums.len() / PANEL;
            let out = &mut out[first * self.width..(first + count) * self.width];
            finish_tile(sums, bias, relu, self.width, from, out);
        });
    }

    /// The raw sums `c [rows, padded_width] = A · Bᵀ`, by the same micro-tiles as
    /// [`Panels::multiply_finish`] (on the portable twin if asked): what the tests check
    /// against naive sums.
    #[cfg(test)]
    pub(crate) fn multiply(&self, rows: &Rows<'_>, c: &mut [f32], portable: bool) {
        let padded = self.padded_width();
        assert_eq!(c.len(), rows.starts.len() * padded, "test product shape");
        let mut tile = [0.0f32; TILE_ROWS * PANEL];
        self.each_tile(rows, &mut tile, portable, |first, panel, sums| {
            for (r, sums) in sums.chunks_exact(PANEL).enumerate() {
                let at = (first + r) * padded + panel * PANEL;
                c[at..at + PANEL].copy_from_slice(sums);
            }
        });
    }

    /// Every micro-tile's sums, panel by panel (so that a panel's weights stay in the L2 cache
    /// while the rows go by): `done(first row, panel, sums)` with the tile's rows of [`PANEL`]
    /// sums in `tile`; by the AVX512-BF16 kernel where the CPU has it (unless `portable`),
    /// else by the twin.
    ///
    /// Panics only on a programming error inside this crate (rows that do not fit their
    /// buffer).
    fn each_tile(
        &self,
        rows: &Rows<'_>,
        tile: &mut [f32; TILE_ROWS * PANEL],
        portable: bool,
        mut done: impl FnMut(usize, usize, &[f32]),
    ) {
        let run = rows.checked_run(self.row_len());
        // Tiles of near-equal size: a last tile of one or two rows would run its few
        // accumulators at the instruction's latency, not its throughput (169 rows: 4 tiles
        // of 12 and 11 of 11, not 14 of 12 and one of 1).
        let total = rows.starts.len();
        let tiles = total.div_ceil(TILE_ROWS);
        let tile_len = |i: usize| total / tiles.max(1) + usize::from(i < total % tiles.max(1));
        for panel in 0..self.padded_width() / PANEL {
            let mut first = 0;
            for i in 0..tiles {
                let count = tile_len(i);
                let tile_rows = Rows {
                    starts: &rows.starts[first..first + count],
                    ..*rows
                };
                let sums = &mut tile[..count * PANEL];
                #[cfg(target_arch = "x86_64")]
                if kernel_available() && !portable {
                    // SAFETY: the CPU has AVX-512F and AVX512-BF16 (checked just above); every
                    // row lies inside its buffer in runs of `run` (`checked_run`), the tile has
                    // `count <= TILE_ROWS` rows and `sums` holds `count * PANEL` values.
                    unsafe { self.panel_tile_avx512(&tile_rows, run, panel, sums) };
                } else {
                    self.panel_tile_portable(&tile_rows, panel, sums);
                }
                #[cfg(not(target_arch = "x86_64"))]
                {
                    let _ = portable;
                    self.panel_tile_portable(&tile_rows, panel, sums);
                }
                done(first, panel, sums);
                first += count;
            }
        }
    }

    /// One panel of a micro-tile's sums (`count` rows of [`PANEL`], row-major) by the kernel.
    ///
    /// # Safety
    /// AVX-512F and AVX512-BF16; `rows` at most [`TILE_ROWS`], inside their buffer, in runs of
    /// `run`; `sums.len() == rows.starts.len() * PANEL`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn panel_tile_avx512(
        &self,
        rows: &Rows<'_>,
        run: usize,
        panel: usize,
        sums: &mut [f32],
    ) {
        let shape = Runs {
            segments: rows.segments,
            stride: rows.segment_stride,
            pairs: run / 2,
        };
        let b = &self.lines[panel * self.pairs * 2..(panel + 1) * self.pairs * 2];
        // SAFETY (each arm): the caller's promises; `b` holds the panel's two lines per depth
        // pair, and `sums` `(r - 1) * PANEL + PANEL` values.
        macro_rules! tile {
            ($($r:literal)*) => {
                match rows.starts.len() {
                    $($r => micro_tile::<$r>(rows.data, rows.starts, &shape, b, sums, PANEL),)*
                    _ => unreachable!("tile rows are 1..=TILE_ROWS"),
                }
            };
        }
        unsafe { tile!(1 2 3 4 5 6 7 8 9 10 11 12) };
    }

    /// The portable twin of [`Panels::panel_tile_avx512`]: the same sums, one pair of products
    /// at a time.
    fn panel_tile_portable(&self, rows: &Rows<'_>, panel: usize, sums: &mut [f32]) {
        let value = |bits: u32| f32::from_bits(bits << 16);
        let run = rows.checked_run(self.row_len());
        for (&start, sums) in rows.starts.iter().zip(sums.chunks_exact_mut(PANEL)) {
            sums.fill(0.0);
            for k in 0..self.pairs {
                let (segment, offset) = (2 * k / run, 2 * k % run);
                let at = start + segment * rows.segment_stride + offset;
                let (a0, a1) = (rows.data[at].0, rows.data[at + 1].0);
                let (a0, a1) = (value(u32::from(a0)), value(u32::from(a1)));
                let line = (panel * self.pairs + k) * 2;
                let words = self.lines[line].0.iter().chain(&self.lines[line + 1].0);
                for (sum, &word) in sums.iter_mut().zip(words) {
                    *sum += a0 * value(word & 0xFFFF) + a1 * value(word >> 16);
                }
            }
        }
    }
}

/// A layer's output value: `act(sum + bias)` rounded to bf16.
#[inline]
pub(crate) fn finish(sum: f32, bias: f32, relu: bool) -> numkong::bf16 {
    let v = sum + bias;
    let v = if relu { super::bias_act::relu(v) } else { v };
    numkong::bf16(super::bf16::bf16_bits(v))
}

/// A micro-tile's sums (rows of [`PANEL`]) finished into columns `from..from + bias.len()`
/// of the output rows (`width` long); AVX-512 or AVX2 where the CPU has them.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma"))]
fn finish_tile(
    sums: &[f32],
    bias: &[f32],
    relu: bool,
    width: usize,
    from: usize,
    out: &mut [numkong::bf16],
) {
    for (sums, out) in sums.chunks_exact(PANEL).zip(out.chunks_exact_mut(width)) {
        let out = &mut out[from..from + bias.len()];
        for ((o, &sum), &b) in out.iter_mut().zip(sums).zip(bias) {
            *o = finish(sum, b, relu);
        }
    }
}

/// Where the rows of `A` lie in a buffer: row `r` is `segments` runs of contiguous values (of
/// equal, even length), run `s` starting at `data[starts[r] + s * segment_stride]`. Rows
/// unfolded one after another are one run each; a convolution's windows read in place from a
/// (zero-bordered) HWC image are one run per kernel row.
#[derive(Clone, Copy)]
pub(crate) struct Rows<'a> {
    pub(crate) data: &'a [numkong::bf16],
    pub(crate) starts: &'a [usize],
    pub(crate) segments: usize,
    pub(crate) segment_stride: usize,
}

impl Rows<'_> {
    /// The length of one run, for rows of `row_len` values, after checking that the runs split
    /// each row evenly into pairs and that every row lies inside `data`.
    ///
    /// Panics only on a programming error inside this crate.
    fn checked_run(&self, row_len: usize) -> usize {
        let segments = self.segments.max(1);
        let run = row_len / segments;
        assert!(
            self.segments >= 1 && run * segments == row_len && run.is_multiple_of(2),
            "internal bf16 panel rows: {row_len} values in {} runs",
            self.segments
        );
        let last = self.starts.iter().max().copied().unwrap_or(0);
        assert!(
            self.starts.is_empty()
                || last + (self.segments - 1) * self.segment_stride + run <= self.data.len(),
            "internal bf16 panel rows outside their buffer"
        );
        run
    }
}

/// The runs of a micro-tile's rows: `segments` runs of `pairs` depth pairs, `stride` apart.
#[cfg(target_arch = "x86_64")]
struct Runs {
    segments: usize,
    stride: usize,
    pairs: usize,
}

/// `ROWS` rows of `A` (starting at `data[starts[r]]`, laid out as `runs` says) times one panel
/// `b`, into `c` (row length `ldc`): `2 * ROWS` accumulators, each depth pair one broadcast
/// per row and two lines of `b`.
///
/// # Safety
/// AVX-512F and AVX512-BF16; `starts.len() == ROWS` and every row's runs inside `data`;
/// `b.len() >= 2 * segments * pairs`; `c.len() >= (ROWS - 1) * ldc + PANEL`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn micro_tile<const ROWS: usize>(
    data: &[numkong::bf16],
    starts: &[usize],
    runs: &Runs,
    b: &[Line],
    c: &mut [f32],
    ldc: usize,
) {
    use std::arch::x86_64::*;
    debug_assert!(starts.len() == ROWS && b.len() >= 2 * runs.segments * runs.pairs);
    debug_assert!(c.len() >= (ROWS - 1) * ldc + PANEL);
    let mut low = [_mm512_setzero_ps(); ROWS];
    let mut high = [_mm512_setzero_ps(); ROWS];
    let mut row = [data.as_ptr(); ROWS];
    for (row, &start) in row.iter_mut().zip(starts) {
        // SAFETY: a row's first value is inside `data` (the caller's promise).
        *row = unsafe { row.add(start) };
    }
    let mut line = b.as_ptr();
    for segment in 0..runs.segments {
        let offset = segment * runs.stride;
        for k in 0..runs.pairs {
            // SAFETY: the next two lines exist (`b` holds two per depth pair), each 64 bytes
            // and 64-aligned; `__m512bh` reads the 512 bits as 32 bf16 values.
            let (b_low, b_high) = unsafe {
                (
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_load_si512(line.cast())),
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_load_si512(line.add(1).cast())),
                )
            };
            // SAFETY: still inside `b` (or one past its end after the last pair).
            line = unsafe { line.add(2) };
            for r in 0..ROWS {
                // SAFETY: run `segment` of row `r` holds `2 * pairs` values from `offset`,
                // inside `data` (the caller's promise). Two bf16 values read as one
                // (unaligned) 32-bit word, broadcast as 32 bf16 values.
                let pair = unsafe {
                    let word = row[r].add(offset + 2 * k).cast::<i32>().read_unaligned();
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(word))
                };
                low[r] = _mm512_dpbf16_ps(low[r], pair, b_low);
                high[r] = _mm512_dpbf16_ps(high[r], pair, b_high);
            }
        }
    }
    let c = c.as_mut_ptr();
    for r in 0..ROWS {
        // SAFETY: row `r` of `c` has `PANEL` values from `r * ldc` (the length promise).
        unsafe {
            _mm512_storeu_ps(c.add(r * ldc), low[r]);
            _mm512_storeu_ps(c.add(r * ldc + 16), high[r]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both the kernel (where the CPU has it) and the portable twin against f64 sums of the
    /// rounded values, at shapes with partial panels, partial tiles and odd depths.
    #[test]
    fn panel_products_match_a_naive_product_of_the_rounded_values() {
        if !kernel_available() {
            println!("note: no AVX512-BF16 here; only the portable twin is checked");
        }
        // (rows, width, depth)
        let shapes = [
            (1, 1, 1),
            (5, 7, 13),
            (13, 33, 300),
            (25, 64, 363),
            (12, 70, 129),
        ];
        for (rows, width, depth) in shapes {
            let (a, b) = super::super::bf16::test_operands(rows, width, depth);
            let round = |v: f32| half::bf16::from_f32(v).to_f32() as f64;
            let panels = Panels::pack(&b, width, depth);
            let len = panels.row_len();
            let mut a16 = vec![numkong::bf16::ZERO; rows * len];
            for (row, src) in a16.chunks_exact_mut(len).zip(a.chunks_exact(depth)) {
                super::super::bf16::to_bf16(src, &mut row[..depth]);
            }
            let padded = panels.padded_width();
            let starts: Vec<usize> = (0..rows).map(|r| r * len).collect();
            let unfolded = Rows {
                data: &a16,
                starts: &starts,
                segments: 1,
                segment_stride: 0,
            };
            let mut kernel = vec![f32::NAN; rows * padded];
            let mut portable = vec![f32::NAN; rows * padded];
            panels.multiply(&unfolded, &mut kernel, false);
            panels.multiply(&unfolded, &mut portable, true);
            for (name, c) in [("kernel", &kernel), ("portable", &portable)] {
                for r in 0..rows {
                    for col in 0..padded {
                        let want: f64 = if col < width {
                            (0..depth)
                                .map(|k| round(a[r * depth + k]) * round(b[col * depth + k]))
                                .sum()
                        } else {
                            0.0
                        };
                        let got = c[r * padded + col] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{name} [{rows}x{depth}]·[{width}x{depth}]ᵀ at ({r}, {col}): \
                             {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// Rows read as windows of a buffer (several runs per row, rows overlapping, as a
    /// convolution reads a padded image in place), kernel and twin against naive sums.
    #[test]
    fn windowed_rows_match_a_naive_product() {
        let value = |i: usize| half::bf16::from_f32(((i * 7919 % 263) as f32 - 131.0) / 19.0);
        let data: Vec<numkong::bf16> = (0..2000)
            .map(|i| numkong::bf16(value(i).to_bits()))
            .collect();
        // (rows, width, segments, run, segment stride)
        for (rows, width, segments, run, stride) in [(14, 40, 3, 10, 57), (25, 33, 5, 8, 6)] {
            let depth = segments * run;
            let b: Vec<f32> = (0..width * depth)
                .map(|i| ((i * 53 % 89) as f32 - 44.0) / 23.0)
                .collect();
            let starts: Vec<usize> = (0..rows).map(|r| r * 7 + r % 3).collect();
            let rows_in = Rows {
                data: &data,
                starts: &starts,
                segments,
                segment_stride: stride,
            };
            let panels = Panels::pack(&b, width, depth);
            let padded = panels.padded_width();
            let mut kernel = vec![f32::NAN; rows * padded];
            let mut portable = vec![f32::NAN; rows * padded];
            panels.multiply(&rows_in, &mut kernel, false);
            panels.multiply(&rows_in, &mut portable, true);
            for (name, c) in [("kernel", &kernel), ("portable", &portable)] {
                for r in 0..rows {
                    for col in 0..width {
                        let want: f64 = (0..depth)
                            .map(|d| {
                                let at = starts[r] + d / run * stride + d % run;
                                let bv = half::bf16::from_f32(b[col * depth + d]).to_f64();
                                value(at).to_f64() * bv
                            })
                            .sum();
                        let got = c[r * padded + col] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{name} windows {segments}x{run} at ({r}, {col}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
