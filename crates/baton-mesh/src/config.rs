//! cluster.toml: parsed, then validated with errors that name the key.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A problem in cluster.toml, naming the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: `{key}`: {message}")]
    Key { path: PathBuf, key: String, message: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    cluster: RawCluster,
    model: RawModel,
    #[serde(default)]
    tls: Option<RawTls>,
    #[serde(default)]
    placement: Option<RawPlacement>,
    #[serde(default)]
    routing: Option<RawRouting>,
    #[serde(default)]
    nodes: Vec<RawNode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouting {
    policy: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    path: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    dir: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlacement {
    mode: String,
    #[serde(default)]
    replicas: Option<usize>,
    #[serde(default)]
    rebalance: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: String,
    control: String,
    #[serde(default)]
    http: Option<String>,
    #[serde(default)]
    quic: Option<String>,
    #[serde(default)]
    devices: Option<Vec<String>>,
    memory_gb: f64,
    #[serde(default)]
    layers: Option<String>,
    #[serde(default)]
    replica: Option<usize>,
}

/// How layers are assigned to nodes.
#[derive(Debug, Clone, PartialEq)]
pub enum PlacementMode {
    /// Split in proportion to each node's memory budget.
    Auto,
    /// Each node's `layers` as written.
    Explicit,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NodeConfig {
    pub name: String,
    pub control: SocketAddr,
    pub http: Option<SocketAddr>,
    pub quic: Option<SocketAddr>,
    pub devices: Vec<String>,
    pub memory_bytes: u64,
    pub layers: Option<Range<usize>>,
    pub replica: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    pub name: String,
    /// A model directory, or `demo:PRESET`.
    pub model: String,
    /// Where `baton cluster init` writes and nodes read the cluster's certificates.
    pub tls_dir: PathBuf,
    pub mode: PlacementMode,
    pub replicas: usize,
    /// `placement.rebalance` (default true): the head moves layers between the nodes of its
    /// plan by their measured speed. Off, layers move only when nodes join, leave or fail.
    pub rebalance: bool,
    /// `routing.policy`: how entry nodes choose a replica's head (`cache_aware`, the default,
    /// or `least_loaded`).
    pub routing: crate::routing::RoutingPolicy,
    pub nodes: Vec<NodeConfig>,
}

/// Node names become certificate DNS names: letters, digits and inner hyphens.
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

fn parse_range(s: &str) -> Option<Range<usize>> {
    let (a, b) = s.split_once("..")?;
    let (a, b) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (a < b).then_some(a..b)
}

impl ClusterConfig {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.to_path_buf(), source })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: Raw = toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string() })?;
        let err = |key: String, message: String| ConfigError::Key { path: path.to_path_buf(), key, message };
        if raw.cluster.name.trim().is_empty() {
            return Err(err("cluster.name".into(), "must not be empty".into()));
        }
        if raw.nodes.is_empty() {
            return Err(err("nodes".into(), "at least one [[nodes]] entry is required".into()));
        }
        let (mode, replicas) = match &raw.placement {
            None => (PlacementMode::Auto, 1),
            Some(p) => {
                let mode = match p.mode.as_str() {
                    "auto" => PlacementMode::Auto,
                    "explicit" => PlacementMode::Explicit,
                    other => return Err(err("placement.mode".into(), format!("{other:?} is not `auto` or `explicit`"))),
                };
                (mode, p.replicas.unwrap_or(1))
            }
        };
        if replicas == 0 || replicas > raw.nodes.len() {
            return Err(err("placement.replicas".into(), format!("{replicas} replicas need between 1 and {} nodes", raw.nodes.len())));
        }
        let addr = |key: String, v: &str| v.parse::<SocketAddr>().map_err(|_| err(key, format!("{v:?} is not HOST:PORT")));
        let mut names = HashSet::new();
        let mut controls = HashSet::new();
        let mut nodes = Vec::with_capacity(raw.nodes.len());
        for (i, n) in raw.nodes.iter().enumerate() {
            let key = |k: &str| format!("nodes[{i}].{k}");
            if !valid_node_name(&n.name) {
                return Err(err(key("name"), format!("{:?} must be letters, digits and inner hyphens (it becomes a certificate name)", n.name)));
            }
            if !names.insert(n.name.clone()) {
                return Err(err(key("name"), format!("node {:?} is named twice", n.name)));
            }
            let control = addr(key("control"), &n.control)?;
            if !controls.insert(control) {
                return Err(err(key("control"), format!("{control} is used by another node")));
            }
            if !(n.memory_gb.is_finite() && n.memory_gb > 0.0) {
                return Err(err(key("memory_gb"), "must be a positive number".into()));
            }
            let layers = match (&n.layers, &mode) {
                (Some(l), PlacementMode::Explicit) => {
                    Some(parse_range(l).ok_or_else(|| err(key("layers"), format!("{l:?} is not START..END with START < END")))?)
                }
                (None, PlacementMode::Explicit) => return Err(err(key("layers"), "is required with `placement.mode = \"explicit\"`".into())),
                (Some(_), PlacementMode::Auto) => return Err(err(key("layers"), "is only allowed with `placement.mode = \"explicit\"`".into())),
                (None, PlacementMode::Auto) => None,
            };
            let replica = n.replica.unwrap_or(0);
            if replica >= replicas {
                return Err(err(key("replica"), format!("{replica} is not below placement.replicas = {replicas}")));
            }
            nodes.push(NodeConfig {
                name: n.name.clone(),
                control,
                http: n.http.as_deref().map(|v| addr(key("http"), v)).transpose()?,
                quic: n.quic.as_deref().map(|v| addr(key("quic"), v)).transpose()?,
                devices: n.devices.clone().unwrap_or_else(|| vec!["cpu".into()]),
                memory_bytes: (n.memory_gb * (1u64 << 30) as f64) as u64,
                layers,
                replica,
            });
        }
        if mode == PlacementMode::Explicit {
            // Within each replica the ranges must chain from 0 without gap or overlap.
            for r in 0..replicas {
                let mut ranges: Vec<(usize, &NodeConfig)> = nodes.iter().enumerate().filter(|(_, n)| n.replica == r).collect();
                if ranges.is_empty() {
                    return Err(err("placement.replicas".into(), format!("replica {r} has no node")));
                }
                ranges.sort_by_key(|(_, n)| n.layers.as_ref().map_or(0, |l| l.start));
                let mut next = 0;
                for (i, n) in ranges {
                    let l = n.layers.clone().unwrap_or(0..0);
                    if l.start != next {
                        let what = if l.start < next { "overlaps the previous range" } else { "leaves a gap before it" };
                        return Err(err(format!("nodes[{i}].layers"), format!("{}..{} {what} (replica {r} covers 0..{next} so far)", l.start, l.end)));
                    }
                    next = l.end;
                }
            }
        }
        let tls_dir = raw.tls.map_or_else(|| PathBuf::from("cluster-tls"), |t| PathBuf::from(t.dir));
        let tls_dir = if tls_dir.is_relative() { path.parent().unwrap_or(Path::new(".")).join(tls_dir) } else { tls_dir };
        let rebalance = raw.placement.as_ref().and_then(|p| p.rebalance).unwrap_or(true);
        let routing = match raw.routing.as_ref().map(|r| r.policy.as_str()) {
            None | Some("cache_aware") => crate::routing::RoutingPolicy::CacheAware,
            Some("least_loaded") => crate::routing::RoutingPolicy::LeastLoaded,
            Some(other) => return Err(err("routing.policy".into(), format!("{other:?} is not a routing policy (cache_aware, least_loaded)"))),
        };
        Ok(ClusterConfig { name: raw.cluster.name, model: raw.model.path, tls_dir, mode, replicas, rebalance, routing, nodes })
    }

    pub fn node(&self, name: &str) -> Option<&NodeConfig> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Checks explicit layer ranges against the model's layer count.
    pub fn check_layers(&self, path: &Path, num_layers: usize) -> Result<(), ConfigError> {
        if self.mode != PlacementMode::Explicit {
            return Ok(());
        }
        for r in 0..self.replicas {
            let end = self.nodes.iter().filter(|n| n.replica == r).filter_map(|n| n.layers.as_ref().map(|l| l.end)).max().unwrap_or(0);
            if end != num_layers {
                return Err(ConfigError::Key {
                    path: path.to_path_buf(),
                    key: "nodes.layers".into(),
                    message: format!("replica {r} covers layers 0..{end}, the model has {num_layers}"),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[cluster]
name = "demo"
[model]
path = "demo:tiny"
[placement]
mode = "explicit"
[[nodes]]
name = "node-a"
control = "127.0.0.1:7101"
memory_gb = 1
layers = "0..2"
[[nodes]]
name = "node-b"
control = "127.0.0.1:7102"
memory_gb = 2
layers = "2..4"
"#;

    fn parse(text: &str) -> Result<ClusterConfig, String> {
        ClusterConfig::parse(Path::new("cluster.toml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn a_good_file_parses() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.nodes.len(), 2);
        assert_eq!(c.nodes[1].layers, Some(2..4));
        assert!(c.check_layers(Path::new("cluster.toml"), 4).is_ok());
        assert!(c.check_layers(Path::new("cluster.toml"), 6).unwrap_err().to_string().contains("0..4"));
        assert!(c.rebalance, "layers move by measured speed unless placement.rebalance = false");
        assert!(!parse(&GOOD.replace("mode = \"explicit\"", "mode = \"explicit\"\nrebalance = false")).unwrap().rebalance);
        let bad = parse(&GOOD.replace("mode = \"explicit\"", "mode = \"explicit\"\nrebalance = \"no\"")).unwrap_err();
        assert!(bad.contains("rebalance"), "{bad}");
        assert_eq!(c.routing, crate::routing::RoutingPolicy::CacheAware, "cache-aware routing unless told otherwise");
        let load = parse(&format!("{GOOD}\n[routing]\npolicy = \"least_loaded\"\n")).unwrap();
        assert_eq!(load.routing, crate::routing::RoutingPolicy::LeastLoaded);
        let bad = parse(&format!("{GOOD}\n[routing]\npolicy = \"random\"\n")).unwrap_err();
        assert!(bad.contains("routing.policy") && bad.contains("random"), "{bad}");
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (GOOD.replace("node-b", "node-a"), "`nodes[1].name`", "named twice"),
            (GOOD.replace("127.0.0.1:7102", "localhost"), "`nodes[1].control`", "HOST:PORT"),
            (GOOD.replace("127.0.0.1:7102", "127.0.0.1:7101"), "`nodes[1].control`", "another node"),
            (GOOD.replace("\"2..4\"", "\"1..4\""), "layers`", "overlaps"),
            (GOOD.replace("\"2..4\"", "\"3..4\""), "layers`", "gap"),
            (GOOD.replace("\"2..4\"", "\"4..2\""), "`nodes[1].layers`", "START..END"),
            (GOOD.replace("memory_gb = 2", "memory_gb = 0"), "`nodes[1].memory_gb`", "positive"),
            (GOOD.replace("node-b", "node_b!"), "`nodes[1].name`", "letters"),
            (GOOD.replace("explicit", "magic"), "`placement.mode`", "magic"),
            (GOOD.replace("memory_gb = 1\n", "memory_gb = 1\ncolour = 3\n"), "colour", "unknown field"),
            (GOOD.replace("[model]\npath = \"demo:tiny\"\n", ""), "model", "missing"),
        ];
        for (text, key, what) in cases {
            let e = parse(&text).unwrap_err();
            assert!(e.contains("cluster.toml") && e.contains(key) && e.contains(what), "{e}");
        }
    }
}

#[cfg(test)]
mod checked_in {
    use super::*;

    #[test]
    fn the_repository_cluster_toml_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../cluster.toml");
        let c = ClusterConfig::from_file(&path).unwrap();
        assert_eq!(c.nodes.len(), 3);
        let p = crate::placement::plan(&c, 30).unwrap();
        assert_eq!(p.pipelines[0].stages.iter().map(|s| s.1.clone()).collect::<Vec<_>>(), vec![0..10, 10..20, 20..30]);
    }
}
