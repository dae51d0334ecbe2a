//! Kernel functions looked up once per context, the parameter structs made passable by value,
//! and the launch-size arithmetic shared by every launcher.

use std::collections::HashMap;
use std::mem::size_of;
use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaModule, DeviceRepr, LaunchConfig};

use super::abi::*;
use super::dtype::{GpuDtype, KernelNames, CONVERT_F16_TO_F32, CONVERT_F32_TO_F16};
use super::kernel_table::{self, Param};
use crate::error::{Error, Result};

// SAFETY: each is a `#[repr(C)]` plain-old-data struct from `kernels/alexnet_abi.h` (integers and
// floats only, no pointers or padding-dependent invariants); the kernels take them by value with
// the same layout, which `tests/ptx_kernels.rs` checks against the PTX parameter sizes.
unsafe impl DeviceRepr for AlexnetTensorShape {}
// SAFETY: as above.
unsafe impl DeviceRepr for AlexnetPrepareParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for AlexnetBiasActParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for AlexnetLrnParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for AlexnetPoolParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for AlexnetDropoutParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for AlexnetSoftmaxParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for AlexnetConvertParams {}

/// What each launcher passes, in order: the table entry of every kernel must say the same.
fn expected_params(family: Family) -> Vec<Param> {
    use Param::{Ptr, Struct};
    match family {
        Family::PrepareInput => vec![Ptr, Ptr, Struct(size_of::<AlexnetPrepareParams>())],
        Family::BiasAct => vec![Ptr, Ptr, Struct(size_of::<AlexnetBiasActParams>())],
        Family::Dropout => vec![Ptr, Struct(size_of::<AlexnetDropoutParams>())],
        Family::Lrn => vec![Ptr, Ptr, Struct(size_of::<AlexnetLrnParams>())],
        Family::MaxPool => vec![Ptr, Ptr, Struct(size_of::<AlexnetPoolParams>())],
        Family::SoftmaxTopk => vec![
            Ptr,
            Ptr,
            Ptr,
            Ptr,
            Struct(size_of::<AlexnetSoftmaxParams>()),
        ],
        Family::Convert => vec![Ptr, Ptr, Struct(size_of::<AlexnetConvertParams>())],
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    PrepareInput,
    BiasAct,
    Dropout,
    Lrn,
    MaxPool,
    SoftmaxTopk,
    Convert,
}

/// One dtype's kernels.
#[derive(Debug)]
pub(crate) struct KernelSet {
    pub prepare_input: CudaFunction,
    pub bias_act: CudaFunction,
    pub dropout: CudaFunction,
    pub lrn: CudaFunction,
    pub maxpool: CudaFunction,
    pub softmax_topk: CudaFunction,
}

/// Every kernel of the crate, looked up once.
#[derive(Debug)]
pub(crate) struct Kernels {
    pub f32: KernelSet,
    pub f16: KernelSet,
    pub convert_f32_to_f16: CudaFunction,
    pub convert_f16_to_f32: CudaFunction,
}

impl Kernels {
    /// Looks every kernel up in `modules` (module name -> loaded module), checking each against
    /// the kernel table first.
    pub fn load(modules: &HashMap<&'static str, Arc<CudaModule>>) -> Result<Self> {
        let set = |dtype: GpuDtype| -> Result<KernelSet> {
            let KernelNames {
                prepare_input,
                bias_act,
                dropout,
                lrn,
                maxpool,
                softmax_topk,
            } = *dtype.kernels();
            Ok(KernelSet {
                prepare_input: function(modules, prepare_input, Family::PrepareInput)?,
                bias_act: function(modules, bias_act, Family::BiasAct)?,
                dropout: function(modules, dropout, Family::Dropout)?,
                lrn: function(modules, lrn, Family::Lrn)?,
                maxpool: function(modules, maxpool, Family::MaxPool)?,
                softmax_topk: function(modules, softmax_topk, Family::SoftmaxTopk)?,
            })
        };
        Ok(Kernels {
            f32: set(GpuDtype::F32)?,
            f16: set(GpuDtype::F16)?,
            convert_f32_to_f16: function(modules, CONVERT_F32_TO_F16, Family::Convert)?,
            convert_f16_to_f32: function(modules, CONVERT_F16_TO_F32, Family::Convert)?,
        })
    }

    pub fn set(&self, dtype: GpuDtype) -> &KernelSet {
        match dtype {
            GpuDtype::F32 => &self.f32,
            GpuDtype::F16 => &self.f16,
        }
    }
}

fn function(
    modules: &HashMap<&'static str, Arc<CudaModule>>,
    name: &'static str,
    family: Family,
) -> Result<CudaFunction> {
    let spec = kernel_table::kernel(name).ok_or_else(|| {
        Error::cuda(
            format!("kernel {name}"),
            "not in src/cuda/kernel_table.rs (launcher and kernel table disagree)",
        )
    })?;
    let expected = expected_params(family);
    if spec.params != expected.as_slice() {
        return Err(Error::cuda(
            format!("kernel {name}"),
            format!(
                "the kernel table lists parameters {:?}, the launcher passes {expected:?}",
                spec.params
            ),
        ));
    }
    let module = modules.get(spec.module).ok_or_else(|| {
        Error::cuda(
            format!("kernel {name}"),
            format!("module `{}` was not loaded", spec.module),
        )
    })?;
    module.load_function(name).map_err(|e| {
        Error::cuda(
            format!("kernel {name}"),
            format!("not found in module `{}`: {e}", spec.module),
        )
    })
}

/// Largest grid x-dimension CUDA allows.
const MAX_GRID_X: u64 = (1 << 31) - 1;

/// One thread per element in blocks of `ALEXNET_BLOCK_1D`: the launch of every element-wise
/// kernel. `len` must be positive and the grid must fit.
pub(crate) fn grid_1d(op: &str, len: u64) -> Result<LaunchConfig> {
    if len == 0 {
        return Err(Error::invalid(
            "launch size",
            format!("{op}: nothing to do (0 elements)"),
        ));
    }
    let block = u64::from(ALEXNET_BLOCK_1D);
    let blocks = len.div_ceil(block);
    if blocks > MAX_GRID_X {
        return Err(Error::invalid(
            "launch size",
            format!("{op}: {len} elements need {blocks} blocks, more than CUDA's {MAX_GRID_X}"),
        ));
    }
    Ok(LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (ALEXNET_BLOCK_1D, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// One block of `ALEXNET_SOFTMAX_BLOCK` threads per row.
pub(crate) fn grid_rows(op: &str, rows: u32) -> Result<LaunchConfig> {
    if rows == 0 || u64::from(rows) > MAX_GRID_X {
        return Err(Error::invalid(
            "launch size",
            format!("{op}: {rows} rows (need 1 ..= {MAX_GRID_X})"),
        ));
    }
    Ok(LaunchConfig {
        grid_dim: (rows, 1, 1),
        block_dim: (ALEXNET_SOFTMAX_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// `v` as a `u32` kernel parameter, or an error naming `what`.
pub(crate) fn to_u32(op: &str, what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| {
        Error::invalid(
            "launch size",
            format!("{op}: {what} = {v} does not fit the kernel's 32-bit parameter"),
        )
    })
}

/// `v` as an `i32` library parameter (cuBLAS, cuDNN), or an error naming `what`.
pub(crate) fn to_i32(op: &str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        Error::invalid(
            "launch size",
            format!("{op}: {what} = {v} does not fit the library's 32-bit int"),
        )
    })
}

/// The kernel ABI's shape struct for logical dims `[n, c, h, w]` in `layout`.
pub(crate) fn abi_shape(op: &str, dims: [usize; 4], nhwc: bool) -> Result<AlexnetTensorShape> {
    let [n, c, h, w] = dims;
    // The kernels index with 32-bit thread counts per dimension but 64-bit element offsets;
    // every dimension must fit 32 bits.
    Ok(AlexnetTensorShape {
        n: to_u32(op, "n", n)?,
        c: to_u32(op, "c", c)?,
        h: to_u32(op, "h", h)?,
        w: to_u32(op, "w", w)?,
        layout: if nhwc {
            ALEXNET_LAYOUT_NHWC
        } else {
            ALEXNET_LAYOUT_NCHW
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_covers_every_element() {
        let cfg = grid_1d("t", 257).unwrap();
        assert!(cfg.grid_dim.0 * cfg.block_dim.0 >= 257);
        assert_eq!(cfg.grid_dim.0, 2);
        assert!(grid_1d("t", 0).is_err());
        assert!(grid_1d("t", u64::MAX).is_err());
    }

    #[test]
    fn every_kernel_of_both_dtypes_is_in_the_table_with_the_launchers_parameters() {
        for dtype in GpuDtype::ALL {
            let k = dtype.kernels();
            for (name, family) in [
                (k.prepare_input, Family::PrepareInput),
                (k.bias_act, Family::BiasAct),
                (k.dropout, Family::Dropout),
                (k.lrn, Family::Lrn),
                (k.maxpool, Family::MaxPool),
                (k.softmax_topk, Family::SoftmaxTopk),
            ] {
                let spec = kernel_table::kernel(name).expect(name);
                assert_eq!(spec.params, expected_params(family).as_slice(), "{name}");
            }
        }
        for name in [CONVERT_F32_TO_F16, CONVERT_F16_TO_F32] {
            let spec = kernel_table::kernel(name).expect(name);
            assert_eq!(spec.params, expected_params(Family::Convert).as_slice());
        }
    }
}
