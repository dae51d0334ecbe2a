//! Limits instead of crashes: absurd batch sizes are typed errors or bounded memory, never an
//! abort. (Huge image headers: tests/preprocess.rs; huge safetensors headers: tests/weights_io.rs.)

mod common;

use alexnet_cuda::cpu::CpuModel;
use alexnet_cuda::timing::{synthetic_u8_batch, time_forward, TimingPlan};
use alexnet_cuda::{AlexNetConfig, Error, Precision};
use ndarray::Array4;

fn tiny_model() -> CpuModel {
    let config = AlexNetConfig::torchvision();
    CpuModel::new(&common::formula_weights(&config), Precision::Fp32).unwrap()
}

#[test]
fn empty_batch_is_a_shape_error() {
    let model = tiny_model();
    let empty = Array4::<f32>::zeros((0, 3, 224, 224));
    assert!(matches!(
        model.forward(empty.view()),
        Err(Error::Shape { .. })
    ));
}

#[test]
fn a_million_image_batch_is_a_typed_error_not_an_abort() {
    assert!(matches!(
        synthetic_u8_batch(1_000_000, 224, 0),
        Err(Error::Invalid { .. })
    ));
    let mut model = tiny_model();
    let plan = TimingPlan {
        batch: 1_000_000,
        warmup: 0,
        iterations: 1,
        seed: 0,
    };
    let result = time_forward(
        &mut model,
        AlexNetConfig::torchvision().input,
        plan,
        |_, _| {},
    );
    assert!(matches!(result, Err(Error::Invalid { .. })), "{result:?}");
}

#[test]
fn cli_rejects_absurd_batches_with_usage_errors() {
    for batch in ["0", "1000000", "-1", "many"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_infer"))
            .args(["--device", "cpu", &format!("--batch={batch}")])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "--batch {batch}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("--batch"),
            "--batch {batch}"
        );
    }
}
