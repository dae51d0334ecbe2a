//! Test support for alexnet-cuda: every kernel of `kernels/*.cu` compiled as host C++ through
//! `kernels/alexnet_host.h` and callable on the CPU, with its arguments given as cuLaunchKernel
//! takes them. The kernels' arithmetic and indexing run for real (grid walk, block barriers,
//! warp shuffles); speed and the GPU memory model are not what this proves.
//!
//! Only alexnet-cuda's tests use this crate (a dev-dependency), so users of alexnet-cuda never
//! need a C++ compiler. Where none exists, [`unavailable`] says so and no kernel can run.

use core::ffi::c_void;

type Entry =
    unsafe extern "C" fn(u32, u32, bool, *mut *mut c_void, *mut core::ffi::c_char, usize) -> i32;

/// Which index arithmetic the kernels use where they choose (`alexnet_fits_u32`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Indices {
    /// As on a GPU: 32-bit where the launch's sizes allow it.
    AsOnTheGpu,
    /// 64-bit always: the path a GPU takes only past 2^31 elements, on any tensor.
    Wide,
}

/// Room for the description of a misuse the emulation caught.
const MESSAGE_BYTES: usize = 1024;

include!(concat!(env!("OUT_DIR"), "/entries.rs"));

/// Why the kernels could not be compiled here (no C++20 compiler), or `None` when they were.
pub fn unavailable() -> Option<&'static str> {
    BUILD_ERROR
}

/// The compiled kernels as `(module, name)`, e.g. `("lrn", "lrn_f32")`.
pub fn kernels() -> impl Iterator<Item = (&'static str, &'static str)> {
    ENTRIES.iter().map(|&(module, name, _)| (module, name))
}

/// Runs kernel `name` over `grid` blocks of `block` threads (1-D, at most 1024 threads), one
/// block after another, each block's threads concurrently, with `indices` as the kernels'
/// index arithmetic. Launches are serialised. A launch
/// whose threads met at different `__syncthreads`, or that shuffled without the whole warp, is
/// an error naming where (a GPU would hang or leave the result undefined).
///
/// # Safety
/// `args` must hold exactly one pointer per kernel parameter, in order, each pointing to a
/// value of that parameter's type (for a device pointer parameter: a pointer to the host pointer
/// the kernel will use), and every buffer must be large enough for what the kernel touches with
/// these parameters, exactly as for a launch on a GPU.
pub unsafe fn launch(
    name: &str,
    grid: u32,
    block: u32,
    indices: Indices,
    args: &mut [*mut c_void],
) -> Result<(), String> {
    if let Some(why) = BUILD_ERROR {
        return Err(why.to_string());
    }
    let &(_, _, entry) = ENTRIES
        .iter()
        .find(|(_, n, _)| *n == name)
        .ok_or_else(|| format!("no host-compiled kernel named {name}"))?;
    let mut message = [0 as core::ffi::c_char; MESSAGE_BYTES];
    // SAFETY: the caller vouches for the arguments (see above); the entry point only reads
    // `args[..count]`, where count is the kernel's parameter count, and writes at most
    // `MESSAGE_BYTES` bytes, zero-terminated, into `message`.
    match unsafe {
        entry(
            grid,
            block,
            indices == Indices::Wide,
            args.as_mut_ptr(),
            message.as_mut_ptr(),
            MESSAGE_BYTES,
        )
    } {
        0 => Ok(()),
        1 => Err(format!(
            "{name}: launch of {grid} x {block} threads refused (need 1 ..= 1024 threads per block)"
        )),
        _ => {
            // SAFETY: the entry point zero-terminated what it wrote, within the buffer (which
            // starts zeroed, so it is terminated even if nothing was written).
            let what = unsafe { core::ffi::CStr::from_ptr(message.as_ptr()) };
            Err(format!(
                "{name} ({grid} x {block} threads): {}",
                what.to_string_lossy()
            ))
        }
    }
}
