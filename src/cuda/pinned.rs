//! Page-locked host memory for the two directions, which want different kinds:
//!
//! - uploads ([`alloc_upload`]): write-combined (`CU_MEMHOSTALLOC_WRITECOMBINED`, what cudarc's
//!   `alloc_pinned` gives): fast for the host to write sequentially and for the GPU to read over
//!   PCIe, but very slow for the host to READ — write it, never read it back;
//! - downloads ([`alloc_readback`]): ordinary cached page-locked memory (`cuMemHostAlloc` with
//!   flags 0), fast for the host to read.
//!
//! Both are cudarc [`PinnedHostSlice`]s, freed on drop. cudarc's own event on them is never
//! recorded here (the crate turns its event tracking off, see `Gpu::new`), so neither a slice
//! handed to the host nor the drop waits for a copy still in flight: whoever queues a copy from
//! or into one waits for it (its own event, or the stream) before the host touches or drops the
//! memory again. Both are zero-filled at allocation, so no uninitialised byte is ever exposed.

use std::sync::Arc;

use cudarc::driver::{CudaContext, DeviceRepr, PinnedHostSlice, ValidAsZeroBits};

use super::device::driver_err;
use crate::error::{Error, Result};

/// Page-locked, write-combined host memory for uploads (write only from the host).
pub fn alloc_upload<T: DeviceRepr + ValidAsZeroBits>(
    ctx: &Arc<CudaContext>,
    len: usize,
) -> Result<PinnedHostSlice<T>> {
    check_len::<T>(len)?;
    // SAFETY: the memory is zero-filled below before anyone can read it.
    let mut slice = unsafe { ctx.alloc_pinned::<T>(len) }
        .map_err(driver_err("cuMemHostAlloc (write-combined)"))?;
    zero(&mut slice)?;
    Ok(slice)
}

/// Page-locked, cached host memory for downloads (fast for the host to read).
pub fn alloc_readback<T: DeviceRepr + ValidAsZeroBits>(
    ctx: &Arc<CudaContext>,
    len: usize,
) -> Result<PinnedHostSlice<T>> {
    check_len::<T>(len)?;
    // SAFETY: the memory is zero-filled below before anyone can read it. Flags 0: plain
    // page-locked memory, cached by the CPU (not write-combined).
    let mut slice = unsafe { ctx.alloc_pinned_with_flags::<T>(len, 0) }
        .map_err(driver_err("cuMemHostAlloc"))?;
    zero(&mut slice)?;
    Ok(slice)
}

/// cudarc asserts (panics) on a zero-sized or overflowing request: refuse those here.
fn check_len<T>(len: usize) -> Result<()> {
    let bytes = len.checked_mul(std::mem::size_of::<T>());
    match bytes {
        Some(b) if b > 0 && b < isize::MAX as usize => Ok(()),
        _ => Err(Error::invalid(
            "pinned allocation",
            format!("{len} elements of {} bytes", std::mem::size_of::<T>()),
        )),
    }
}

fn zero<T: ValidAsZeroBits>(slice: &mut PinnedHostSlice<T>) -> Result<()> {
    let len = slice.len();
    let ptr = slice
        .as_mut_ptr()
        .map_err(driver_err("cuEventSynchronize"))?;
    // SAFETY: `ptr` points to `len` elements of `T` owned by `slice` (no GPU work uses it yet),
    // and all-zero bits are a valid `T` (`ValidAsZeroBits`).
    unsafe { std::ptr::write_bytes(ptr, 0, len) };
    Ok(())
}
