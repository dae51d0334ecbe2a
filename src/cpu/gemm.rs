//! The one place the CPU backend calls into the `gemm` crate (AVX-512/AVX2/NEON kernels chosen at
//! run time), with safe, shape-checked wrappers.

use gemm::Parallelism;

/// Whether a product should use every core (one big product) or one (the caller already runs
/// products on several threads).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Threads {
    All,
    One,
}

impl Threads {
    fn parallelism(self) -> Parallelism {
        match self {
            Threads::All => Parallelism::Rayon(rayon::current_num_threads()),
            Threads::One => Parallelism::None,
        }
    }
}

/// A read-only row-major-or-strided matrix view over a slice.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major `rows x cols` matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major `cols x rows` matrix, without copying.
    pub fn transposed(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            row_stride: 1,
            col_stride: rows,
        }
    }

    /// Index one past the last element the view can touch (0 for an empty matrix).
    fn extent(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride + 1
        }
    }
}

/// `dst[m x n] (row-major) = dst + a[m x k] * b[k x n]`: accumulates into `dst`, which callers
/// pre-fill with the bias.
///
/// Panics only on a programming error inside this crate (mismatched internal shapes); every
/// user-facing shape is checked before the layers call this.
pub(crate) fn gemm_accumulate(dst: &mut [f32], a: MatRef<'_>, b: MatRef<'_>, threads: Threads) {
    gemm_into(dst, a, b, threads, true);
}

/// `dst[m x n] (row-major) = a[m x k] * b[k x n]`, never reading `dst`. For fresh buffers: a
/// zeroed allocation is mapped to the kernel's shared zero page until written, and reading it
/// first makes every page fault twice, the second time with a TLB shootdown across cores (a
/// third of a training step went there before the gradients were written this way).
pub(crate) fn gemm_overwrite(dst: &mut [f32], a: MatRef<'_>, b: MatRef<'_>, threads: Threads) {
    gemm_into(dst, a, b, threads, false);
}

fn gemm_into(dst: &mut [f32], a: MatRef<'_>, b: MatRef<'_>, threads: Threads, read_dst: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(
        b.rows == k
            && dst.len() == m * n
            && a.extent() <= a.data.len()
            && b.extent() <= b.data.len(),
        "internal gemm shape mismatch: {m}x{k} * {}x{n} into {}",
        b.rows,
        dst.len()
    );
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the assert above guarantees that every element the strided views address lies
    // inside its slice and that `dst` holds exactly m*n row-major elements; `dst` is borrowed
    // mutably so it cannot alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            read_dst,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            threads.parallelism(),
        );
    }
}
