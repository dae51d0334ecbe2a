//! Arbitrary bytes into the safetensors weights loader, without a config (architecture
//! detection) and with a tiny explicit config. Must never panic, abort, hang or allocate without
//! bound.
#![no_main]

use std::sync::OnceLock;

use alexnet_cuda::AlexNetConfig;
use alexnet_cuda_fuzz::{load_both_ways, tiny_config};
use libfuzzer_sys::fuzz_target;

static TINY: OnceLock<AlexNetConfig> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    load_both_ways(data, TINY.get_or_init(tiny_config));
});
