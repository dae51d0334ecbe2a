//! Dropout with a counter-based mask: element `i` of a call seeded with `seed` is kept when
//! `hash(seed, i) >= p * 2^32`. The same formula can run inside a GPU kernel, so the CPU and CUDA
//! backends draw the very same mask from the same seed.

use ndarray::{ArrayD, ArrayViewD};

use crate::config::DropoutMode;
use crate::error::{Error, Result};

/// Dropout with drop probability `p`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    pub p: f32,
    pub mode: DropoutMode,
}

impl Dropout {
    pub fn new(p: f32, mode: DropoutMode) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            return Err(Error::invalid(
                "dropout probability",
                format!("{p} is not in [0, 1)"),
            ));
        }
        Ok(Dropout { p, mode })
    }

    /// Training mode: each element is zeroed with probability `p` (a Bernoulli mask from
    /// `seed`); survivors are scaled by `1/(1-p)` (inverted) or kept as they are (classic).
    pub fn forward_train(&self, input: ArrayViewD<'_, f32>, seed: u64) -> ArrayD<f32> {
        let scale = match self.mode {
            DropoutMode::Inverted => 1.0 / (1.0 - self.p),
            DropoutMode::Classic => 1.0,
        };
        let threshold = self.threshold();
        let mut out = input.as_standard_layout().into_owned();
        for (i, v) in out.iter_mut().enumerate() {
            *v = if keep_draw(seed, i as u64) >= threshold {
                *v * scale
            } else {
                0.0
            };
        }
        out
    }

    /// The training-mode backward: the gradient goes through the very mask (and scale)
    /// [`Dropout::forward_train`] drew from `seed`; dropped elements pass none.
    pub fn backward_train(&self, grad_out: ArrayViewD<'_, f32>, seed: u64) -> ArrayD<f32> {
        // The forward is linear in its input for a fixed mask: its backward is itself.
        self.forward_train(grad_out, seed)
    }

    /// Inference mode: the identity (inverted) or a multiplication by `1 - p` (classic).
    pub fn forward_eval(&self, input: ArrayViewD<'_, f32>) -> ArrayD<f32> {
        match self.mode {
            DropoutMode::Inverted => input.to_owned(),
            DropoutMode::Classic => input.mapv(|v| v * (1.0 - self.p)),
        }
    }

    /// Draws below this value drop the element: `p` as a fraction of 2^32.
    fn threshold(&self) -> u32 {
        (self.p as f64 * 4_294_967_296.0).min(u32::MAX as f64) as u32
    }
}

/// The mask seed of the `layer`-th dropout layer (counting from 0 in network order) in a
/// training step seeded `step_seed`: distinct layers and steps draw unrelated masks.
pub fn layer_seed(step_seed: u64, layer: u64) -> u64 {
    let mut z = step_seed ^ layer.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform 32-bit draw for element `index` under `seed`: splitmix64's finaliser over a
/// combined counter. Cheap, stateless and identical on every device.
pub fn keep_draw(seed: u64, index: u64) -> u32 {
    let mut z = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(index)
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 32) as u32
}
