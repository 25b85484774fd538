//! Rotary position embedding frequencies, computed in f32 the way Hugging Face computes them.

use crate::config::{ModelConfig, RopeScaling};

/// Inverse frequencies for the `head_dim / 2` rotary pairs, scaling already applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    pub inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(config: &ModelConfig) -> Self {
        let dim = config.head_dim;
        let base = config.rope_theta;
        let mut inv_freq: Vec<f32> = (0..dim / 2)
            .map(|i| 1.0f32 / base.powf((2 * i) as f32 / dim as f32))
            .collect();
        match config.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old_len = original_max_position_embeddings as f32;
                let low_freq_wavelen = old_len / low_freq_factor;
                let high_freq_wavelen = old_len / high_freq_factor;
                for f in &mut inv_freq {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    if wavelen > low_freq_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_freq_wavelen {
                        let smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
        }
        Rope { inv_freq }
    }

    /// Appends `cos` and `sin` of every rotary pair at `pos` to the tables.
    pub fn push_position(&self, pos: usize, cos: &mut Vec<f32>, sin: &mut Vec<f32>) {
        let p = pos as f32;
        for &f in &self.inv_freq {
            let angle = f * p;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
}
