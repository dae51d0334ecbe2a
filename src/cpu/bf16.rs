//! bf16 on the CPU's bf16 hardware: what it has ([`bf16_hardware`]) and the one place the CPU
//! backend calls `numkong`, whose kernels numkong picks at run time (AMX-BF16 tiles on Sapphire
//! Rapids and later, AVX512-BF16 `vdpbf16ps` on Zen 4 and Cooper Lake; AVX2 or plain loops
//! elsewhere). numkong runs the products on AMX CPUs and where there is no bf16 hardware;
//! where there is AVX512-BF16 without AMX our own kernel ([`super::bf16_panels`], faster there)
//! runs them. Products of two bf16 values are exact in f32 and every kernel accumulates in f32,
//! so the result is what the emulated path (bf16-rounded operands through the f32 GEMM)
//! computes, up to the order of the additions.

use std::sync::{Arc, OnceLock};

use multiversion::multiversion;
use numkong::Dots;

/// How [`crate::cpu::CpuModel`] computes its products in `Precision::Bf16`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Bf16Kernels {
    /// The bf16 kernels where the CPU has bf16 dot-product hardware (see [`bf16_hardware`]):
    /// numkong's AMX tiles, or our AVX512-BF16 kernel; the emulated path elsewhere.
    #[default]
    Auto,
    /// The bf16 kernels whatever the CPU: without bf16 hardware they are numkong's AVX2 or
    /// scalar loops, correct but often slower than [`Bf16Kernels::Emulated`].
    Native,
    /// bf16-rounded operands multiplied by the f32 GEMM: the portable twin the native kernels
    /// are checked against.
    Emulated,
}

/// What numkong's run-time dispatch finds on this CPU, asked once per process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Detected {
    /// bf16 dot-product hardware, by name.
    Hardware(&'static str),
    /// None: numkong runs AVX2 or scalar loops.
    Portable,
    /// AMX is present but Linux refused the process its tile state: numkong's dispatch would
    /// still pick the AMX kernels, which would then fault, so numkong must not run at all.
    AmxRefused,
}

fn detected() -> Detected {
    static DETECTED: OnceLock<Detected> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        let capabilities = numkong::available();
        let has = |bit: u64| capabilities & bit != 0;
        if has(numkong::cap::SAPPHIREAMX) {
            // On Linux, AMX needs the kernel's permission for its tile state (per process).
            if numkong::configure_thread() {
                Detected::Hardware("AMX-BF16")
            } else {
                Detected::AmxRefused
            }
        } else if has(numkong::cap::GENOA) {
            Detected::Hardware("AVX512-BF16")
        } else {
            Detected::Portable
        }
    })
}

/// The bf16 dot-product hardware numkong uses on this CPU ("AMX-BF16" or "AVX512-BF16"), or
/// `None` where there is none (or where Linux refuses AMX's tile state).
pub fn bf16_hardware() -> Option<&'static str> {
    match detected() {
        Detected::Hardware(name) => Some(name),
        Detected::Portable | Detected::AmxRefused => None,
    }
}

/// Whether numkong's kernels may run here at all (see [`Detected::AmxRefused`]).
pub(crate) fn native_kernels_usable() -> bool {
    detected() != Detected::AmxRefused
}

/// For tests that call numkong directly: whether they can run here, said on stdout when not.
#[cfg(test)]
pub(crate) fn usable_or_skip(test: &str) -> bool {
    let usable = native_kernels_usable();
    if !usable {
        println!("SKIPPED {test}: AMX present but its tile state refused, numkong cannot run");
    }
    usable
}

/// Deterministic operands `a [rows, depth]` and `b [width, depth]` for the product tests
/// (values of both signs, not bf16 yet).
#[cfg(test)]
pub(crate) fn test_operands(rows: usize, width: usize, depth: usize) -> (Vec<f32>, Vec<f32>) {
    let a = (0..rows * depth)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
        .collect();
    let b = (0..width * depth)
        .map(|i| ((i * 53 % 89) as f32 - 44.0) / 23.0)
        .collect();
    (a, b)
}

/// `x` rounded to bf16, to nearest even (as `half::bf16::from_f32`), as raw bits. Branch-free
/// apart from NaN, so the slice loops below vectorise.
#[inline]
pub(crate) fn bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        // A quiet NaN with the sign kept.
        return ((bits >> 16) | 0x0040) as u16;
    }
    let round = 0x7FFF + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

/// `src` rounded to bf16 into `dst` (same length); vectorised for AVX-512 or AVX2 where the CPU
/// has them.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma"))]
pub(crate) fn to_bf16(src: &[f32], dst: &mut [numkong::bf16]) {
    assert_eq!(src.len(), dst.len(), "internal bf16 conversion length");
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = numkong::bf16(bf16_bits(s));
    }
}

/// One cache line: the packed buffer's unit, so that it is 64-byte aligned (numkong's own
/// allocations are; the kernels' aligned loads may rely on it).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// Longest depth one numkong call gets: beyond it the kernel slows down as the rows of `A` it
/// walks outgrow the L2 cache. Measured on Zen 5, one thread, 169 x 128 x 3456 (the conv4 and
/// conv5 shapes): 270 GFLOP/s in one call, 378 as two calls of depth 1728 whose sums are
/// added; depths up to 2400 ran at ~395 in one call and slower when split.
const MAX_DEPTH: usize = 2560;

/// Depths of the parts are multiples of this, so each part's rows start 128-byte aligned
/// relative to the row.
const DEPTH_STEP: usize = 64;

/// One depth range of a packed matrix.
#[derive(Clone)]
struct Part {
    first: usize,
    depth: usize,
    lines: Arc<[Line]>,
}

/// A matrix `B [width, depth]` (row-major f32, one row per output column of the product),
/// rounded to bf16 and packed once into numkong's layout for `C = A Bᵀ`, in depth parts of at
/// most [`MAX_DEPTH`]. Cheap to clone.
#[derive(Clone)]
pub(crate) struct PackedBf16 {
    parts: Vec<Part>,
    width: usize,
    depth: usize,
}

impl std::fmt::Debug for PackedBf16 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PackedBf16 [{} x {}] in {} depth parts",
            self.width,
            self.depth,
            self.parts.len()
        )
    }
}

impl PackedBf16 {
    /// Packs `b` (`width * depth` values, row-major).
    ///
    /// Panics only on a programming error inside this crate: a length that does not match, or
    /// packing where numkong's kernels cannot run (callers check [`native_kernels_usable`]).
    pub(crate) fn pack(b: &[f32], width: usize, depth: usize) -> Self {
        assert_eq!(b.len(), width * depth, "internal bf16 pack shape");
        // numkong's dispatch points at the AMX kernels wherever the CPU has AMX, from process
        // start; asking here (once per process) makes sure Linux has granted the tile state
        // before any product can run, whoever packs first. Every product needs a packed matrix.
        assert!(
            native_kernels_usable(),
            "internal: numkong packing on an AMX CPU whose kernel refused the tile state"
        );
        let mut rounded = vec![numkong::bf16::ZERO; b.len()];
        to_bf16(b, &mut rounded);
        let parts = depth.div_ceil(MAX_DEPTH).max(1);
        let step = depth.div_ceil(parts).next_multiple_of(DEPTH_STEP).max(1);
        let parts = (0..depth.max(1))
            .step_by(step)
            .map(|first| {
                let part_depth = step.min(depth - first);
                let bytes = <numkong::bf16 as Dots>::dots_packed_size(width, part_depth);
                let mut lines = vec![Line([0; 64]); bytes.div_ceil(64)];
                if width * part_depth > 0 {
                    // SAFETY: `rounded[first..]` holds `width` rows `depth * 2` bytes apart
                    // (the stride is in bytes), each with at least `first + part_depth` values;
                    // `lines` holds at least `dots_packed_size(width, part_depth)` bytes, as
                    // the function requires, and nothing else refers to it.
                    unsafe {
                        <numkong::bf16 as Dots>::dots_pack(
                            rounded[first..].as_ptr(),
                            width,
                            part_depth,
                            depth * std::mem::size_of::<numkong::bf16>(),
                            lines.as_mut_ptr().cast::<u8>(),
                        );
                    }
                }
                Part {
                    first,
                    depth: part_depth,
                    lines: lines.into(),
                }
            })
            .collect();
        PackedBf16 {
            parts,
            width,
            depth,
        }
    }

    /// Columns of the product (rows of `B`).
    pub(crate) fn width(&self) -> usize {
        self.width
    }

    /// `c [rows, width] (row-major) = a [rows, depth] (row-major) · Bᵀ`, on the calling thread:
    /// one numkong call per depth part, the later parts' sums added to the first's.
    ///
    /// Panics only on a programming error inside this crate (mismatched lengths).
    pub(crate) fn multiply(&self, a: &[numkong::bf16], rows: usize, c: &mut [f32]) {
        assert!(
            a.len() == rows * self.depth && c.len() == rows * self.width,
            "internal bf16 product shape: [{rows} x {}] · [{} x {}]ᵀ into {}",
            self.depth,
            self.width,
            self.depth,
            c.len()
        );
        if rows == 0 || self.width == 0 {
            return;
        }
        if self.depth == 0 {
            c.fill(0.0);
            return;
        }
        let mut partial = Vec::new();
        for (i, part) in self.parts.iter().enumerate() {
            let into: &mut [f32] = if i == 0 {
                c
            } else {
                partial.resize(c.len(), 0.0);
                &mut partial
            };
            // SAFETY: the assert above gives `a` exactly `rows` rows of `depth` values, so
            // from `a[part.first]` on there are `rows` rows `depth * 2` bytes apart (strides
            // are in bytes) each with `part.depth` values left; `into` holds exactly `rows`
            // rows of `width` f32 values; `part.lines` was filled by `dots_pack` for this
            // `width` and `part.depth`; `into` is borrowed mutably, so it aliases neither
            // input. numkong only reads `a` and the packed buffer.
            unsafe {
                <numkong::bf16 as Dots>::dots_packed(
                    a[part.first..].as_ptr(),
                    part.lines.as_ptr().cast::<u8>(),
                    into.as_mut_ptr(),
                    rows,
                    self.width,
                    part.depth,
                    self.depth * std::mem::size_of::<numkong::bf16>(),
                    self.width * std::mem::size_of::<f32>(),
                );
            }
            if i > 0 {
                c.iter_mut().zip(&partial).for_each(|(sum, &p)| *sum += p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The branch-free rounding against `half`'s, on the special values and on a sweep of bit
    /// patterns (every exponent, many mantissas, both signs).
    #[test]
    fn bf16_bits_round_as_half_does() {
        let specials = [
            0.0f32,
            -0.0,
            1.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,                       // subnormal
            f32::from_bits(0x3F80_8000), // exactly halfway, even below: rounds down
            f32::from_bits(0x3F81_8000), // exactly halfway, odd below: rounds up
            f32::from_bits(0x7F7F_FFFF), // rounds up to infinity
        ];
        let sweep = (0..u32::MAX / 9973).map(|i| f32::from_bits(i.wrapping_mul(9973)));
        for x in specials.into_iter().chain(sweep) {
            assert_eq!(
                bf16_bits(x),
                half::bf16::from_f32(x).to_bits(),
                "{x:e} ({:#010x})",
                x.to_bits()
            );
        }
        assert!(half::bf16::from_bits(bf16_bits(f32::NAN)).is_nan());
        assert!(half::bf16::from_bits(bf16_bits(-f32::NAN)).is_nan());
    }

    /// A product through the packed kernels against f64 sums of the same bf16-rounded values,
    /// at shapes that are not multiples of any tile (and one row, one column).
    #[test]
    fn packed_products_match_a_naive_product_of_the_rounded_values() {
        if !usable_or_skip("packed_products_match_a_naive_product_of_the_rounded_values") {
            return;
        }
        // The last two are split into depth parts.
        let shapes = [
            (5, 7, 13),
            (1, 33, 300),
            (37, 1, 65),
            (19, 70, 129),
            (6, 9, 2561),
            (3, 17, 6000),
        ];
        for (rows, width, depth) in shapes {
            let (a, b) = test_operands(rows, width, depth);
            let round = |v: &f32| half::bf16::from_f32(*v).to_f32() as f64;
            let mut a16 = vec![numkong::bf16::ZERO; a.len()];
            to_bf16(&a, &mut a16);
            let mut c = vec![f32::NAN; rows * width];
            PackedBf16::pack(&b, width, depth).multiply(&a16, rows, &mut c);
            for r in 0..rows {
                for col in 0..width {
                    let want: f64 = (0..depth)
                        .map(|k| round(&a[r * depth + k]) * round(&b[col * depth + k]))
                        .sum();
                    let got = c[r * width + col] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "[{rows}x{depth}]·[{width}x{depth}]ᵀ at ({r}, {col}): {got} vs {want}"
                    );
                }
            }
        }
    }
}
