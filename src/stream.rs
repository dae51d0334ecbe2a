//! Streaming batches through a backend ([`crate::Backend::run_stream`]): the host writes the
//! next batch's 8-bit images straight into one of the backend's input buffers while the device
//! computes the previous batch, and the logits come back in the order the batches went in.
//!
//! On a GPU the buffers are the [`Pipeline`](crate::cuda::Pipeline)'s two page-locked slots, so
//! decoding, upload and compute overlap and no batch is copied on the host; on the CPU there is
//! one ordinary buffer and each batch is computed as it is submitted. Both run the same driver
//! ([`drive`]), so the order of calls a [`BatchStream`] sees is tested on every machine.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use ndarray::Array2;

use crate::backend::{Backend, StageTimings};
use crate::error::{Error, Result};
use crate::image::{Preprocess, U8Batch};

/// Where [`BatchStream::fill`] writes one batch.
pub struct InputSlot<'a> {
    /// Room for [`InputSlot::capacity`] images, image `i` at `i * image_bytes` (HWC RGB, as in
    /// [`U8Batch`]). On a GPU this is write-combined page-locked memory: write it sequentially
    /// and never read it (reads are uncached and very slow).
    pub bytes: &'a mut [u8],
    /// Which of the backend's buffers this is. A buffer keeps what was last written into it
    /// (the backend never writes it), so a source that repeats a batch writes it once per slot.
    pub slot: usize,
    /// Bytes per image (`height * width * 3`).
    pub image_bytes: usize,
    /// Most images this batch may hold.
    pub capacity: usize,
}

/// One batch's result, as handed to [`BatchStream::take`].
#[derive(Clone, Debug)]
pub struct StreamedBatch {
    /// `[N, classes]`, row `i` for the batch's image `i`.
    pub logits: Array2<f32>,
    /// The device's upload / compute / download times for this batch (CUDA events); `None` on
    /// the CPU.
    pub timings: Option<StageTimings>,
    /// Host time [`BatchStream::fill`] took to write this batch.
    pub fill: Duration,
    /// From the batch's submission to its logits on the host.
    pub latency: Duration,
}

/// A source of batches and a sink for their logits.
///
/// The driver calls `fill` for the next batch before it waits for an earlier one, so with two
/// slots `fill(k + 1)` runs while the device computes batch `k`; `take` sees the batches in
/// the order `fill` produced them. An error from either ends the stream and is returned.
pub trait BatchStream {
    /// Writes the next batch into `slot` and returns how many images it holds, at most
    /// `slot.capacity`; `0` ends the stream.
    fn fill(&mut self, slot: InputSlot<'_>) -> Result<usize>;
    /// Receives the logits of the oldest batch not yet taken.
    fn take(&mut self, batch: StreamedBatch) -> Result<()>;
}

/// What a backend offers [`drive`]: input buffers, starting a batch, waiting for the oldest.
pub trait BatchQueue {
    /// Most images per batch.
    fn max_batch(&self) -> usize;
    /// Bytes per image in the input buffers.
    fn image_bytes(&self) -> usize;
    /// Most batches in flight at once (the number of input buffers).
    fn depth(&self) -> usize;
    /// Batches submitted and not yet finished.
    fn in_flight(&self) -> usize;
    /// The buffer the next batch goes into, and its slot index.
    fn next_input(&mut self) -> Result<(usize, &mut [u8])>;
    /// Starts the first `n` images written into [`BatchQueue::next_input`]'s buffer.
    fn submit(&mut self, n: usize) -> Result<()>;
    /// Waits for the oldest batch in flight: its logits and device timings.
    fn finish(&mut self) -> Result<(Array2<f32>, Option<StageTimings>)>;
}

/// Runs `stream` through `queue` until `fill` returns 0, keeping up to `queue.depth()` batches
/// in flight, and hands every batch's logits to `take` in order.
pub fn drive(queue: &mut dyn BatchQueue, stream: &mut dyn BatchStream) -> Result<()> {
    // Per batch in flight: how long its fill took and when it was submitted.
    let mut submitted: VecDeque<(Duration, Instant)> = VecDeque::with_capacity(queue.depth());
    let (max_batch, image_bytes) = (queue.max_batch(), queue.image_bytes());
    loop {
        if queue.in_flight() >= queue.depth() {
            take_oldest(queue, stream, &mut submitted)?;
        }
        let start = Instant::now();
        let (slot, bytes) = queue.next_input()?;
        let n = stream.fill(InputSlot {
            bytes,
            slot,
            image_bytes,
            capacity: max_batch,
        })?;
        if n == 0 {
            break;
        }
        if n > max_batch {
            return Err(Error::invalid(
                "BatchStream::fill",
                format!("returned {n} images for a slot of {max_batch}"),
            ));
        }
        let fill = start.elapsed();
        submitted.push_back((fill, Instant::now()));
        queue.submit(n)?;
    }
    while queue.in_flight() > 0 {
        take_oldest(queue, stream, &mut submitted)?;
    }
    Ok(())
}

fn take_oldest(
    queue: &mut dyn BatchQueue,
    stream: &mut dyn BatchStream,
    submitted: &mut VecDeque<(Duration, Instant)>,
) -> Result<()> {
    let (logits, timings) = queue.finish()?;
    let (fill, at) = submitted
        .pop_front()
        .ok_or_else(|| Error::invalid("stream", "a batch finished that was never submitted"))?;
    stream.take(StreamedBatch {
        logits,
        timings,
        fill,
        latency: at.elapsed(),
    })
}

/// [`BatchQueue`] for a backend that computes on the host: `submit` runs the batch at once
/// through [`Backend::forward_u8`] and `finish` hands the results back in order. With `depth`
/// buffers the calls reach the [`BatchStream`] in the same order as on a GPU.
pub struct HostQueue<'b, B: Backend + ?Sized> {
    backend: &'b mut B,
    pre: Preprocess,
    side: u32,
    max_batch: usize,
    buffers: Vec<Vec<u8>>,
    next: usize,
    done: VecDeque<Result<Array2<f32>>>,
}

impl<'b, B: Backend + ?Sized> HostQueue<'b, B> {
    /// `depth` buffers of `max_batch` images of the backend's input size, normalised with
    /// `pre`'s mean and std.
    pub fn new(
        backend: &'b mut B,
        pre: &Preprocess,
        max_batch: usize,
        depth: usize,
    ) -> Result<Self> {
        let side_len = backend.config().input.square_rgb_side("stream")?;
        if max_batch == 0 || depth == 0 {
            return Err(Error::invalid(
                "stream",
                "batch and depth must be at least 1",
            ));
        }
        let side = u32::try_from(side_len)
            .map_err(|_| Error::invalid("stream", "input side does not fit u32"))?;
        let bytes = side_len
            .checked_mul(side_len * 3)
            .and_then(|image| image.checked_mul(max_batch))
            .ok_or_else(|| Error::invalid("stream batch", format!("{max_batch} overflows")))?;
        let mut buffers = Vec::new();
        buffers
            .try_reserve_exact(depth)
            .map_err(|_| Error::invalid("stream", "no memory for the buffers"))?;
        for _ in 0..depth {
            let mut buffer = Vec::new();
            buffer.try_reserve_exact(bytes).map_err(|_| {
                Error::invalid(
                    "stream",
                    format!("{bytes} bytes of input buffer: out of memory"),
                )
            })?;
            buffer.resize(bytes, 0);
            buffers.push(buffer);
        }
        Ok(HostQueue {
            backend,
            pre: *pre,
            side,
            max_batch,
            buffers,
            next: 0,
            done: VecDeque::with_capacity(depth),
        })
    }
}

impl<B: Backend + ?Sized> BatchQueue for HostQueue<'_, B> {
    fn max_batch(&self) -> usize {
        self.max_batch
    }

    fn image_bytes(&self) -> usize {
        self.side as usize * self.side as usize * 3
    }

    fn depth(&self) -> usize {
        self.buffers.len()
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }

    fn next_input(&mut self) -> Result<(usize, &mut [u8])> {
        if self.done.len() >= self.buffers.len() {
            return Err(Error::invalid(
                "stream",
                "every buffer holds a batch in flight",
            ));
        }
        Ok((self.next, &mut self.buffers[self.next]))
    }

    fn submit(&mut self, n: usize) -> Result<()> {
        let bytes = n * self.image_bytes();
        // The CPU's forward takes an owned batch; one copy is noise beside seconds of compute.
        let batch = U8Batch::from_raw(self.side, self.buffers[self.next][..bytes].to_vec())?;
        // Kept, not returned: like a device error, it surfaces when this batch is finished.
        self.done
            .push_back(self.backend.forward_u8(&batch, &self.pre));
        self.next = (self.next + 1) % self.buffers.len();
        Ok(())
    }

    fn finish(&mut self) -> Result<(Array2<f32>, Option<StageTimings>)> {
        let logits = self
            .done
            .pop_front()
            .ok_or_else(|| Error::invalid("stream", "finish() with no batch in flight"))??;
        Ok((logits, self.backend.last_stage_timings()))
    }
}
