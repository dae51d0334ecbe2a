//! Stochastic gradient descent with momentum and weight decay, the paper's optimiser.

use rayon::prelude::*;

use crate::cpu::Gradients;
use crate::error::{Error, Result};

/// How momentum, weight decay and the learning rate combine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UpdateRule {
    /// `torch.optim.SGD` (dampening 0, no Nesterov): `v = m v + (g + wd w)`, `w -= lr v`.
    #[default]
    PyTorch,
    /// The paper's section 5: `v = m v - wd lr w - lr g`, `w += v` (the learning rate inside
    /// the velocity, so changing it affects only later steps).
    Paper,
}

/// The optimiser's settings. [`Default`] is the paper's: learning rate 0.01, momentum 0.9,
/// weight decay 5e-4 on every parameter, PyTorch's update rule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdConfig {
    pub learning_rate: f32,
    pub momentum: f32,
    pub weight_decay: f32,
    pub rule: UpdateRule,
    /// Whether weight decay applies to biases too (PyTorch's default over all parameters).
    pub decay_biases: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig {
            learning_rate: 0.01,
            momentum: 0.9,
            weight_decay: 5e-4,
            rule: UpdateRule::PyTorch,
            decay_biases: true,
        }
    }
}

impl SgdConfig {
    fn check(&self) -> Result<()> {
        let finite_non_negative = |v: f32| v.is_finite() && v >= 0.0;
        if !finite_non_negative(self.learning_rate)
            || !finite_non_negative(self.momentum)
            || !finite_non_negative(self.weight_decay)
        {
            return Err(Error::invalid(
                "SGD settings",
                format!(
                    "learning rate {}, momentum {} and weight decay {} must be finite and >= 0",
                    self.learning_rate, self.momentum, self.weight_decay
                ),
            ));
        }
        Ok(())
    }
}

/// SGD with one momentum buffer per parameter tensor (zeros until the first step).
#[derive(Clone, Debug, PartialEq)]
pub struct Sgd {
    config: SgdConfig,
    velocity: Vec<Vec<f32>>,
}

/// Elements per task of the update (the update is memory bound: large chunks).
const UPDATE_CHUNK: usize = 1 << 16;

impl Sgd {
    pub fn new(config: SgdConfig) -> Result<Self> {
        config.check()?;
        Ok(Sgd {
            config,
            velocity: Vec::new(),
        })
    }

    pub fn config(&self) -> &SgdConfig {
        &self.config
    }

    /// A new learning rate for the following steps (the schedule's divisions by 10).
    pub fn set_learning_rate(&mut self, learning_rate: f32) -> Result<()> {
        let config = SgdConfig {
            learning_rate,
            ..self.config
        };
        config.check()?;
        self.config = config;
        Ok(())
    }

    /// The momentum buffers, one per parameter tensor in network order (empty before the
    /// first step): what a checkpoint keeps.
    pub fn velocity(&self) -> &[Vec<f32>] {
        &self.velocity
    }

    /// Restores momentum buffers saved from [`Sgd::velocity`].
    pub fn set_velocity(&mut self, velocity: Vec<Vec<f32>>) {
        self.velocity = velocity;
    }

    /// One update of `params` (network order, as [`crate::cpu::CpuModel::parameters_mut`]
    /// gives them) by `grads` (the same order and lengths).
    pub fn step(&mut self, mut params: Vec<&mut [f32]>, grads: &Gradients) -> Result<()> {
        let lengths_match = params.len() == grads.tensors.len()
            && params
                .iter()
                .zip(&grads.tensors)
                .all(|(p, g)| p.len() == g.values.len());
        if !lengths_match {
            return Err(Error::invalid(
                "SGD step",
                "the gradients do not match the parameters (count or length)",
            ));
        }
        // The first step starts the momentum at its first term, as torch.optim.SGD does (and
        // without reading the fresh buffers: see the CPU GEMM's note on zeroed allocations).
        let first_step = self.velocity.is_empty();
        if first_step {
            self.velocity = params.iter().map(|p| vec![0.0; p.len()]).collect();
        }
        let velocity_matches = self.velocity.len() == params.len()
            && self
                .velocity
                .iter()
                .zip(&params)
                .all(|(v, p)| v.len() == p.len());
        if !velocity_matches {
            return Err(Error::invalid(
                "SGD step",
                "the momentum buffers belong to another network",
            ));
        }
        let SgdConfig {
            learning_rate: lr,
            momentum: m,
            weight_decay,
            rule,
            decay_biases,
        } = self.config;
        for ((w, g), v) in params
            .iter_mut()
            .zip(&grads.tensors)
            .zip(&mut self.velocity)
        {
            let wd = if decay_biases || !g.name.ends_with(".bias") {
                weight_decay
            } else {
                0.0
            };
            w.par_chunks_mut(UPDATE_CHUNK)
                .zip(g.values.par_chunks(UPDATE_CHUNK))
                .zip(v.par_chunks_mut(UPDATE_CHUNK))
                .for_each(|((w, g), v)| {
                    for ((w, &g), v) in w.iter_mut().zip(g).zip(v) {
                        let previous = if first_step { 0.0 } else { *v };
                        match rule {
                            UpdateRule::PyTorch => {
                                *v = m * previous + (g + wd * *w);
                                *w -= lr * *v;
                            }
                            UpdateRule::Paper => {
                                *v = m * previous - wd * lr * *w - lr * g;
                                *w += *v;
                            }
                        }
                    }
                });
        }
        Ok(())
    }
}
