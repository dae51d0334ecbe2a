//! Host memory a training batch is written into once and stepped on from there: the loader
//! decodes straight into it ([`super::BatchMaker::fill`]) and the trainer reads it
//! ([`super::Trainer::step_buffer`]). On the heap for the CPU; page-locked for the GPU
//! (`cuda::CudaTrainer`'s [`super::Trainer::batch_buffer`]), so that its upload is one DMA
//! with no staging copy on the host. A run keeps a few and reuses them, so a step allocates
//! nothing.

use std::sync::atomic::{AtomicU64, Ordering};

use ndarray::ArrayView4;

use crate::error::{Error, Result};

/// One batch of normalised images `[N, C, H, W]` (NCHW, f32) and its labels.
#[derive(Debug)]
pub struct BatchBuffer {
    images: HostImages,
    shape: [usize; 4],
    labels: Vec<usize>,
    contents: ContentsKey,
}

/// Which buffer and which filling of it: what a copy of the images made ahead of the step
/// (`cuda::CudaTrainer`'s prefetch) is valid for. It changes whenever the images may have
/// been written ([`BatchBuffer::images_mut`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ContentsKey {
    /// Unique among the buffers of this process.
    buffer: u64,
    /// How many times the images were handed out for writing.
    filling: u64,
}

impl ContentsKey {
    fn fresh() -> Self {
        static NEXT_BUFFER: AtomicU64 = AtomicU64::new(0);
        ContentsKey {
            buffer: NEXT_BUFFER.fetch_add(1, Ordering::Relaxed),
            filling: 0,
        }
    }
}

#[derive(Debug)]
enum HostImages {
    Heap(Vec<f32>),
    /// Write-combined page-locked memory: fast to write and to upload, slow for the host to
    /// read (only the GPU reads it on the fast path).
    #[cfg(feature = "cuda")]
    PageLocked(PageLocked),
}

impl HostImages {
    fn values(&self) -> &[f32] {
        match self {
            HostImages::Heap(values) => values,
            #[cfg(feature = "cuda")]
            HostImages::PageLocked(memory) => memory.values(),
        }
    }

    fn values_mut(&mut self) -> &mut [f32] {
        match self {
            HostImages::Heap(values) => values,
            #[cfg(feature = "cuda")]
            HostImages::PageLocked(memory) => memory.values_mut(),
        }
    }
}

/// Page-locked memory and its address, asked for once where the buffer is made: writing the
/// images then makes no CUDA call, so the loader thread never touches the trainer's context
/// (cudarc's slice access binds the context, which hands that thread any error cudarc deferred
/// from a drop on the trainer's thread). The slice's own event would not order anything here
/// anyway: the crate never has cudarc record it (event tracking is off, see `cuda::Gpu`).
#[cfg(feature = "cuda")]
#[derive(Debug)]
struct PageLocked {
    memory: cudarc::driver::PinnedHostSlice<f32>,
    address: *mut f32,
}

// SAFETY: `address` is only dereferenced through `&self`/`&mut self` as the slice of
// `memory`'s elements it points to, and `PinnedHostSlice` is `Send` and `Sync`: the pointer
// adds no sharing the slice itself does not allow.
#[cfg(feature = "cuda")]
unsafe impl Send for PageLocked {}
// SAFETY: as for `Send`.
#[cfg(feature = "cuda")]
unsafe impl Sync for PageLocked {}

#[cfg(feature = "cuda")]
impl PageLocked {
    fn new(mut memory: cudarc::driver::PinnedHostSlice<f32>) -> Result<Self> {
        let address = memory
            .as_mut_ptr()
            .map_err(crate::cuda::driver_err("page-locked batch memory"))?;
        Ok(PageLocked { memory, address })
    }

    fn values(&self) -> &[f32] {
        // SAFETY: `address` is the start of `memory`'s `len()` f32 elements (zero-filled at
        // allocation, see `cuda::pinned`), which live as long as `self`. The GPU only reads
        // them during a step, and a step returns after its uploads (see `images_mut`).
        unsafe { std::slice::from_raw_parts(self.address, self.memory.len()) }
    }

    fn values_mut(&mut self) -> &mut [f32] {
        // SAFETY: as in `values`; `&mut self` makes this the only reference to them.
        unsafe { std::slice::from_raw_parts_mut(self.address, self.memory.len()) }
    }
}

impl BatchBuffer {
    /// A zero-filled buffer on the heap for batches of `shape` (`[N, C, H, W]`).
    pub fn on_heap(shape: [usize; 4]) -> Result<Self> {
        let len = element_count(shape)?;
        Ok(BatchBuffer {
            images: HostImages::Heap(vec![0.0; len]),
            shape,
            labels: Vec::new(),
            contents: ContentsKey::fresh(),
        })
    }

    /// Wraps page-locked memory of exactly `shape`'s element count.
    #[cfg(feature = "cuda")]
    pub(crate) fn page_locked(
        memory: cudarc::driver::PinnedHostSlice<f32>,
        shape: [usize; 4],
    ) -> Result<Self> {
        let len = element_count(shape)?;
        if memory.len() != len {
            return Err(Error::invalid(
                "BatchBuffer",
                format!("{} elements of page-locked memory for {len}", memory.len()),
            ));
        }
        Ok(BatchBuffer {
            images: HostImages::PageLocked(PageLocked::new(memory)?),
            shape,
            labels: Vec::new(),
            contents: ContentsKey::fresh(),
        })
    }

    /// `[N, C, H, W]`.
    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }

    /// Whether the images live in page-locked memory (the GPU uploads them without a copy;
    /// reading them on the host is slow).
    pub fn is_page_locked(&self) -> bool {
        match self.images {
            HostImages::Heap(_) => false,
            #[cfg(feature = "cuda")]
            HostImages::PageLocked(_) => true,
        }
    }

    /// The images to write, NCHW. A buffer can be refilled as soon as the step that read it
    /// (or sent it ahead) has returned: the GPU trainer's steps return after their uploads.
    pub fn images_mut(&mut self) -> Result<&mut [f32]> {
        self.contents.filling += 1;
        Ok(self.images.values_mut())
    }

    /// The images as an array (on page-locked memory this reads write-combined memory:
    /// correct, but slow; the GPU trainer never does it).
    pub fn images(&self) -> Result<ArrayView4<'_, f32>> {
        ArrayView4::from_shape(self.shape, self.images.values())
            .map_err(|e| Error::invalid("BatchBuffer", e.to_string()))
    }

    /// The page-locked memory itself, for the GPU trainer's upload.
    #[cfg(feature = "cuda")]
    pub(crate) fn page_locked_images(&self) -> Option<&cudarc::driver::PinnedHostSlice<f32>> {
        match &self.images {
            HostImages::Heap(_) => None,
            HostImages::PageLocked(page_locked) => Some(&page_locked.memory),
        }
    }

    /// Which buffer and which filling of it the images are now (see [`ContentsKey`]).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn contents(&self) -> ContentsKey {
        self.contents
    }

    /// One label per image, as written by the loader (empty until then).
    pub fn labels(&self) -> &[usize] {
        &self.labels
    }

    /// Replaces the labels (the caller writes the images they belong to).
    pub fn set_labels(&mut self, labels: Vec<usize>) {
        self.labels = labels;
    }
}

/// `N * C * H * W`, refusing an empty or overflowing shape.
fn element_count(shape: [usize; 4]) -> Result<usize> {
    let count = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n > 0 && n <= isize::MAX as usize / std::mem::size_of::<f32>());
    count.ok_or_else(|| {
        Error::invalid(
            "BatchBuffer",
            format!("shape {shape:?} is empty or too large"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heap_buffer_has_its_shape_and_keeps_what_is_written() {
        let mut buffer = BatchBuffer::on_heap([2, 3, 4, 5]).unwrap();
        assert!(!buffer.is_page_locked());
        assert!(buffer.labels().is_empty());
        let images = buffer.images_mut().unwrap();
        assert_eq!(images.len(), 120);
        images[119] = 7.0;
        buffer.set_labels(vec![1, 0]);
        let view = buffer.images().unwrap();
        assert_eq!(view.shape(), &[2, 3, 4, 5]);
        assert_eq!(view[[1, 2, 3, 4]], 7.0);
        assert_eq!(view[[0, 0, 0, 0]], 0.0);
        assert_eq!(buffer.labels(), &[1, 0]);
    }

    /// A copy made ahead of the step is only good for the buffer and filling it was made
    /// from: every buffer has its own key, and handing the images out for writing changes it;
    /// reading them or setting the labels does not.
    #[test]
    fn the_contents_key_changes_with_the_buffer_and_every_filling() {
        let mut a = BatchBuffer::on_heap([1, 1, 2, 2]).unwrap();
        let b = BatchBuffer::on_heap([1, 1, 2, 2]).unwrap();
        assert_ne!(a.contents(), b.contents());
        let before = a.contents();
        a.images().unwrap();
        a.set_labels(vec![0]);
        assert_eq!(a.contents(), before);
        a.images_mut().unwrap();
        let filled = a.contents();
        assert_ne!(filled, before);
        a.images_mut().unwrap();
        assert_ne!(a.contents(), filled);
    }

    #[test]
    fn an_empty_or_overflowing_shape_is_an_error() {
        for shape in [
            [0, 3, 4, 4],
            [2, 3, 0, 4],
            [usize::MAX, 2, 1, 1],
            [1 << 62, 1, 1, 1],
        ] {
            let err = BatchBuffer::on_heap(shape).unwrap_err().to_string();
            assert!(err.contains("empty or too large"), "{shape:?}: {err}");
        }
    }
}
