//! [`Backend`] for [`CudaModel`]: what the CLI and benchmarks drive.

use ndarray::{Array2, ArrayView4};

use super::CudaModel;
use crate::backend::{Backend, StageTimings};
use crate::config::{AlexNetConfig, Precision};
use crate::cuda::ops::PrepareInput;
use crate::cuda::GraphStatus;
use crate::error::Result;
use crate::image::{Preprocess, U8Batch};
use crate::stream::{drive, BatchStream};

impl Backend for CudaModel {
    fn device_name(&self) -> String {
        self.gpu.name().to_string()
    }

    fn precision(&self) -> Precision {
        self.precision
    }

    fn config(&self) -> &AlexNetConfig {
        &self.config
    }

    fn forward(&mut self, input: ArrayView4<'_, f32>) -> Result<Array2<f32>> {
        self.forward_f32(input)
    }

    /// Normalises with `pre`'s mean and std for this batch only: the model's own
    /// [`CudaOptions::normalization`](super::CudaOptions::normalization) is left as it was.
    fn forward_u8(&mut self, batch: &U8Batch, pre: &Preprocess) -> Result<Array2<f32>> {
        let norm = PrepareInput::new(pre.mean, pre.std)?;
        self.forward_u8_with(batch, &norm)
    }

    /// Through the overlapped [`Pipeline`](crate::cuda::Pipeline): the stream writes each
    /// batch straight into a page-locked slot while the GPU computes the previous one.
    fn run_stream(
        &mut self,
        max_batch: usize,
        pre: &Preprocess,
        stream: &mut dyn BatchStream,
    ) -> Result<()> {
        let norm = PrepareInput::new(pre.mean, pre.std)?;
        let mut pipeline = self.pipeline_with(max_batch, norm)?;
        drive(&mut pipeline, stream)
    }

    fn last_stage_timings(&self) -> Option<StageTimings> {
        self.last_timings
    }

    fn device_details(&self) -> Option<String> {
        let gpu = self.gpu();
        let (major, minor) = gpu.compute_capability();
        let graphs = match self.graph_status() {
            Some(GraphStatus::Disabled) => "off (eager)".to_string(),
            Some(GraphStatus::Unsupported(why)) => format!("capture failed, eager ({why})"),
            Some(GraphStatus::Replaying) => "replaying".to_string(),
            Some(GraphStatus::NotCaptured) | None => "on".to_string(),
        };
        Some(format!(
            "sm_{major}{minor}; {}; kernels: {:?}; CUDA graphs: {graphs}",
            gpu.libraries().summary(),
            gpu.kernel_origin()
        ))
    }

    fn is_gpu(&self) -> bool {
        true
    }
}
