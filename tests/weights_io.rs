//! Safetensors load/save of `Weights`: round trips in every storage dtype, torchvision's names,
//! architecture detection, and every way a file can be wrong.
//!
//! Expected values never come from the code under test: shapes of the presets are written out
//! here, and f16/bf16 roundings come from the `half` crate or are worked out by hand.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use alexnet_cuda::config::{InputShape, LrnParams, PoolSpec};
use alexnet_cuda::weights::StorageDtype;
use alexnet_cuda::{AlexNetConfig, Error, Weights};
use safetensors::{Dtype, SafeTensors, View};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A small 5-conv/3-fc network: 3x99x99 input, channels 4-6-8-8-6, fc widths 16-16-10.
/// conv1 (k11 s4 p2) gives 24x24, pool 11x11, conv2 11x11, pool 5x5, conv3-5 5x5, pool 2x2:
/// 6*2*2 = 24 features into fc1.
fn tiny_config() -> AlexNetConfig {
    let mut config = AlexNetConfig::five_conv_three_fc("tiny", [4, 6, 8, 8, 6], None);
    config.input = InputShape {
        channels: 3,
        height: 99,
        width: 99,
    };
    for (fc, width) in config.fcs.iter_mut().zip([16, 16, 10]) {
        fc.out_features = width;
    }
    config.layers().expect("tiny config is well formed");
    config
}

/// The tiny config's tensors, written out by hand (crate names, PyTorch layout).
const TINY_SHAPES: [(&str, &[usize]); 16] = [
    ("conv1.weight", &[4, 3, 11, 11]),
    ("conv1.bias", &[4]),
    ("conv2.weight", &[6, 4, 5, 5]),
    ("conv2.bias", &[6]),
    ("conv3.weight", &[8, 6, 3, 3]),
    ("conv3.bias", &[8]),
    ("conv4.weight", &[8, 8, 3, 3]),
    ("conv4.bias", &[8]),
    ("conv5.weight", &[6, 8, 3, 3]),
    ("conv5.bias", &[6]),
    ("fc1.weight", &[16, 24]),
    ("fc1.bias", &[16]),
    ("fc2.weight", &[16, 16]),
    ("fc2.bias", &[16]),
    ("fc3.weight", &[10, 16]),
    ("fc3.bias", &[10]),
];

/// torchvision's `alexnet().state_dict()` names and shapes.
const TORCHVISION_STATE_DICT: [(&str, &[usize]); 16] = [
    ("features.0.weight", &[64, 3, 11, 11]),
    ("features.0.bias", &[64]),
    ("features.3.weight", &[192, 64, 5, 5]),
    ("features.3.bias", &[192]),
    ("features.6.weight", &[384, 192, 3, 3]),
    ("features.6.bias", &[384]),
    ("features.8.weight", &[256, 384, 3, 3]),
    ("features.8.bias", &[256]),
    ("features.10.weight", &[256, 256, 3, 3]),
    ("features.10.bias", &[256]),
    ("classifier.1.weight", &[4096, 9216]),
    ("classifier.1.bias", &[4096]),
    ("classifier.4.weight", &[4096, 4096]),
    ("classifier.4.bias", &[4096]),
    ("classifier.6.weight", &[1000, 4096]),
    ("classifier.6.bias", &[1000]),
];

/// The crate's names in network order.
const CRATE_NAMES: [&str; 16] = [
    "conv1.weight",
    "conv1.bias",
    "conv2.weight",
    "conv2.bias",
    "conv3.weight",
    "conv3.bias",
    "conv4.weight",
    "conv4.bias",
    "conv5.weight",
    "conv5.bias",
    "fc1.weight",
    "fc1.bias",
    "fc2.weight",
    "fc2.bias",
    "fc3.weight",
    "fc3.bias",
];

/// Conv shapes of the paper's network (96-256-384-384-256), crate names.
const PAPER_CONV_SHAPES: [(&str, &[usize]); 10] = [
    ("conv1.weight", &[96, 3, 11, 11]),
    ("conv1.bias", &[96]),
    ("conv2.weight", &[256, 96, 5, 5]),
    ("conv2.bias", &[256]),
    ("conv3.weight", &[384, 256, 3, 3]),
    ("conv3.bias", &[384]),
    ("conv4.weight", &[384, 384, 3, 3]),
    ("conv4.bias", &[384]),
    ("conv5.weight", &[256, 384, 3, 3]),
    ("conv5.bias", &[256]),
];

/// Values a few of which f16 and bf16 cannot hold exactly, ties, subnormals, overflow, -0.
const SPECIAL_VALUES: [f32; 10] = [
    0.0,
    -0.0,
    1.0 + 1.0 / 2048.0,   // f16 tie
    1.0 + 1.0 / 256.0,    // bf16 tie
    65519.0,              // rounds down to f16::MAX
    70000.0,              // f16 overflow
    1e-6,                 // f16 subnormal
    -3.0e-8,              // below f16's smallest subnormal
    std::f32::consts::PI, // needs all 24 bits
    1.0e30,               // far beyond f16, fine for bf16
];

/// Index-based values that differ across tensors and elements; weights start with the specials.
fn varied_value(tensor: usize, i: usize, is_weight: bool) -> f32 {
    if is_weight && i < SPECIAL_VALUES.len() {
        return SPECIAL_VALUES[i];
    }
    let x = (tensor * 7919 + i * 104_729) % 20_011;
    (x as f32 / 20_011.0 - 0.5) * (1.0 + tensor as f32 * 0.37)
}

fn varied_weights(config: &AlexNetConfig) -> Weights {
    Weights::from_fn(config, |tensor, name, shape| {
        let len: usize = shape.iter().product();
        let is_weight = name.ends_with(".weight");
        (0..len)
            .map(|i| varied_value(tensor, i, is_weight))
            .collect()
    })
    .expect("weights for a valid config")
}

/// One tensor of a hand-built safetensors file.
#[derive(Clone)]
struct Entry {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for Entry {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn f32_entry(name: &str, shape: &[usize], values: &[f32]) -> Entry {
    Entry {
        name: name.to_string(),
        dtype: Dtype::F32,
        shape: shape.to_vec(),
        bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// The weights' tensors as F32 entries under the crate's names, built without the code under test.
fn entries_of(weights: &Weights) -> Vec<Entry> {
    weights
        .named_tensors()
        .iter()
        .map(|(name, shape, values)| f32_entry(name, shape, values))
        .collect()
}

fn serialize(entries: Vec<Entry>) -> Vec<u8> {
    safetensors::serialize(entries.into_iter().map(|e| (e.name.clone(), e)), None)
        .expect("test file serializes")
}

fn write_file(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).expect("write test file");
    path
}

/// Asserts that the error's message names the file and (where given) the tensor.
fn assert_mentions(err: &Error, path: &Path, tensor: Option<&str>) {
    let message = err.to_string();
    assert!(
        message.contains(&path.display().to_string()),
        "message does not name the file {}: {message}",
        path.display()
    );
    if let Some(tensor) = tensor {
        assert!(
            message.contains(tensor),
            "message does not name tensor `{tensor}`: {message}"
        );
    }
}

/// Bitwise equality of every tensor, with `expect` mapping each original value to the stored one.
fn assert_values(loaded: &Weights, original: &Weights, expect: impl Fn(f32) -> f32) {
    let got = loaded.named_tensors();
    let want = original.named_tensors();
    assert_eq!(got.len(), want.len());
    for ((name, shape, values), (want_name, want_shape, want_values)) in got.iter().zip(&want) {
        assert_eq!(name, want_name);
        assert_eq!(shape, want_shape, "{name}");
        assert_eq!(values.len(), want_values.len(), "{name}");
        for (i, (&v, &w)) in values.iter().zip(want_values.iter()).enumerate() {
            let e = expect(w);
            assert_eq!(
                v.to_bits(),
                e.to_bits(),
                "{name}[{i}]: loaded {v}, expected {e} (from {w})"
            );
        }
    }
}

/// Loads `entries` as a file on disk with the tiny config and returns the error.
fn tiny_error(entries: Vec<Entry>) -> (Error, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_file(&dir, "tiny.safetensors", &serialize(entries));
    let err = Weights::load(&path, Some(&tiny_config())).expect_err("the file must be rejected");
    (err, path, dir)
}

/// A full-size or preset-sized file built from (name, shape) pairs, value = f(tensor, element).
fn preset_file(shapes: &[(&str, &[usize])], value: impl Fn(usize, usize) -> f32) -> Vec<u8> {
    let entries = shapes
        .iter()
        .enumerate()
        .map(|(t, (name, shape))| {
            let len: usize = shape.iter().product();
            let values: Vec<f32> = (0..len).map(|i| value(t, i)).collect();
            f32_entry(name, shape, &values)
        })
        .collect();
    serialize(entries)
}

// ---------------------------------------------------------------------------------------------
// Round trips
// ---------------------------------------------------------------------------------------------

#[test]
fn tiny_config_shapes_are_the_hand_written_ones() {
    let weights = varied_weights(&tiny_config());
    let got: Vec<(String, Vec<usize>)> = weights
        .named_tensors()
        .into_iter()
        .map(|(n, s, _)| (n, s))
        .collect();
    let want: Vec<(String, Vec<usize>)> = TINY_SHAPES
        .iter()
        .map(|(n, s)| (n.to_string(), s.to_vec()))
        .collect();
    assert_eq!(got, want);
}

#[test]
fn f32_round_trip_bytes_is_exact() {
    let config = tiny_config();
    let original = varied_weights(&config);
    let bytes = original.to_safetensors_bytes(StorageDtype::F32).unwrap();
    let loaded =
        Weights::from_safetensors_bytes(&bytes, Path::new("memory"), Some(&config)).unwrap();
    assert_eq!(loaded.config(), &config);
    assert_values(&loaded, &original, |x| x);
}

#[test]
fn f32_round_trip_file_is_exact() {
    let config = tiny_config();
    let original = varied_weights(&config);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    original.save(&path, StorageDtype::F32).unwrap();
    let loaded = Weights::load(&path, Some(&config)).unwrap();
    assert_values(&loaded, &original, |x| x);
    // The file on disk holds the same tensors as to_safetensors_bytes (the metadata's key order
    // may differ: safetensors writes it from a HashMap).
    let on_disk = std::fs::read(&path).unwrap();
    let in_memory = original.to_safetensors_bytes(StorageDtype::F32).unwrap();
    assert_eq!(on_disk.len(), in_memory.len());
    let (a, b) = (
        SafeTensors::deserialize(&on_disk).unwrap(),
        SafeTensors::deserialize(&in_memory).unwrap(),
    );
    for name in CRATE_NAMES {
        assert_eq!(a.tensor(name).unwrap(), b.tensor(name).unwrap(), "{name}");
    }
}

#[test]
fn f16_round_trip_rounds_like_half() {
    let config = tiny_config();
    let original = varied_weights(&config);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w16.safetensors");
    original.save(&path, StorageDtype::F16).unwrap();
    let loaded = Weights::load(&path, Some(&config)).unwrap();
    assert_values(&loaded, &original, |x| half::f16::from_f32(x).to_f32());

    let bytes = original.to_safetensors_bytes(StorageDtype::F16).unwrap();
    let loaded = Weights::from_safetensors_bytes(&bytes, Path::new("m"), Some(&config)).unwrap();
    assert_values(&loaded, &original, |x| half::f16::from_f32(x).to_f32());
}

#[test]
fn bf16_round_trip_rounds_like_half() {
    let config = tiny_config();
    let original = varied_weights(&config);
    let bytes = original.to_safetensors_bytes(StorageDtype::BF16).unwrap();
    let loaded = Weights::from_safetensors_bytes(&bytes, Path::new("m"), Some(&config)).unwrap();
    assert_values(&loaded, &original, |x| half::bf16::from_f32(x).to_f32());

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wbf16.safetensors");
    original.save(&path, StorageDtype::BF16).unwrap();
    let loaded = Weights::load(&path, Some(&config)).unwrap();
    assert_values(&loaded, &original, |x| half::bf16::from_f32(x).to_f32());
}

/// Rounding to nearest even, worked out by hand (not by the `half` crate).
#[test]
fn half_precision_rounds_to_nearest_even() {
    let config = tiny_config();
    let cases: [(StorageDtype, [f32; 4], [f32; 4]); 2] = [
        (
            StorageDtype::F16,
            // f16 has 10 mantissa bits: ulp(1) = 2^-10.
            [
                1.0 + 2f32.powi(-11),                  // tie -> even (1.0)
                1.0 + 2f32.powi(-11) + 2f32.powi(-13), // above the tie -> up
                1.0 + 3.0 * 2f32.powi(-11),            // tie between odd and even -> even (up)
                70000.0,                               // overflow -> inf
            ],
            [
                1.0,
                1.0 + 2f32.powi(-10),
                1.0 + 2f32.powi(-9),
                f32::INFINITY,
            ],
        ),
        (
            StorageDtype::BF16,
            // bf16 has 7 mantissa bits: ulp(1) = 2^-7, ulp(3) = 2^-6.
            [
                1.0 + 2f32.powi(-8),
                1.0 + 2f32.powi(-8) + 2f32.powi(-10),
                1.0 + 3.0 * 2f32.powi(-8),
                3.0 + 2f32.powi(-7),
            ],
            [1.0, 1.0 + 2f32.powi(-7), 1.0 + 2f32.powi(-6), 3.0],
        ),
    ];
    for (dtype, inputs, expected) in cases {
        let weights = Weights::from_fn(&config, |_, name, shape| {
            let len: usize = shape.iter().product();
            if name == "conv1.bias" {
                inputs.to_vec()
            } else {
                vec![0.25; len]
            }
        })
        .unwrap();
        let bytes = weights.to_safetensors_bytes(dtype).unwrap();
        let loaded =
            Weights::from_safetensors_bytes(&bytes, Path::new("m"), Some(&config)).unwrap();
        let got = loaded.convs()[0].bias.to_vec();
        assert_eq!(got, expected.to_vec(), "{dtype:?}");
    }
}

#[test]
fn saved_file_uses_crate_names_dtype_and_metadata() {
    let config = tiny_config();
    let weights = varied_weights(&config);
    for (dtype, tag, width) in [
        (StorageDtype::F32, Dtype::F32, 4),
        (StorageDtype::F16, Dtype::F16, 2),
        (StorageDtype::BF16, Dtype::BF16, 2),
    ] {
        let bytes = weights.to_safetensors_bytes(dtype).unwrap();
        let (_, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
        let info = metadata.metadata().as_ref().expect("metadata present");
        assert_eq!(info.get("format").map(String::as_str), Some("pt"));
        assert_eq!(info.get("config").map(String::as_str), Some("tiny"));
        let file = SafeTensors::deserialize(&bytes).unwrap();
        let mut names = file.names();
        names.sort_unstable();
        let mut want = CRATE_NAMES.to_vec();
        want.sort_unstable();
        assert_eq!(names, want);
        for (name, shape) in TINY_SHAPES {
            let view = file.tensor(name).unwrap();
            assert_eq!(view.dtype(), tag, "{name}");
            assert_eq!(view.shape(), shape, "{name}");
            assert_eq!(view.data().len(), shape.iter().product::<usize>() * width);
        }
        // Spot-check layout: conv2.weight[1, 2, 3, 4] at flat index ((1*4 + 2)*5 + 3)*5 + 4.
        let flat = ((4 + 2) * 5 + 3) * 5 + 4;
        let view = file.tensor("conv2.weight").unwrap();
        let stored = match dtype {
            StorageDtype::F32 => {
                let b = &view.data()[flat * 4..flat * 4 + 4];
                f32::from_le_bytes([b[0], b[1], b[2], b[3]])
            }
            StorageDtype::F16 => {
                let b = &view.data()[flat * 2..flat * 2 + 2];
                half::f16::from_le_bytes([b[0], b[1]]).to_f32()
            }
            StorageDtype::BF16 => {
                let b = &view.data()[flat * 2..flat * 2 + 2];
                half::bf16::from_le_bytes([b[0], b[1]]).to_f32()
            }
        };
        let original = weights.convs()[1].weight[[1, 2, 3, 4]];
        let rounded = match dtype {
            StorageDtype::F32 => original,
            StorageDtype::F16 => half::f16::from_f32(original).to_f32(),
            StorageDtype::BF16 => half::bf16::from_f32(original).to_f32(),
        };
        assert_eq!(stored.to_bits(), rounded.to_bits());
    }
}

#[test]
fn unaligned_buffer_loads() {
    let config = tiny_config();
    let original = varied_weights(&config);
    for dtype in [StorageDtype::F32, StorageDtype::F16, StorageDtype::BF16] {
        let bytes = original.to_safetensors_bytes(dtype).unwrap();
        let mut shifted = vec![0u8; bytes.len() + 1];
        shifted[1..].copy_from_slice(&bytes);
        let a = Weights::from_safetensors_bytes(&bytes, Path::new("m"), Some(&config)).unwrap();
        let b =
            Weights::from_safetensors_bytes(&shifted[1..], Path::new("m"), Some(&config)).unwrap();
        assert_values(&b, &a, |x| x);
    }
}

#[test]
fn tiny_file_under_torchvision_names_loads_with_explicit_config() {
    let config = tiny_config();
    let original = varied_weights(&config);
    let entries = entries_of(&original)
        .into_iter()
        .zip(TORCHVISION_STATE_DICT)
        .map(|(mut e, (tv_name, _))| {
            e.name = tv_name.to_string();
            e
        })
        .collect();
    let bytes = serialize(entries);
    let loaded = Weights::from_safetensors_bytes(&bytes, Path::new("tv"), Some(&config)).unwrap();
    assert_values(&loaded, &original, |x| x);
}

// ---------------------------------------------------------------------------------------------
// Full-size presets and architecture detection
// ---------------------------------------------------------------------------------------------

/// torchvision's pretrained state_dict layout, as `safetensors.torch.save_file` writes it.
#[test]
fn torchvision_state_dict_loads_and_is_detected() {
    // Value encodes the tensor and the element, exactly representable in f32.
    let value = |t: usize, i: usize| t as f32 * 1000.0 + (i % 1000) as f32 * 0.5;
    let bytes = preset_file(&TORCHVISION_STATE_DICT, value);
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(&dir, "alexnet-owt.safetensors", &bytes);
    drop(bytes);
    let weights = Weights::load(&path, None).unwrap();

    let config = weights.config();
    assert_eq!(config.name, "torchvision");
    let channels: Vec<usize> = config.convs.iter().map(|c| c.out_channels).collect();
    assert_eq!(channels, [64, 192, 384, 256, 256]);
    assert!(config.convs.iter().all(|c| c.lrn.is_none()));
    let widths: Vec<usize> = config.fcs.iter().map(|f| f.out_features).collect();
    assert_eq!(widths, [4096, 4096, 1000]);
    assert_eq!(weights.param_count(), 61_100_840);

    // Each crate tensor holds the torchvision tensor at the same position of the state_dict.
    for (t, (name, shape, values)) in weights.named_tensors().iter().enumerate() {
        assert_eq!(name, CRATE_NAMES[t]);
        assert_eq!(shape.as_slice(), TORCHVISION_STATE_DICT[t].1, "{name}");
        for (i, &v) in values.iter().enumerate() {
            if v != value(t, i) {
                panic!("{name}[{i}] = {v}, expected {}", value(t, i));
            }
        }
    }
    // And the typed accessors agree: fc3.bias[999] came from classifier.6.bias.
    assert_eq!(weights.fcs()[2].bias[999], 15.0 * 1000.0 + 999.0 * 0.5);
    assert_eq!(weights.convs()[4].weight[[0, 0, 0, 1]], 8.0 * 1000.0 + 0.5);
}

#[test]
fn paper_shapes_are_detected_as_paper_with_lrn() {
    let shapes: Vec<(&str, &[usize])> = PAPER_CONV_SHAPES
        .iter()
        .copied()
        .chain([
            ("fc1.weight", &[4096usize, 9216][..]),
            ("fc1.bias", &[4096][..]),
            ("fc2.weight", &[4096, 4096][..]),
            ("fc2.bias", &[4096][..]),
            ("fc3.weight", &[1000, 4096][..]),
            ("fc3.bias", &[1000][..]),
        ])
        .collect();
    let bytes = preset_file(&shapes, |t, i| (t * 10 + i % 7) as f32);
    let weights = Weights::from_safetensors_bytes(&bytes, Path::new("paper"), None).unwrap();
    assert_eq!(weights.config(), &AlexNetConfig::paper());
    let config = weights.config();
    assert_eq!(config.convs[0].lrn, Some(LrnParams::PAPER));
    assert_eq!(config.convs[1].lrn, Some(LrnParams::PAPER));
    assert!(config.convs[2..].iter().all(|c| c.lrn.is_none()));
    assert_eq!(weights.param_count(), 62_378_344);
    assert_eq!(weights.convs()[3].bias[5], (7 * 10 + 5) as f32);
}

/// torchvision trunk with a fine-tuned 512-256-10 head, crate names, stored as f16.
#[test]
fn ten_class_head_and_fc_widths_are_read_from_the_file() {
    let shapes: Vec<(&str, &[usize])> = TORCHVISION_STATE_DICT[..10]
        .iter()
        .copied()
        .zip(CRATE_NAMES)
        .map(|((_, shape), name)| (name, shape))
        .chain([
            ("fc1.weight", &[512usize, 9216][..]),
            ("fc1.bias", &[512][..]),
            ("fc2.weight", &[256, 512][..]),
            ("fc2.bias", &[256][..]),
            ("fc3.weight", &[10, 256][..]),
            ("fc3.bias", &[10][..]),
        ])
        .collect();
    let entries = shapes
        .iter()
        .map(|(name, shape)| {
            let len: usize = shape.iter().product();
            // Small integers: exact in f16.
            let bytes = (0..len)
                .flat_map(|i| half::f16::from_f32((i % 64) as f32).to_le_bytes())
                .collect();
            Entry {
                name: name.to_string(),
                dtype: Dtype::F16,
                shape: shape.to_vec(),
                bytes,
            }
        })
        .collect();
    let bytes = serialize(entries);
    let weights = Weights::from_safetensors_bytes(&bytes, Path::new("ft"), None).unwrap();
    let config = weights.config();
    assert_eq!(config.convs, AlexNetConfig::torchvision().convs);
    assert_eq!(config.num_classes(), 10);
    let widths: Vec<usize> = config.fcs.iter().map(|f| f.out_features).collect();
    assert_eq!(widths, [512, 256, 10]);
    assert_eq!(
        weights.fcs()[2].bias.to_vec(),
        (0..10).map(|i| i as f32).collect::<Vec<_>>()
    );
    assert_eq!(weights.fcs()[0].weight[[1, 3]], ((9216 + 3) % 64) as f32);
}

#[test]
fn unknown_channels_without_config_ask_for_one() {
    let bytes = varied_weights(&tiny_config())
        .to_safetensors_bytes(StorageDtype::F32)
        .unwrap();
    let path = Path::new("/models/tiny.safetensors");
    let err = Weights::from_safetensors_bytes(&bytes, path, None).unwrap_err();
    assert!(matches!(err, Error::Architecture { .. }), "{err:?}");
    assert_mentions(&err, path, None);
    let message = err.to_string();
    assert!(message.contains("[4, 6, 8, 8, 6]"), "{message}");
    assert!(message.contains("explicit"), "{message}");
}

#[test]
fn explicit_config_that_disagrees_is_a_shape_error() {
    let bytes = varied_weights(&tiny_config())
        .to_safetensors_bytes(StorageDtype::F32)
        .unwrap();
    let mut other = tiny_config();
    other.name = "other".into();
    other.convs[4].out_channels = 7;
    let path = Path::new("tiny.safetensors");
    let err = Weights::from_safetensors_bytes(&bytes, path, Some(&other)).unwrap_err();
    match &err {
        Error::TensorShape {
            name,
            expected,
            found,
            ..
        } => {
            assert_eq!(name, "conv5.weight");
            assert_eq!(expected, &[7, 8, 3, 3]);
            assert_eq!(found, &[6, 8, 3, 3]);
        }
        other => panic!("expected TensorShape, got {other:?}"),
    }
    assert_mentions(&err, path, Some("conv5.weight"));

    // A different head: 10 classes in the file, 12 in the config.
    let mut twelve = tiny_config();
    twelve.fcs[2].out_features = 12;
    let err = Weights::from_safetensors_bytes(&bytes, path, Some(&twelve)).unwrap_err();
    assert!(
        matches!(&err, Error::TensorShape { name, .. } if name == "fc3.weight"),
        "{err:?}"
    );
}

#[test]
fn paper_file_with_torchvision_config_names_both() {
    // Paper trunk with a small head, so the file stays small.
    let shapes: Vec<(&str, &[usize])> = PAPER_CONV_SHAPES
        .iter()
        .copied()
        .chain([
            ("fc1.weight", &[16usize, 9216][..]),
            ("fc1.bias", &[16][..]),
            ("fc2.weight", &[16, 16][..]),
            ("fc2.bias", &[16][..]),
            ("fc3.weight", &[10, 16][..]),
            ("fc3.bias", &[10][..]),
        ])
        .collect();
    let bytes = preset_file(&shapes, |t, i| (t + i % 3) as f32);
    let path = Path::new("paper-small.safetensors");
    let err = Weights::from_safetensors_bytes(&bytes, path, Some(&AlexNetConfig::torchvision()))
        .unwrap_err();
    assert!(matches!(err, Error::Architecture { .. }), "{err:?}");
    assert_mentions(&err, path, None);
    let message = err.to_string();
    assert!(
        message.contains("paper") && message.contains("torchvision"),
        "{message}"
    );

    // The same file without a config is detected as the paper's trunk with the small head.
    let weights = Weights::from_safetensors_bytes(&bytes, path, None).unwrap();
    assert_eq!(weights.config().convs, AlexNetConfig::paper().convs);
    assert_eq!(weights.config().num_classes(), 10);
}

// ---------------------------------------------------------------------------------------------
// Errors in the tensors
// ---------------------------------------------------------------------------------------------

fn tiny_entries() -> Vec<Entry> {
    entries_of(&varied_weights(&tiny_config()))
}

#[test]
fn missing_tensor_names_it_and_its_shape() {
    let mut entries = tiny_entries();
    entries.retain(|e| e.name != "fc2.bias");
    let (err, path, _dir) = tiny_error(entries);
    match &err {
        Error::MissingTensor {
            path: p,
            name,
            expected,
        } => {
            assert_eq!(p, &path);
            assert_eq!(name, "fc2.bias");
            assert_eq!(expected, &[16]);
        }
        other => panic!("expected MissingTensor, got {other:?}"),
    }
    assert_mentions(&err, &path, Some("fc2.bias"));
    assert!(err.to_string().contains("[16]"));
}

#[test]
fn missing_tensor_is_reported_after_detection() {
    // Detection still works from the other conv layers; the missing one is named with its shape.
    let mut bytes_entries = Vec::new();
    for (t, (name, shape)) in TORCHVISION_STATE_DICT[..10].iter().enumerate() {
        if *name == "features.6.weight" {
            continue;
        }
        let len: usize = shape.iter().product();
        bytes_entries.push(f32_entry(name, shape, &vec![t as f32; len]));
    }
    for (name, shape) in [("fc1.weight", &[3usize, 9216][..]), ("fc1.bias", &[3][..])]
        .into_iter()
        .chain([
            ("fc2.weight", &[3usize, 3][..]),
            ("fc2.bias", &[3][..]),
            ("fc3.weight", &[2, 3][..]),
            ("fc3.bias", &[2][..]),
        ])
    {
        let len: usize = shape.iter().product();
        bytes_entries.push(f32_entry(name, shape, &vec![0.5; len]));
    }
    let bytes = serialize(bytes_entries);
    let path = Path::new("no-conv3.safetensors");
    let err = Weights::from_safetensors_bytes(&bytes, path, None).unwrap_err();
    match &err {
        Error::MissingTensor { name, expected, .. } => {
            assert_eq!(name, "conv3.weight");
            assert_eq!(expected, &[384, 192, 3, 3]);
        }
        other => panic!("expected MissingTensor, got {other:?}"),
    }
    assert_mentions(&err, path, Some("conv3.weight"));
}

#[test]
fn unexpected_tensor_is_not_dropped() {
    let mut entries = tiny_entries();
    entries.push(f32_entry("fc4.weight", &[3, 10], &[0.0; 30]));
    let (err, path, _dir) = tiny_error(entries);
    match &err {
        Error::UnexpectedTensor {
            name,
            shape,
            config,
            ..
        } => {
            assert_eq!(name, "fc4.weight");
            assert_eq!(shape, &[3, 10]);
            assert_eq!(config, "tiny");
        }
        other => panic!("expected UnexpectedTensor, got {other:?}"),
    }
    assert_mentions(&err, &path, Some("fc4.weight"));

    // Something PyTorch might leave in a state_dict, in a non-float dtype.
    let mut entries = tiny_entries();
    entries.push(Entry {
        name: "features.1.num_batches_tracked".into(),
        dtype: Dtype::I64,
        shape: vec![],
        bytes: 7i64.to_le_bytes().to_vec(),
    });
    let (err, path, _dir) = tiny_error(entries);
    assert!(matches!(err, Error::UnexpectedTensor { .. }), "{err:?}");
    assert_mentions(&err, &path, Some("features.1.num_batches_tracked"));
}

#[test]
fn torchvision_names_do_not_apply_to_other_skeletons() {
    // Four convolutions: `features.10` (torchvision's conv5) has no meaning here.
    let mut config = tiny_config();
    config.name = "four-conv".into();
    config.convs.truncate(4);
    config.convs[3].pool = Some(PoolSpec::OVERLAPPING);
    config.layers().expect("four-conv config is well formed");
    let weights = varied_weights(&config);
    let mut entries = entries_of(&weights);
    for e in &mut entries {
        if e.name == "conv1.weight" {
            e.name = "features.0.weight".into();
        }
    }
    let bytes = serialize(entries);
    let path = Path::new("four.safetensors");
    let err = Weights::from_safetensors_bytes(&bytes, path, Some(&config)).unwrap_err();
    assert!(
        matches!(&err, Error::UnexpectedTensor { name, config, .. }
            if name == "features.0.weight" && config == "four-conv"),
        "{err:?}"
    );
    assert_mentions(&err, path, Some("features.0.weight"));
}

#[test]
fn wrong_shape_names_expected_and_found() {
    let mut entries = tiny_entries();
    for e in &mut entries {
        if e.name == "conv2.weight" {
            e.shape = vec![4, 6, 5, 5]; // same element count, transposed O and I
        }
    }
    let (err, path, _dir) = tiny_error(entries);
    match &err {
        Error::TensorShape {
            name,
            expected,
            found,
            ..
        } => {
            assert_eq!(name, "conv2.weight");
            assert_eq!(expected, &[6, 4, 5, 5]);
            assert_eq!(found, &[4, 6, 5, 5]);
        }
        other => panic!("expected TensorShape, got {other:?}"),
    }
    assert_mentions(&err, &path, Some("conv2.weight"));
    let message = err.to_string();
    assert!(
        message.contains("[6, 4, 5, 5]") && message.contains("[4, 6, 5, 5]"),
        "{message}"
    );
}

#[test]
fn unsupported_dtypes_are_named() {
    for (target, dtype, width, tag) in [
        ("conv3.bias", Dtype::F64, 8, "F64"),
        ("fc1.bias", Dtype::I32, 4, "I32"),
        ("conv1.weight", Dtype::U8, 1, "U8"),
    ] {
        let mut entries = tiny_entries();
        for e in &mut entries {
            if e.name == target {
                let len: usize = e.shape.iter().product();
                e.dtype = dtype;
                e.bytes = vec![0; len * width];
            }
        }
        let (err, path, _dir) = tiny_error(entries);
        match &err {
            Error::TensorDtype { name, found, .. } => {
                assert_eq!(name, target);
                assert_eq!(found, tag);
            }
            other => panic!("expected TensorDtype for {target}, got {other:?}"),
        }
        assert_mentions(&err, &path, Some(target));
        assert!(err.to_string().contains(tag));
    }
}

#[test]
fn both_spellings_of_one_parameter_are_rejected() {
    let mut entries = tiny_entries();
    let mut twin = entries[0].clone();
    assert_eq!(twin.name, "conv1.weight");
    twin.name = "features.0.weight".into();
    entries.push(twin);
    let (err, path, _dir) = tiny_error(entries);
    assert!(matches!(err, Error::Architecture { .. }), "{err:?}");
    assert_mentions(&err, &path, Some("conv1.weight"));
    assert_mentions(&err, &path, Some("features.0.weight"));
}

// ---------------------------------------------------------------------------------------------
// Corrupt files
// ---------------------------------------------------------------------------------------------

/// Loads raw bytes from a file on disk; asserts WeightsFormat naming the file.
fn assert_format_error(bytes: &[u8], file_name: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(&dir, file_name, bytes);
    for config in [None, Some(&tiny_config())] {
        let err = Weights::load(&path, config).unwrap_err();
        assert!(
            matches!(&err, Error::WeightsFormat { path: p, .. } if p == &path),
            "{file_name}: expected WeightsFormat, got {err:?}"
        );
        assert_mentions(&err, &path, None);
    }
    Weights::load(&path, None).unwrap_err().to_string()
}

#[test]
fn truncated_file_is_a_format_error() {
    let bytes = varied_weights(&tiny_config())
        .to_safetensors_bytes(StorageDtype::F32)
        .unwrap();
    let message = assert_format_error(&bytes[..bytes.len() / 2], "half.safetensors");
    assert!(message.contains("truncated"), "{message}");

    // Extra bytes after the last tensor are also refused.
    let mut longer = bytes.clone();
    longer.extend_from_slice(&[0; 3]);
    let message = assert_format_error(&longer, "longer.safetensors");
    assert!(message.contains("3 unexpected bytes"), "{message}");
}

#[test]
fn every_truncation_is_a_format_error() {
    let bytes = varied_weights(&tiny_config())
        .to_safetensors_bytes(StorageDtype::F16)
        .unwrap();
    let config = tiny_config();
    let path = Path::new("cut.safetensors");
    for len in 0..bytes.len() {
        match Weights::from_safetensors_bytes(&bytes[..len], path, Some(&config)) {
            Err(Error::WeightsFormat { .. }) => {}
            other => panic!("cut at {len}: expected WeightsFormat, got {other:?}"),
        }
    }
}

#[test]
fn corrupt_header_bytes_never_panic() {
    let bytes = varied_weights(&tiny_config())
        .to_safetensors_bytes(StorageDtype::F32)
        .unwrap();
    let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let config = tiny_config();
    let mut rejected = 0;
    for i in 0..header_end {
        for replacement in [b'9', b'"', b'}', 0xff] {
            let mut corrupt = bytes.clone();
            corrupt[i] = replacement;
            for config in [None, Some(&config)] {
                let result = Weights::from_safetensors_bytes(&corrupt, Path::new("c"), config);
                rejected += result.is_err() as usize;
            }
        }
    }
    // Most corruptions must be caught (some land in padding or change a value harmlessly).
    assert!(
        rejected > header_end * 4,
        "only {rejected} corrupt headers rejected"
    );
}

#[test]
fn garbage_bytes_are_a_format_error() {
    assert_format_error(
        b"this is a text file that happens to be named .safetensors\n",
        "garbage.safetensors",
    );
}

#[test]
fn bad_header_json_is_a_format_error() {
    let mut bytes = 9u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{not json");
    assert_format_error(&bytes, "json.safetensors");
}

#[test]
fn offsets_out_of_range_are_a_format_error() {
    let header = br#"{"conv1.bias":{"dtype":"F32","shape":[4],"data_offsets":[0,1000]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0u8; 16]);
    let message = assert_format_error(&bytes, "offsets.safetensors");
    assert!(message.contains("conv1.bias"), "{message}");

    // Offsets that disagree with shape x dtype.
    let header = br#"{"conv1.bias":{"dtype":"F32","shape":[8],"data_offsets":[0,16]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0u8; 16]);
    let message = assert_format_error(&bytes, "info.safetensors");
    assert!(message.contains("conv1.bias"), "{message}");

    // A shape whose element count overflows.
    let header =
        br#"{"conv1.bias":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,16]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0u8; 16]);
    let message = assert_format_error(&bytes, "overflow.safetensors");
    assert!(message.contains("conv1.bias"), "{message}");
}

#[test]
fn empty_file_is_a_format_error() {
    assert_format_error(b"", "empty.safetensors");
}

#[test]
fn header_length_of_ten_gigabytes_is_a_format_error() {
    let mut bytes = 10_000_000_000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    let message = assert_format_error(&bytes, "huge.safetensors");
    assert!(message.contains("10000000000"), "{message}");

    // Just under safetensors' own limit, but still far past the end of the file.
    let mut bytes = 99_999_999u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    assert_format_error(&bytes, "long.safetensors");
}

#[test]
fn nonexistent_path_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("does-not-exist.safetensors");
    let err = Weights::load(&path, None).unwrap_err();
    match &err {
        Error::Io { path: p, source } => {
            assert_eq!(p, &path);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected Io, got {other:?}"),
    }
    assert_mentions(&err, &path, None);
}

#[test]
fn save_into_missing_directory_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-dir").join("w.safetensors");
    let err = varied_weights(&tiny_config())
        .save(&path, StorageDtype::F32)
        .unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert_mentions(&err, &path, None);
}

/// A zero-element tensor can claim an absurd width without holding any data; the size
/// arithmetic must turn that into an error, not an overflow.
#[test]
fn absurd_zero_element_widths_are_errors_not_overflows() {
    let huge = 1usize << 62;
    let shapes: Vec<(String, Vec<usize>)> = AlexNetConfig::paper()
        .parameter_shapes()
        .unwrap()
        .into_iter()
        .map(|(name, shape)| match name.as_str() {
            "fc1.weight" => (name, vec![huge, 0]),
            "fc1.bias" => (name, vec![0]),
            "fc2.weight" => (name, vec![4096, 0]),
            _ => (name, shape),
        })
        .collect();
    let borrowed: Vec<(&str, &[usize])> = shapes
        .iter()
        .map(|(n, s)| (n.as_str(), s.as_slice()))
        .collect();
    let bytes = preset_file(&borrowed, |_, _| 0.5);
    let origin = Path::new("absurd.safetensors");
    let err = Weights::from_safetensors_bytes(&bytes, origin, None).unwrap_err();
    assert!(
        err.to_string().contains("absurd.safetensors") || matches!(err, Error::Invalid { .. }),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Errors that name the real problem
// ---------------------------------------------------------------------------------------------

#[test]
fn a_transposed_linear_weight_is_named_with_the_real_expectation() {
    // With an explicit config: fc1 is [16, 24] stored as [24, 16].
    let mut entries = tiny_entries();
    for e in &mut entries {
        if e.name == "fc1.weight" {
            e.shape = vec![24, 16];
        }
    }
    let (err, _path, _dir) = tiny_error(entries);
    match &err {
        Error::TensorShape {
            name,
            expected,
            found,
            hint,
            ..
        } => {
            assert_eq!(
                (name.as_str(), expected.as_slice(), found.as_slice()),
                ("fc1.weight", &[16, 24][..], &[24, 16][..])
            );
            assert!(
                hint.as_deref().is_some_and(|h| h.contains("transposed")),
                "{err}"
            );
        }
        other => panic!("expected TensorShape, got {other:?}"),
    }
}

#[test]
fn a_transposed_fc_in_a_real_file_is_reported_against_the_other_tensors() {
    // torchvision's state dict with fc3 stored [4096, 1000]: the widths are read off the tensors
    // that agree, so the expectation is [1000, 4096], not [4096, 4096].
    let mut shapes = TORCHVISION_STATE_DICT;
    shapes[14].1 = &[4096, 1000];
    let bytes = preset_file(&shapes, |_, _| 0.25);
    let err =
        Weights::from_safetensors_bytes(&bytes, Path::new("t.safetensors"), None).unwrap_err();
    match &err {
        Error::TensorShape {
            expected,
            found,
            hint,
            ..
        } => {
            assert_eq!(
                (expected.as_slice(), found.as_slice()),
                (&[1000, 4096][..], &[4096, 1000][..]),
                "{err}"
            );
            assert!(
                hint.as_deref().is_some_and(|h| h.contains("transposed")),
                "{err}"
            );
            assert!(err.to_string().contains("classifier.6.weight"), "{err}");
        }
        other => panic!("expected TensorShape, got {other:?}"),
    }
}

#[test]
fn hwio_conv_weights_are_recognised() {
    // Without a config: only conv1, in TensorFlow's HWIO layout.
    let bytes = serialize(vec![f32_entry(
        "features.0.weight",
        &[11, 11, 3, 64],
        &vec![0.5; 11 * 11 * 3 * 64],
    )]);
    let err =
        Weights::from_safetensors_bytes(&bytes, Path::new("keras.safetensors"), None).unwrap_err();
    assert!(matches!(err, Error::Architecture { .. }), "{err:?}");
    assert!(err.to_string().contains("HWIO"), "{err}");
    // With one: the shape error says the same.
    let mut entries = tiny_entries();
    for e in &mut entries {
        if e.name == "conv2.weight" {
            e.shape = vec![5, 5, 4, 6];
        }
    }
    let (err, _path, _dir) = tiny_error(entries);
    assert!(err.to_string().contains("HWIO"), "{err}");
}

#[test]
fn a_data_parallel_state_dict_loads() {
    let weights = varied_weights(&tiny_config());
    let mut entries = entries_of(&weights);
    for e in &mut entries {
        e.name = format!("module.{}", e.name);
    }
    let bytes = serialize(entries);
    let loaded =
        Weights::from_safetensors_bytes(&bytes, Path::new("dp.safetensors"), Some(&tiny_config()))
            .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(loaded, weights);
}

#[test]
fn messages_without_a_config_name_the_cli_flag() {
    let bytes = varied_weights(&tiny_config())
        .to_safetensors_bytes(StorageDtype::F32)
        .unwrap();
    let err =
        Weights::from_safetensors_bytes(&bytes, Path::new("tiny.safetensors"), None).unwrap_err();
    assert!(err.to_string().contains("--config"), "{err}");
}

#[test]
#[cfg(target_os = "linux")]
fn an_endless_stream_is_refused_at_once() {
    let started = std::time::Instant::now();
    let err = Weights::load("/dev/zero", None).unwrap_err();
    assert!(matches!(err, Error::WeightsFormat { .. }), "{err:?}");
    assert!(
        started.elapsed().as_secs() < 5,
        "it read for {:?}",
        started.elapsed()
    );
}
