//! Helpers shared by the fuzz targets: the small network the weights targets load into, and the
//! checks run on whatever a loader accepts.

use std::path::Path;

use alexnet_cuda::config::InputShape;
use alexnet_cuda::weights::StorageDtype;
use alexnet_cuda::{AlexNetConfig, Weights};

/// A tiny 5-conv/3-fc network (about 1,400 parameters, so a valid file is a few KB):
/// 3x67x67 input, channels 2-3-4-4-3, fc widths 8-8-5. conv1 (k11 s4 p2) gives 16x16, pool 7x7,
/// conv2 7x7, pool 3x3, conv3-5 3x3, pool 1x1: 3 features into fc1.
/// `tests/fuzz_regressions.rs` has the same config (it writes the seed files).
pub fn tiny_config() -> AlexNetConfig {
    let mut config = AlexNetConfig::five_conv_three_fc("tiny", [2, 3, 4, 4, 3], None);
    config.input = InputShape {
        channels: 3,
        height: 67,
        width: 67,
    };
    for (fc, width) in config.fcs.iter_mut().zip([8, 8, 5]) {
        fc.out_features = width;
    }
    config.layers().expect("tiny config is well formed");
    config
}

/// Loads `data` without a config and with `config`; every outcome must be an `Ok` or an `Err`
/// (the fuzzer catches panics, aborts, hangs and runaway allocations). Accepted weights must
/// survive a save/load round trip unchanged.
pub fn load_both_ways(data: &[u8], config: &AlexNetConfig) {
    let origin = Path::new("fuzz.safetensors");
    for config in [None, Some(config)] {
        match Weights::from_safetensors_bytes(data, origin, config) {
            Ok(weights) => check_round_trip(&weights, origin),
            // Formatting runs the error explanations' Display code too.
            Err(e) => drop(e.to_string()),
        }
    }
}

/// Accepted weights saved as F32 and loaded again are the same, bit for bit (so NaNs in the
/// fuzzed data do not matter). The saved bytes themselves are not compared: the `__metadata__`
/// map is written in `HashMap` order, which differs between two saves.
fn check_round_trip(weights: &Weights, origin: &Path) {
    let saved = weights
        .to_safetensors_bytes(StorageDtype::F32)
        .expect("accepted weights can be saved");
    let reloaded = Weights::from_safetensors_bytes(&saved, origin, Some(weights.config()))
        .expect("saved weights load again");
    let bits = |w: &Weights| -> Vec<(String, Vec<usize>, Vec<u32>)> {
        w.named_tensors()
            .into_iter()
            .map(|(name, shape, values)| {
                (name, shape, values.iter().map(|v| v.to_bits()).collect())
            })
            .collect()
    };
    assert!(
        bits(weights) == bits(&reloaded),
        "save/load changed the weights"
    );
}
