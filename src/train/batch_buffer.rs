//! Host memory a training batch is written into once and stepped on from there: the loader
//! decodes straight into it ([`super::BatchMaker::fill`]) and the trainer reads it
//! ([`super::Trainer::step_buffer`]). On the heap for the CPU; page-locked for the GPU
//! (`cuda::CudaTrainer`'s [`super::Trainer::batch_buffer`]), so that its upload is one DMA
//! with no staging copy on the host. A run keeps a few and reuses them, so a step allocates
//! nothing.

use ndarray::ArrayView4;

use crate::error::{Error, Result};

/// One batch of normalised images `[N, C, H, W]` (NCHW, f32) and its labels.
#[derive(Debug)]
pub struct BatchBuffer {
    images: HostImages,
    shape: [usize; 4],
    labels: Vec<usize>,
}

#[derive(Debug)]
enum HostImages {
    Heap(Vec<f32>),
    /// Write-combined page-locked memory: fast to write and to upload, slow for the host to
    /// read (only the GPU reads it on the fast path).
    #[cfg(feature = "cuda")]
    PageLocked(cudarc::driver::PinnedHostSlice<f32>),
}

impl BatchBuffer {
    /// A zero-filled buffer on the heap for batches of `shape` (`[N, C, H, W]`).
    pub fn on_heap(shape: [usize; 4]) -> Result<Self> {
        let len = element_count(shape)?;
        Ok(BatchBuffer {
            images: HostImages::Heap(vec![0.0; len]),
            shape,
            labels: Vec::new(),
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
            images: HostImages::PageLocked(memory),
            shape,
            labels: Vec::new(),
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

    /// The images to write, NCHW. Page-locked memory first waits for an upload still reading
    /// it, so a buffer can be refilled as soon as its step has returned.
    pub fn images_mut(&mut self) -> Result<&mut [f32]> {
        match &mut self.images {
            HostImages::Heap(values) => Ok(values),
            #[cfg(feature = "cuda")]
            HostImages::PageLocked(memory) => memory
                .as_mut_slice()
                .map_err(crate::cuda::driver_err("wait for the batch's upload")),
        }
    }

    /// The images as an array (on page-locked memory this reads write-combined memory:
    /// correct, but slow; the GPU trainer never does it).
    pub fn images(&self) -> Result<ArrayView4<'_, f32>> {
        let values: Result<&[f32]> = match &self.images {
            HostImages::Heap(values) => Ok(values),
            #[cfg(feature = "cuda")]
            HostImages::PageLocked(memory) => memory
                .as_slice()
                .map_err(crate::cuda::driver_err("wait for the batch's upload")),
        };
        ArrayView4::from_shape(self.shape, values?)
            .map_err(|e| Error::invalid("BatchBuffer", e.to_string()))
    }

    /// The page-locked memory itself, for the GPU trainer's upload.
    #[cfg(feature = "cuda")]
    pub(crate) fn page_locked_images(&self) -> Option<&cudarc::driver::PinnedHostSlice<f32>> {
        match &self.images {
            HostImages::Heap(_) => None,
            HostImages::PageLocked(memory) => Some(memory),
        }
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
