//! bf16 products on AVX512-BF16 (`vdpbf16ps`) by a micro-kernel of our own, with its portable
//! twin. numkong's kernels (see [`super::bf16`]) reached 260-400 GFLOP/s on one Zen 5 core at the
//! convolutions' shapes (the 363-deep conv1 was the slowest); this kernel, measured the same way,
//! 510-535. numkong keeps the linear layers (bound by memory, not arithmetic) and AMX CPUs.
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

    /// `c [rows, padded_width] (row-major) = a [rows, row_len] (row-major) · Bᵀ`, on the calling
    /// thread; on AVX512-BF16 where the CPU has it, else by the portable twin.
    ///
    /// Panics only on a programming error inside this crate (mismatched lengths).
    pub(crate) fn multiply(&self, a: &[numkong::bf16], rows: usize, c: &mut [f32]) {
        assert!(
            a.len() == rows * self.row_len() && c.len() == rows * self.padded_width(),
            "internal bf16 panel product: [{rows} x {}] · [{} x {}]ᵀ into {}",
            self.row_len(),
            self.width,
            self.row_len(),
            c.len()
        );
        #[cfg(target_arch = "x86_64")]
        if kernel_available() {
            // SAFETY: the CPU has AVX-512F and AVX512-BF16 (checked just above), and the
            // assert gives the lengths `multiply_avx512` relies on.
            unsafe { self.multiply_avx512(a, rows, c) };
            return;
        }
        self.multiply_portable(a, rows, c);
    }

    /// The portable twin: the same sums, one pair of products at a time.
    pub(crate) fn multiply_portable(&self, a: &[numkong::bf16], rows: usize, c: &mut [f32]) {
        let value = |bits: u32| f32::from_bits(bits << 16);
        let (len, padded) = (self.row_len(), self.padded_width());
        for (row, sums) in a
            .chunks_exact(len)
            .zip(c.chunks_exact_mut(padded))
            .take(rows)
        {
            for (panel, sums) in sums.chunks_exact_mut(PANEL).enumerate() {
                sums.fill(0.0);
                for (k, pair) in row.chunks_exact(2).enumerate() {
                    let (a0, a1) = (value(u32::from(pair[0].0)), value(u32::from(pair[1].0)));
                    let at = (panel * self.pairs + k) * 2;
                    let words = self.lines[at].0.iter().chain(&self.lines[at + 1].0);
                    for (sum, &word) in sums.iter_mut().zip(words) {
                        *sum += a0 * value(word & 0xFFFF) + a1 * value(word >> 16);
                    }
                }
            }
        }
    }

    /// # Safety
    /// The CPU must have AVX-512F and AVX512-BF16; `a` must hold `rows * row_len()` values and
    /// `c` `rows * padded_width()` (as [`Panels::multiply`] asserts).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn multiply_avx512(&self, a: &[numkong::bf16], rows: usize, c: &mut [f32]) {
        let (len, padded) = (self.row_len(), self.padded_width());
        for panel in 0..padded / PANEL {
            let b = &self.lines[panel * self.pairs * 2..(panel + 1) * self.pairs * 2];
            let mut first = 0;
            while first < rows {
                let tile_rows = TILE_ROWS.min(rows - first);
                let a = &a[first * len..(first + tile_rows) * len];
                let c = &mut c[first * padded + panel * PANEL..];
                // SAFETY (each arm): `a` holds `tile_rows` rows of `len = 2 * pairs` values,
                // `b` the panel's `2 * pairs` lines, and `c` at least `(tile_rows - 1) *
                // padded + PANEL` values (the product's rows below `first`, from this panel's
                // first column); the CPU features are the caller's promise.
                macro_rules! tile {
                    ($($r:literal)*) => {
                        match tile_rows {
                            $($r => micro_tile::<$r>(a, len, b, c, padded),)*
                            _ => unreachable!("tile rows are 1..=TILE_ROWS"),
                        }
                    };
                }
                unsafe { tile!(1 2 3 4 5 6 7 8 9 10 11 12) };
                first += tile_rows;
            }
        }
    }
}

/// `ROWS` rows of `a` (row length `len`) times one panel `b`, into `c` (row length `ldc`):
/// `2 * ROWS` accumulators, each depth pair one broadcast of `a` and two lines of `b`.
///
/// # Safety
/// AVX-512F and AVX512-BF16; `a.len() >= ROWS * len`, `b.len() >= len` (lines: two per pair),
/// `c.len() >= (ROWS - 1) * ldc + PANEL`, `len` even.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn micro_tile<const ROWS: usize>(
    a: &[numkong::bf16],
    len: usize,
    b: &[Line],
    c: &mut [f32],
    ldc: usize,
) {
    use std::arch::x86_64::*;
    debug_assert!(a.len() >= ROWS * len && b.len() >= len && c.len() >= (ROWS - 1) * ldc + PANEL);
    let mut low = [_mm512_setzero_ps(); ROWS];
    let mut high = [_mm512_setzero_ps(); ROWS];
    let a = a.as_ptr();
    for k in 0..len / 2 {
        // SAFETY: lines `2k` and `2k + 1` exist (`b.len() >= len`), each 64 bytes, 64-aligned.
        let (b_low, b_high) = unsafe {
            (
                _mm512_load_si512(b.as_ptr().add(2 * k).cast()),
                _mm512_load_si512(b.as_ptr().add(2 * k + 1).cast()),
            )
        };
        // SAFETY: both are 512 bits of plain data; `__m512bh` reads them as 32 bf16 values.
        let (b_low, b_high) = unsafe {
            (
                std::mem::transmute::<__m512i, __m512bh>(b_low),
                std::mem::transmute::<__m512i, __m512bh>(b_high),
            )
        };
        for r in 0..ROWS {
            // SAFETY: row `r < ROWS` has `len` values; `2k + 1 < len`. Two bf16 values read
            // as one (unaligned) 32-bit word.
            let pair = unsafe { a.add(r * len + 2 * k).cast::<i32>().read_unaligned() };
            // SAFETY: 512 bits of plain data, read as 32 bf16 values.
            let pair = unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(pair)) };
            low[r] = _mm512_dpbf16_ps(low[r], pair, b_low);
            high[r] = _mm512_dpbf16_ps(high[r], pair, b_high);
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
            let a: Vec<f32> = (0..rows * depth)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
                .collect();
            let b: Vec<f32> = (0..width * depth)
                .map(|i| ((i * 53 % 89) as f32 - 44.0) / 23.0)
                .collect();
            let round = |v: f32| half::bf16::from_f32(v).to_f32() as f64;
            let panels = Panels::pack(&b, width, depth);
            let len = panels.row_len();
            let mut a16 = vec![numkong::bf16::ZERO; rows * len];
            for (row, src) in a16.chunks_exact_mut(len).zip(a.chunks_exact(depth)) {
                super::super::bf16::to_bf16(src, &mut row[..depth]);
            }
            let padded = panels.padded_width();
            let mut kernel = vec![f32::NAN; rows * padded];
            let mut portable = vec![f32::NAN; rows * padded];
            panels.multiply(&a16, rows, &mut kernel);
            panels.multiply_portable(&a16, rows, &mut portable);
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
}
