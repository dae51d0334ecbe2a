//! Every kernel the Rust side launches, with the module (`.cu` file) it lives in and the
//! parameters its launcher passes. Launchers look kernels up through this table, and
//! `tests/ptx_kernels.rs` checks the compiled PTX against it (names, parameter count, sizes), so
//! a kernel and its launcher cannot disagree silently.

use std::mem::size_of;

use super::abi::*;

/// One kernel parameter as the launcher passes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Param {
    /// A device pointer (`.u64` in PTX).
    Ptr,
    /// A struct passed by value, of this many bytes (`.b8 name[size]` in PTX).
    Struct(usize),
}

/// A kernel: its `.cu` module (file stem under `kernels/`), its `extern "C"` name and parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelSpec {
    pub module: &'static str,
    pub name: &'static str,
    pub params: &'static [Param],
}

const fn spec(module: &'static str, name: &'static str, params: &'static [Param]) -> KernelSpec {
    KernelSpec {
        module,
        name,
        params,
    }
}

use Param::{Ptr, Struct};

const PREPARE: &[Param] = &[Ptr, Ptr, Struct(size_of::<AlexnetPrepareParams>())];
const BIAS_ACT: &[Param] = &[Ptr, Ptr, Struct(size_of::<AlexnetBiasActParams>())];
const DROPOUT: &[Param] = &[Ptr, Struct(size_of::<AlexnetDropoutParams>())];
const CONVERT: &[Param] = &[Ptr, Ptr, Struct(size_of::<AlexnetConvertParams>())];
const LRN: &[Param] = &[Ptr, Ptr, Struct(size_of::<AlexnetLrnParams>())];
const POOL: &[Param] = &[Ptr, Ptr, Struct(size_of::<AlexnetPoolParams>())];
const SOFTMAX: &[Param] = &[
    Ptr,
    Ptr,
    Ptr,
    Ptr,
    Struct(size_of::<AlexnetSoftmaxParams>()),
];

/// The `.cu` modules, in build order.
pub const MODULES: &[&str] = &["prepare", "elementwise", "lrn", "pool", "softmax"];

/// All kernels.
pub const KERNELS: &[KernelSpec] = &[
    spec("prepare", "prepare_input_f32", PREPARE),
    spec("prepare", "prepare_input_f16", PREPARE),
    spec("elementwise", "bias_act_f32", BIAS_ACT),
    spec("elementwise", "bias_act_f16", BIAS_ACT),
    spec("elementwise", "dropout_f32", DROPOUT),
    spec("elementwise", "dropout_f16", DROPOUT),
    spec("elementwise", "convert_f32_to_f16", CONVERT),
    spec("elementwise", "convert_f16_to_f32", CONVERT),
    spec("lrn", "lrn_f32", LRN),
    spec("lrn", "lrn_f16", LRN),
    spec("pool", "maxpool_f32", POOL),
    spec("pool", "maxpool_f16", POOL),
    spec("softmax", "softmax_topk_f32", SOFTMAX),
    spec("softmax", "softmax_topk_f16", SOFTMAX),
];

/// The spec of kernel `name`.
pub fn kernel(name: &str) -> Option<&'static KernelSpec> {
    KERNELS.iter().find(|k| k.name == name)
}
