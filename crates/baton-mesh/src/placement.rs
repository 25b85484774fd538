//! Which node serves which layers: pure data computed from the cluster description (and, later,
//! from the live membership), so it can change at run time.

use std::ops::Range;

use crate::config::{ClusterConfig, PlacementMode};

/// One pipeline: its stages in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pipeline {
    pub stages: Vec<(String, Range<usize>)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub pipelines: Vec<Pipeline>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("{nodes} nodes cannot split {layers} layers (each node needs at least one)")]
    TooFewLayers { nodes: usize, layers: usize },
    #[error("no capacity to place layers on")]
    NoCapacity,
}

/// Splits `num_layers` in proportion to `capacity` (largest remainder, at least one layer per
/// node), in the given order.
pub fn split_layers(num_layers: usize, capacity: &[f64]) -> Result<Vec<Range<usize>>, PlacementError> {
    let n = capacity.len();
    if n == 0 || capacity.iter().any(|c| !(c.is_finite() && *c > 0.0)) {
        return Err(PlacementError::NoCapacity);
    }
    if num_layers < n {
        return Err(PlacementError::TooFewLayers { nodes: n, layers: num_layers });
    }
    // Largest remainder on the proportional shares, then at least one layer per node.
    let total: f64 = capacity.iter().sum();
    let shares: Vec<f64> = capacity.iter().map(|c| num_layers as f64 * c / total).collect();
    let mut counts: Vec<usize> = shares.iter().map(|s| s.floor() as usize).collect();
    let mut left = num_layers.saturating_sub(counts.iter().sum::<usize>());
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| (shares[b] - shares[b].floor()).total_cmp(&(shares[a] - shares[a].floor())).then(a.cmp(&b)));
    for &i in order.iter().cycle() {
        if left == 0 {
            break;
        }
        counts[i] += 1;
        left -= 1;
    }
    while let Some(empty) = counts.iter().position(|&c| c == 0) {
        let (largest, _) = counts.iter().enumerate().max_by_key(|(i, c)| (**c, std::cmp::Reverse(*i))).unwrap_or((0, &0));
        counts[largest] -= 1;
        counts[empty] += 1;
    }
    let mut start = 0;
    Ok(counts
        .into_iter()
        .map(|c| {
            let r = start..start + c;
            start += c;
            r
        })
        .collect())
}

/// The placement a cluster description asks for, for a model of `num_layers`.
pub fn plan(config: &ClusterConfig, num_layers: usize) -> Result<Placement, PlacementError> {
    let mut pipelines = Vec::with_capacity(config.replicas);
    for r in 0..config.replicas {
        let nodes: Vec<_> = config.nodes.iter().filter(|n| n.replica == r).collect();
        let stages = match config.mode {
            PlacementMode::Explicit => {
                let mut s: Vec<(String, Range<usize>)> = nodes.iter().filter_map(|n| n.layers.clone().map(|l| (n.name.clone(), l))).collect();
                s.sort_by_key(|(_, l)| l.start);
                s
            }
            PlacementMode::Auto => {
                let caps: Vec<f64> = nodes.iter().map(|n| n.memory_bytes as f64).collect();
                split_layers(num_layers, &caps)?.into_iter().zip(&nodes).map(|(l, n)| (n.name.clone(), l)).collect()
            }
        };
        pipelines.push(Pipeline { stages });
    }
    Ok(Placement { pipelines })
}

/// Bytes of one transformer layer's weights as stored (attention, MLP, norms), for how many
/// layers a node's memory holds.
pub fn layer_bytes(mc: &baton_engine::ModelConfig) -> u64 {
    let (h, q, kv) = (mc.hidden_size as u64, (mc.num_heads * mc.head_dim) as u64, (mc.num_kv_heads * mc.head_dim) as u64);
    let params = h * q * 2 + h * kv * 2 + 3 * h * mc.intermediate_size as u64 + 2 * h;
    let bytes_per = match mc.torch_dtype.as_deref() {
        Some("float32") => 4,
        _ => 2,
    };
    params * bytes_per
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proportional_contiguous_and_complete() {
        assert_eq!(split_layers(30, &[1.0, 1.0, 1.0]).unwrap(), vec![0..10, 10..20, 20..30]);
        assert_eq!(split_layers(30, &[2.0, 1.0, 1.0]).unwrap(), vec![0..15, 15..23, 23..30]);
        assert_eq!(split_layers(3, &[100.0, 1.0, 1.0]).unwrap(), vec![0..1, 1..2, 2..3]);
        assert_eq!(split_layers(2, &[1.0, 1.0, 1.0]), Err(PlacementError::TooFewLayers { nodes: 3, layers: 2 }));
        // Many random shapes: contiguous, complete, at least one layer each.
        let mut seed = 7u64;
        for _ in 0..2000 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let n = 1 + (seed >> 33) as usize % 8;
            let layers = n + (seed >> 40) as usize % 100;
            let caps: Vec<f64> = (0..n).map(|i| 1.0 + ((seed >> (i * 3)) % 16) as f64).collect();
            let r = split_layers(layers, &caps).unwrap();
            assert_eq!(r.first().unwrap().start, 0);
            assert_eq!(r.last().unwrap().end, layers);
            assert!(r.windows(2).all(|w| w[0].end == w[1].start));
            assert!(r.iter().all(|x| !x.is_empty()));
        }
    }
}
