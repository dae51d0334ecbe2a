//! Helpers shared by the integration tests: the deterministic weight formula that
//! `tools/pytorch_reference.py` also implements (so PyTorch's outputs can be checked here), and
//! error measures.
#![allow(dead_code)]

use std::path::PathBuf;

use alexnet_cuda::{AlexNetConfig, Weights};

/// splitmix64's finaliser (wrapping), as in tools/pytorch_reference.py.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `n` values in (-1, 1) from stream `stream`, in f64 (tools/pytorch_reference.py `uniform_pm1`).
pub fn uniform_pm1(stream: u64, n: usize) -> impl Iterator<Item = f64> {
    (0..n as u64).map(move |i| {
        let u = splitmix64(stream.wrapping_mul(1 << 40).wrapping_add(i)) >> 40;
        (u as f64 + 0.5) / (1u64 << 24) as f64 * 2.0 - 1.0
    })
}

/// The formula weights of tools/pytorch_reference.py: He-uniform weights, biases in +-0.1,
/// stream `index + 1` per tensor, rounded to f32.
pub fn formula_weights(config: &AlexNetConfig) -> Weights {
    formula_weights_from(config, 1)
}

/// [`formula_weights`] drawn from stream `index + first_stream` per tensor: another set of the
/// same scales for `first_stream` other than 1.
pub fn formula_weights_from(config: &AlexNetConfig, first_stream: u64) -> Weights {
    Weights::from_fn(config, |index, name, shape| {
        let n: usize = shape.iter().product();
        let scale = if name.ends_with(".weight") {
            let fan_in: usize = shape[1..].iter().product();
            (6.0 / fan_in as f64).sqrt()
        } else {
            0.1
        };
        uniform_pm1(index as u64 + first_stream, n)
            .map(|v| (v * scale) as f32)
            .collect()
    })
    .expect("formula weights match the config")
}

/// `n` values in (-scale, scale) from `stream`, rounded to f32.
pub fn formula_values(stream: u64, n: usize, scale: f64) -> Vec<f32> {
    uniform_pm1(stream, n).map(|v| (v * scale) as f32).collect()
}

/// `flat` cut into consecutive pieces of `lens` (parameter tensors laid end to end).
pub fn split_flat(flat: &[f32], lens: &[usize]) -> Vec<Vec<f32>> {
    let mut at = 0;
    lens.iter()
        .map(|&len| {
            at += len;
            flat[at - len..at].to_vec()
        })
        .collect()
}

/// The gradients of the 1-D parameter `tensors` (name, length) whose values lie end to end in
/// `flat`, in that order.
pub fn flat_gradients(tensors: &[(&str, usize)], flat: &[f32]) -> alexnet_cuda::cpu::Gradients {
    let lens: Vec<usize> = tensors.iter().map(|t| t.1).collect();
    alexnet_cuda::cpu::Gradients {
        tensors: tensors
            .iter()
            .zip(split_flat(flat, &lens))
            .map(|(&(name, len), values)| alexnet_cuda::cpu::Gradient {
                name: name.to_string(),
                shape: vec![len],
                values,
            })
            .collect(),
    }
}

/// `max |a - b| / max |b|`; infinite when `a` holds a NaN or the lengths differ.
pub fn rel_max_error(a: &[f32], reference: &[f64]) -> f64 {
    if a.len() != reference.len() || a.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let scale = reference.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let err = a
        .iter()
        .zip(reference)
        .fold(0.0f64, |m, (x, r)| m.max((*x as f64 - r).abs()));
    err / scale.max(f64::MIN_POSITIVE)
}

/// A path under tests/data.
pub fn data_path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("data")
        .join(relative)
}

/// The PyTorch fixture written by tools/pytorch_reference.py.
pub fn pytorch_reference() -> serde_json::Value {
    let path = data_path("pytorch_reference.json");
    let text = std::fs::read_to_string(&path).expect("tests/data/pytorch_reference.json exists");
    serde_json::from_str(&text).expect("the fixture is valid JSON")
}

/// A JSON array of numbers as f64.
pub fn json_f64s(value: &serde_json::Value) -> Vec<f64> {
    value
        .as_array()
        .expect("a JSON array")
        .iter()
        .map(|v| v.as_f64().expect("a number"))
        .collect()
}

/// max |got - want| / max |want| of two f32 tensors; infinite on any NaN in `got` or a shape
/// mismatch.
pub fn rel_err(got: &ndarray::ArrayD<f32>, want: &ndarray::ArrayD<f32>) -> f64 {
    if got.shape() != want.shape() {
        return f64::INFINITY;
    }
    let want64: Vec<f64> = want.iter().map(|&v| v as f64).collect();
    rel_max_error(got.as_standard_layout().as_slice().unwrap_or(&[]), &want64)
}

/// Asserts `rel_err(got, want) <= tol`, printing the error either way.
pub fn check(what: &str, got: &ndarray::ArrayD<f32>, want: &ndarray::ArrayD<f32>, tol: f64) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let err = rel_err(got, want);
    eprintln!("{what}: relative error {err:.3e} (tolerance {tol:e})");
    assert!(err <= tol, "{what}: relative error {err:.3e} > {tol:e}");
}

/// `n` formula-filled 8-bit RGB images of `side` x `side`, from stream `seed + i` for image i.
pub fn random_u8_batch(n: usize, side: u32, seed: u64) -> alexnet_cuda::image::U8Batch {
    let mut batch = alexnet_cuda::image::U8Batch::new(side);
    for i in 0..n {
        let bytes: Vec<u8> = formula_values(seed + i as u64, (side * side * 3) as usize, 1.0)
            .into_iter()
            .map(|v| ((v + 1.0) * 127.99) as u8)
            .collect();
        let image = image::RgbImage::from_raw(side, side, bytes).expect("side*side*3 bytes");
        batch.push(&image).expect("image of the batch's size");
    }
    batch
}

/// The seed GPU tests draw their random inputs from: [`DEFAULT_TEST_SEED`] so that a failure
/// replays exactly, or `ALEXNET_TEST_SEED` to vary it. Printed either way.
pub fn test_seed(test: &str) -> u64 {
    let seed = match std::env::var("ALEXNET_TEST_SEED") {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("ALEXNET_TEST_SEED={text:?} is not an unsigned integer")),
        Err(_) => DEFAULT_TEST_SEED,
    };
    eprintln!("{test}: ALEXNET_TEST_SEED={seed}");
    seed
}

/// The seed GPU tests use unless `ALEXNET_TEST_SEED` says otherwise.
pub const DEFAULT_TEST_SEED: u64 = 20_121_203;

/// Holds the GPU for one test: the GPU tests of a binary take turns, so none shares the device
/// with another (timings, cuDNN's algorithm search and out-of-memory tests would otherwise
/// disturb each other). Cargo runs test binaries one after another already.
pub fn exclusive_gpu() -> std::sync::MutexGuard<'static, ()> {
    static GPU: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // A test that panicked while holding the GPU leaves it usable for the next one.
    GPU.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether GPU 0 runs bf16 (compute capability 8.0 or newer); where it does not, prints the
/// line that says the bf16 part of the calling test was skipped, and why. Without a usable GPU
/// it panics: a GPU test run without one fails, it never passes by skipping.
#[cfg(feature = "cuda")]
pub fn gpu_runs_bf16(test: &str) -> bool {
    let gpu = alexnet_cuda::cuda::Gpu::new(0).unwrap_or_else(|e| panic!("{test}: {e}"));
    let (major, minor) = gpu.compute_capability();
    if major < 8 {
        eprintln!(
            "{test}: SKIPPED bf16: {} has compute capability {major}.{minor} (bf16 needs 8.0)",
            gpu.name()
        );
    }
    major >= 8
}

/// A small AlexNet-shaped network (LRN, dropout of probability `dropout` where the paper has
/// one) on 67x67 inputs with 5 classes, that trains in milliseconds on the CPU.
pub fn small_training_config(dropout: Option<f32>) -> AlexNetConfig {
    let mut config = AlexNetConfig::five_conv_three_fc(
        "small",
        [6, 8, 8, 7, 6],
        Some(alexnet_cuda::config::LrnParams::PAPER),
    );
    config.input = alexnet_cuda::config::InputShape {
        channels: 3,
        height: 67,
        width: 67,
    };
    for (fc, width) in config.fcs.iter_mut().zip([16, 12, 5]) {
        fc.out_features = width;
        fc.dropout = fc.dropout.and(dropout);
    }
    config
}

/// `n` formula images for [`small_training_config`], from stream `stream`.
pub fn small_training_batch(n: usize, stream: u64) -> ndarray::Array4<f32> {
    ndarray::Array4::from_shape_vec((n, 3, 67, 67), formula_values(stream, n * 3 * 67 * 67, 2.0))
        .expect("n * 3 * 67 * 67 values")
}
