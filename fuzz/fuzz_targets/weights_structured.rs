//! Plausible safetensors files built from structured fuzz input: a JSON header whose tensors
//! carry the real parameter names (the crate's `conv1.weight` ... `fc3.bias` and torchvision's
//! `features.0.weight` ... `classifier.6.bias`), any dtype, shapes that are right, nearly right
//! or absurd (zeros, huge dims), data offsets that are consistent, skewed or raw, then the data.
//! This reaches the name/shape/dtype/offset checks that random bytes rarely get past.
#![no_main]

use std::sync::OnceLock;

use alexnet_cuda::AlexNetConfig;
use alexnet_cuda_fuzz::{load_both_ways, tiny_config};
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

/// torchvision's module paths for conv1..conv5, fc1..fc3.
const TORCHVISION_MODULES: [&str; 8] = [
    "features.0",
    "features.3",
    "features.6",
    "features.8",
    "features.10",
    "classifier.1",
    "classifier.4",
    "classifier.6",
];

/// Every dtype tag safetensors knows, and two it does not.
const DTYPES: [&str; 24] = [
    "F32",
    "F16",
    "BF16",
    "F64",
    "I32",
    "U8",
    "I8",
    "I16",
    "U16",
    "U32",
    "I64",
    "U64",
    "BOOL",
    "F4",
    "F6_E2M3",
    "F6_E3M2",
    "F8_E5M2",
    "F8_E4M3",
    "F8_E8M0",
    "F8_E4M3FNUZ",
    "F8_E5M2FNUZ",
    "C64",
    "F128",
    "f32",
];

/// Bits per element of `DTYPES[i]` (0 for the unknown tags).
fn dtype_bits(i: usize) -> u64 {
    match DTYPES[i] {
        "F64" | "I64" | "U64" | "C64" => 64,
        "F32" | "I32" | "U32" => 32,
        "F16" | "BF16" | "I16" | "U16" => 16,
        "F6_E2M3" | "F6_E3M2" => 6,
        "F4" => 4,
        "F128" | "f32" => 0,
        _ => 8,
    }
}

/// The most data bytes a generated file gets, so the harness itself stays small.
const MAX_DATA: u64 = 256 * 1024;

#[derive(Arbitrary, Debug)]
struct File {
    tensors: Vec<Tensor>,
    metadata: Option<Vec<(String, String)>>,
    header_len: HeaderLen,
    /// Spaces after the JSON (safetensors pads headers to 8 bytes this way).
    padding: u8,
    /// Repeated to fill the data section.
    payload: Vec<u8>,
    tail: Tail,
}

#[derive(Arbitrary, Debug)]
struct Tensor {
    name: Name,
    dtype: u8,
    shape: Shape,
    offsets: Offsets,
}

#[derive(Arbitrary, Debug)]
enum Name {
    /// The crate's name of parameter `i % 16`.
    Crate(u8),
    /// torchvision's name of parameter `i % 16`.
    Torchvision(u8),
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Shape {
    /// The tiny config's shape for this name.
    Expected,
    /// The paper's (`true`) or torchvision's shape for this name.
    Preset(bool),
    /// The expected shape with one dimension replaced.
    Mutated(u8, Dim),
    Custom(Vec<Dim>),
}

#[derive(Arbitrary, Debug)]
enum Dim {
    Small(u8),
    Zero,
    PowerOfTwo(u8),
    Raw(u64),
}

#[derive(Arbitrary, Debug)]
enum Offsets {
    /// Right after the previous tensor, as long as the shape and dtype need.
    Consistent,
    /// `Consistent`, each end moved.
    Skewed(i16, i16),
    Raw(u64, u64),
}

#[derive(Arbitrary, Debug)]
enum HeaderLen {
    Exact,
    Off(i16),
    Raw(u64),
}

#[derive(Arbitrary, Debug)]
enum Tail {
    Exact,
    Truncated(u16),
    Extra(u8),
}

impl Dim {
    fn value(&self) -> u64 {
        match *self {
            Dim::Small(n) => n.into(),
            Dim::Zero => 0,
            Dim::PowerOfTwo(p) => 1u64.checked_shl(p.into()).unwrap_or(u64::MAX),
            Dim::Raw(n) => n,
        }
    }
}

/// (file name, crate name) of the 16 parameters, and the tiny config.
struct Names {
    config: AlexNetConfig,
    crate_names: Vec<String>,
    torchvision_names: Vec<String>,
}

static NAMES: OnceLock<Names> = OnceLock::new();

fn names() -> &'static Names {
    NAMES.get_or_init(|| {
        let config = tiny_config();
        let crate_names = config
            .parameter_shapes()
            .unwrap()
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        let torchvision_names = TORCHVISION_MODULES
            .iter()
            .flat_map(|m| [format!("{m}.weight"), format!("{m}.bias")])
            .collect();
        Names {
            config,
            crate_names,
            torchvision_names,
        }
    })
}

/// The shape `config` wants for parameter `index` (empty when it has none).
fn shape_in(config: &AlexNetConfig, index: usize) -> Vec<u64> {
    let shapes = config.parameter_shapes().unwrap();
    shapes
        .get(index)
        .map(|(_, s)| s.iter().map(|&d| d as u64).collect())
        .unwrap_or_default()
}

impl File {
    fn to_bytes(&self) -> Vec<u8> {
        let names = names();
        let mut header = String::from("{");
        let mut entries = Vec::new();
        if let Some(metadata) = &self.metadata {
            let map: serde_json::Map<_, _> = metadata
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str())))
                .collect();
            entries.push(format!(
                "\"__metadata__\":{}",
                serde_json::Value::Object(map)
            ));
        }
        let mut offset = 0u64;
        let mut data_end = 0u64;
        for t in self.tensors.iter().take(40) {
            let (name, index) = match &t.name {
                Name::Crate(i) => (
                    names.crate_names[*i as usize % 16].clone(),
                    *i as usize % 16,
                ),
                Name::Torchvision(i) => (
                    names.torchvision_names[*i as usize % 16].clone(),
                    *i as usize % 16,
                ),
                Name::Other(s) => (s.clone(), usize::MAX),
            };
            let expected = shape_in(&names.config, index);
            let shape: Vec<u64> = match &t.shape {
                Shape::Expected => expected,
                Shape::Preset(paper) => {
                    let preset = if *paper {
                        AlexNetConfig::paper()
                    } else {
                        AlexNetConfig::torchvision()
                    };
                    shape_in(&preset, index)
                }
                Shape::Mutated(i, dim) => {
                    let mut shape = expected;
                    if !shape.is_empty() {
                        let i = *i as usize % shape.len();
                        shape[i] = dim.value();
                    }
                    shape
                }
                Shape::Custom(dims) => dims.iter().take(8).map(Dim::value).collect(),
            };
            let dtype = t.dtype as usize % DTYPES.len();
            let bits = shape
                .iter()
                .try_fold(dtype_bits(dtype), |acc, &d| acc.checked_mul(d));
            let bytes = bits.map_or(u64::MAX, |b| b.div_ceil(8));
            let (start, end) = match t.offsets {
                Offsets::Consistent => (offset, offset.saturating_add(bytes)),
                Offsets::Skewed(a, b) => (
                    offset.saturating_add_signed(a.into()),
                    offset.saturating_add(bytes).saturating_add_signed(b.into()),
                ),
                Offsets::Raw(a, b) => (a, b),
            };
            offset = end;
            data_end = data_end.max(end);
            let name = serde_json::Value::from(name);
            let dims: Vec<String> = shape.iter().map(u64::to_string).collect();
            entries.push(format!(
                "{name}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{start},{end}]}}",
                DTYPES[dtype],
                dims.join(",")
            ));
        }
        header.push_str(&entries.join(","));
        header.push('}');
        for _ in 0..self.padding % 16 {
            header.push(' ');
        }
        let n = header.len() as u64;
        let claimed = match self.header_len {
            HeaderLen::Exact => n,
            HeaderLen::Off(d) => n.saturating_add_signed(d.into()),
            HeaderLen::Raw(n) => n,
        };
        let data_len = match self.tail {
            Tail::Exact => data_end,
            Tail::Truncated(k) => data_end.saturating_sub(k.into()),
            Tail::Extra(k) => data_end.saturating_add(k.into()),
        }
        .min(MAX_DATA) as usize;
        let mut file = Vec::with_capacity(8 + header.len() + data_len);
        file.extend_from_slice(&claimed.to_le_bytes());
        file.extend_from_slice(header.as_bytes());
        if self.payload.is_empty() {
            file.resize(file.len() + data_len, 0);
        } else {
            file.extend(self.payload.iter().cycle().take(data_len));
        }
        file
    }
}

fuzz_target!(|file: File| {
    let bytes = file.to_bytes();
    load_both_ways(&bytes, &names().config);
});
