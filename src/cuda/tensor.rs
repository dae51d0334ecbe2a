//! Device tensors: a device buffer with its logical shape and memory layout.

use cudarc::driver::{CudaSlice, DevicePtrMut, PinnedHostSlice};
use ndarray::{ArrayD, ArrayViewD, Ix4, IxDyn};

use super::device::{driver_err, Gpu};
use super::dtype::GpuFloat;
use crate::error::{Error, Result};

/// How a tensor's elements are ordered in memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Layout {
    /// The logical shape in C order: NCHW for activations `[N, C, H, W]`, row-major for
    /// matrices `[rows, cols]` (any rank).
    #[default]
    Nchw,
    /// Channels last (4-D only): logical `[N, C, H, W]` stored as N, H, W, C. What the fp16
    /// tensor-core convolutions want.
    Nhwc,
}

/// A tensor on the GPU: `T` elements with a logical shape (PyTorch's order: `[N, C, H, W]` or
/// `[rows, cols]`) and a [`Layout`] saying how they are stored.
#[derive(Debug)]
pub struct GpuTensor<T: GpuFloat> {
    data: CudaSlice<T>,
    shape: Vec<usize>,
    layout: Layout,
}

fn element_count(shape: &[usize], op: &'static str) -> Result<usize> {
    let len = shape
        .iter()
        .try_fold(1usize, |p, &d| p.checked_mul(d))
        .ok_or_else(|| Error::invalid("tensor shape", format!("{op}: {shape:?} overflows")))?;
    if len == 0 || shape.is_empty() {
        return Err(Error::Shape {
            op,
            expected: "at least one dimension and no zero dimension".into(),
            found: shape.to_vec(),
        });
    }
    Ok(len)
}

fn check_layout(shape: &[usize], layout: Layout, op: &'static str) -> Result<()> {
    if layout == Layout::Nhwc && shape.len() != 4 {
        return Err(Error::Shape {
            op,
            expected: "4 dimensions [N, C, H, W] for the NHWC layout".into(),
            found: shape.to_vec(),
        });
    }
    Ok(())
}

impl<T: GpuFloat> GpuTensor<T> {
    /// A zero-filled tensor.
    pub fn zeros(gpu: &Gpu, shape: &[usize], layout: Layout) -> Result<Self> {
        check_layout(shape, layout, "GpuTensor::zeros")?;
        let len = element_count(shape, "GpuTensor::zeros")?;
        let data = gpu
            .stream()
            .alloc_zeros::<T>(len)
            .map_err(|e| Error::cuda(format!("allocating {shape:?} on the GPU"), e))?;
        Ok(GpuTensor {
            data,
            shape: shape.to_vec(),
            layout,
        })
    }

    /// Uploads a host `f32` tensor (logical order, any strides), rounding to `T` and reordering
    /// to `layout` (host memory as for [`GpuTensor::upload`]).
    pub fn from_host(gpu: &Gpu, host: ArrayViewD<'_, f32>, layout: Layout) -> Result<Self> {
        let mut tensor = Self::zeros(gpu, host.shape(), layout)?;
        tensor.upload(gpu, host)?;
        Ok(tensor)
    }

    /// Overwrites the contents with a host tensor of the same logical shape.
    ///
    /// From ordinary memory the host may reuse it as soon as this returns (the driver stages
    /// it). From page-locked memory (e.g. [`crate::cuda::alloc_readback`]'s) the copy is only
    /// queued on the compute stream: keep that memory unchanged until the GPU has passed it
    /// ([`Gpu::synchronize`]).
    pub fn upload(&mut self, gpu: &Gpu, host: ArrayViewD<'_, f32>) -> Result<()> {
        if host.shape() != self.shape.as_slice() {
            return Err(Error::Shape {
                op: "GpuTensor::upload",
                expected: format!("{:?}", self.shape),
                found: host.shape().to_vec(),
            });
        }
        // f32 already in NCHW order (a standard-layout array) goes up from the caller's memory:
        // no host copy of a batch that can be tens of megabytes.
        if self.layout == Layout::Nchw {
            if let Some(values) = host.as_slice().and_then(T::from_f32_slice) {
                return self.upload_physical(gpu, values);
            }
        }
        let staged = to_physical::<T>(host, self.layout)?;
        self.upload_physical(gpu, &staged)
    }

    /// Overwrites the contents with elements already in this tensor's memory order (host
    /// memory as for [`GpuTensor::upload`]).
    pub fn upload_physical(&mut self, gpu: &Gpu, values: &[T]) -> Result<()> {
        if values.len() != self.data.len() {
            return Err(Error::Shape {
                op: "GpuTensor::upload_physical",
                expected: format!("{} elements", self.data.len()),
                found: vec![values.len()],
            });
        }
        gpu.stream()
            .memcpy_htod(values, &mut self.data)
            .map_err(driver_err("cuMemcpyHtoD"))
    }

    /// Overwrites the contents from page-locked host memory holding elements in this tensor's
    /// memory order: one asynchronous DMA on the compute stream, no host copy. Nothing records
    /// the copy in the memory's own event (event tracking is off): the caller keeps the memory
    /// alive and unwritten until the stream has passed the copy (the trainer reads the step's
    /// loss back on the same stream before it hands the buffer back).
    pub(crate) fn upload_page_locked(
        &mut self,
        gpu: &Gpu,
        memory: &PinnedHostSlice<T>,
    ) -> Result<()> {
        if memory.len() != self.data.len() {
            return Err(Error::Shape {
                op: "GpuTensor::upload_page_locked",
                expected: format!("{} elements", self.data.len()),
                found: vec![memory.len()],
            });
        }
        gpu.stream()
            .memcpy_htod(memory, &mut self.data)
            .map_err(driver_err("cuMemcpyHtoDAsync (page-locked)"))
    }

    /// Downloads to the host as `f32` in logical order (NCHW for 4-D tensors whatever the
    /// layout). Waits for the stream.
    pub fn to_host(&self, gpu: &Gpu) -> Result<ArrayD<f32>> {
        let physical = gpu
            .stream()
            .clone_dtoh(&self.data)
            .map_err(driver_err("cuMemcpyDtoH"))?;
        gpu.stream()
            .synchronize()
            .map_err(driver_err("cuStreamSynchronize"))?;
        let values: Vec<f32> = physical.into_iter().map(GpuFloat::to_f32).collect();
        from_physical(values, &self.shape, self.layout)
    }

    /// Fills every byte with 0xFF: NaN in `f32` and `f16`. Done before a kernel runs in tests,
    /// so an element the kernel forgot to write shows up.
    #[doc(hidden)]
    pub fn poison(&mut self, gpu: &Gpu) -> Result<()> {
        let bytes = self.data.num_bytes();
        let stream = gpu.stream();
        let (ptr, _record) = self.data.device_ptr_mut(stream);
        // SAFETY: `ptr` addresses `bytes` bytes owned by `self.data`, alive for the call; the
        // all-ones pattern is a valid (NaN) value of both element types; the memset is ordered
        // on `stream` after earlier uses (device_ptr_mut waited for them).
        unsafe { cudarc::driver::result::memset_d8_async(ptr, 0xFF, bytes, stream.cu_stream()) }
            .map_err(driver_err("cuMemsetD8Async"))
    }

    /// The logical shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Always false: tensors are never empty.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The logical `[n, c, h, w]` of a 4-D tensor, or [`Error::Shape`] naming `op`.
    pub fn dims4(&self, op: &'static str) -> Result<[usize; 4]> {
        match self.shape.as_slice() {
            &[n, c, h, w] => Ok([n, c, h, w]),
            other => Err(Error::Shape {
                op,
                expected: "a 4-D tensor [N, C, H, W]".into(),
                found: other.to_vec(),
            }),
        }
    }

    /// The device buffer, in this tensor's memory order.
    pub fn data(&self) -> &CudaSlice<T> {
        &self.data
    }

    /// The device buffer, mutably. Crate-only: safe code outside could swap in a buffer of
    /// another length, and every launcher relies on the length matching the shape.
    pub(crate) fn data_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.data
    }
}

/// `host` (logical order) as `T` values in `layout`'s memory order.
pub(crate) fn to_physical<T: GpuFloat>(
    host: ArrayViewD<'_, f32>,
    layout: Layout,
) -> Result<Vec<T>> {
    match layout {
        Layout::Nchw => Ok(host.iter().map(|&v| T::from_f32(v)).collect()),
        Layout::Nhwc => {
            let nchw = host
                .into_dimensionality::<Ix4>()
                .map_err(|e| Error::invalid("NHWC tensor", e.to_string()))?;
            // Iterating the permuted view visits elements in N, H, W, C order.
            Ok(nchw
                .permuted_axes([0, 2, 3, 1])
                .iter()
                .map(|&v| T::from_f32(v))
                .collect())
        }
    }
}

/// `values` in `layout`'s memory order as a logical-order (NCHW) array of `shape`.
pub(crate) fn from_physical(
    values: Vec<f32>,
    shape: &[usize],
    layout: Layout,
) -> Result<ArrayD<f32>> {
    let bad = |e: ndarray::ShapeError| Error::invalid("GPU tensor download", e.to_string());
    match layout {
        Layout::Nchw => ArrayD::from_shape_vec(IxDyn(shape), values).map_err(bad),
        Layout::Nhwc => {
            let &[n, c, h, w] = shape else {
                return Err(Error::Shape {
                    op: "GpuTensor::to_host",
                    expected: "4 dimensions for NHWC".into(),
                    found: shape.to_vec(),
                });
            };
            let nhwc = ndarray::Array4::from_shape_vec((n, h, w, c), values).map_err(bad)?;
            Ok(nhwc
                .permuted_axes([0, 3, 1, 2])
                .as_standard_layout()
                .into_owned()
                .into_dyn())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array4;

    #[test]
    fn nhwc_round_trip_on_the_host() {
        let a = Array4::from_shape_fn((2, 3, 4, 5), |(n, c, h, w)| {
            (n * 1000 + c * 100 + h * 10 + w) as f32
        });
        let physical = to_physical::<f32>(a.view().into_dyn(), Layout::Nhwc).unwrap();
        // Element (n=0, h=0, w=1, c=2) sits at ((0*4 + 0)*5 + 1)*3 + 2.
        assert_eq!(physical[5], 201.0);
        let back = from_physical(physical, &[2, 3, 4, 5], Layout::Nhwc).unwrap();
        assert_eq!(back, a.into_dyn());
    }
}
