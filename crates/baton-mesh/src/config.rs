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
    /// A host name that does not resolve (yet: in Kubernetes a pod's name resolves only once
    /// the pod exists, so a node may try again).
    #[error("{path}: `{key}`: {message}")]
    Unresolved { path: PathBuf, key: String, message: String },
}

enum Unresolvable {
    Malformed,
    Dns(String),
}

/// `IP:PORT`, or `HOST:PORT` resolved now (its first IPv4 address, else its first): a
/// StatefulSet's stable pod names, a Slurm node's name.
fn resolve(v: &str) -> Result<SocketAddr, Unresolvable> {
    if let Ok(a) = v.parse::<SocketAddr>() {
        return Ok(a);
    }
    let (host, port) = v.rsplit_once(':').ok_or(Unresolvable::Malformed)?;
    let valid_host = !host.is_empty() && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if !valid_host || port.parse::<u16>().is_err() {
        return Err(Unresolvable::Malformed);
    }
    use std::net::ToSocketAddrs;
    let all: Vec<SocketAddr> = v.to_socket_addrs().map_err(|e| Unresolvable::Dns(e.to_string()))?.collect();
    all.iter().find(|a| a.is_ipv4()).or(all.first()).copied().ok_or_else(|| Unresolvable::Dns("no address".into()))
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
    autoscale: Option<RawAutoscale>,
    #[serde(default)]
    nodes: Vec<RawNode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAutoscale {
    min_replicas: Option<usize>,
    max_replicas: Option<usize>,
    waiting_per_replica: Option<f64>,
    queue_time_up_s: Option<f64>,
    queue_time_down_s: Option<f64>,
    kv_usage_up: Option<f64>,
    kv_usage_down: Option<f64>,
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
    /// `[autoscale]`: the bounds and thresholds of `baton:desired_replicas`.
    pub autoscale: AutoscaleConfig,
    pub nodes: Vec<NodeConfig>,
}

/// `[autoscale]`: `min_replicas` (default `placement.replicas`), `max_replicas` (default 16) and
/// the policy's thresholds (`baton_mesh::autoscale::Thresholds`' defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct AutoscaleConfig {
    pub min_replicas: usize,
    pub max_replicas: usize,
    pub thresholds: crate::autoscale::Thresholds,
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

fn autoscale_config(raw: Option<&RawAutoscale>, replicas: usize) -> Result<AutoscaleConfig, (&'static str, String)> {
    let mut th = crate::autoscale::Thresholds::default();
    let Some(a) = raw else {
        return Ok(AutoscaleConfig { min_replicas: replicas, max_replicas: 16.max(replicas), thresholds: th });
    };
    let min = a.min_replicas.unwrap_or(replicas);
    if min == 0 {
        return Err(("min_replicas", "must be at least 1".into()));
    }
    let max = a.max_replicas.unwrap_or(16.max(min));
    if max < min {
        return Err(("max_replicas", format!("{max} is below min_replicas = {min}")));
    }
    let positive = |key: &'static str, v: Option<f64>, default: f64| match v {
        Some(v) if !(v.is_finite() && v > 0.0) => Err((key, format!("{v} must be a positive number"))),
        Some(v) => Ok(v),
        None => Ok(default),
    };
    let fraction = |key: &'static str, v: Option<f64>, default: f64| match v {
        Some(v) if !(v > 0.0 && v <= 1.0) => Err((key, format!("{v} must be a fraction in (0, 1]"))),
        Some(v) => Ok(v),
        None => Ok(default),
    };
    th.waiting_per_replica = positive("waiting_per_replica", a.waiting_per_replica, th.waiting_per_replica)?;
    th.queue_time_up = std::time::Duration::from_secs_f64(positive("queue_time_up_s", a.queue_time_up_s, th.queue_time_up.as_secs_f64())?);
    th.queue_time_down = std::time::Duration::from_secs_f64(positive("queue_time_down_s", a.queue_time_down_s, th.queue_time_down.as_secs_f64())?);
    th.kv_usage_up = fraction("kv_usage_up", a.kv_usage_up, th.kv_usage_up)?;
    th.kv_usage_down = fraction("kv_usage_down", a.kv_usage_down, th.kv_usage_down)?;
    if th.queue_time_down > th.queue_time_up {
        return Err(("queue_time_down_s", "must not exceed queue_time_up_s".into()));
    }
    if th.kv_usage_down > th.kv_usage_up {
        return Err(("kv_usage_down", "must not exceed kv_usage_up".into()));
    }
    Ok(AutoscaleConfig { min_replicas: min, max_replicas: max, thresholds: th })
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
        let addr = |key: String, v: &str| resolve(v).map_err(|e| match e {
            Unresolvable::Malformed => err(key, format!("{v:?} is not HOST:PORT")),
            Unresolvable::Dns(message) => ConfigError::Unresolved { path: path.to_path_buf(), key, message: format!("cannot resolve {v:?}: {message}") },
        });
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
        let autoscale = autoscale_config(raw.autoscale.as_ref(), replicas).map_err(|(key, message)| err(format!("autoscale.{key}"), message))?;
        Ok(ClusterConfig { name: raw.cluster.name, model: raw.model.path, tls_dir, mode, replicas, rebalance, routing, autoscale, nodes })
    }

    /// A Prometheus configuration scraping `/metrics` of every node with an `http` address,
    /// each target labelled with its node's name and replica (`baton cluster prometheus`).
    /// Nodes that join later are not in the file: add them, or use service discovery.
    pub fn prometheus_config(&self, scrape_interval_s: u32) -> String {
        use std::fmt::Write;
        let mut out = format!(
            "# Prometheus scraping cluster `{}` (written by `baton cluster prometheus`).\nglobal:\n  scrape_interval: {scrape_interval_s}s\n  evaluation_interval: {scrape_interval_s}s\nscrape_configs:\n  - job_name: baton\n    metrics_path: /metrics\n    static_configs:\n",
            self.name
        );
        for n in self.nodes.iter().filter(|n| n.http.is_some()) {
            let http = n.http.map(|a| a.to_string()).unwrap_or_default();
            let _ = write!(out, "      - targets: [\"{http}\"]\n        labels:\n          node: \"{}\"\n          replica: \"{}\"\n", n.name, n.replica);
        }
        out
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
    fn host_names_resolve_and_unknown_ones_say_so() {
        let c = parse(&GOOD.replace("127.0.0.1:7102", "localhost:7102")).unwrap();
        assert!(c.nodes[1].control.ip().is_loopback() && c.nodes[1].control.port() == 7102, "{:?}", c.nodes[1].control);
        let e = ClusterConfig::parse(Path::new("cluster.toml"), &GOOD.replace("127.0.0.1:7102", "no-such-host.invalid:7102")).unwrap_err();
        assert!(matches!(e, ConfigError::Unresolved { .. }), "{e}");
        assert!(e.to_string().contains("nodes[1].control") && e.to_string().contains("no-such-host.invalid"), "{e}");
        for bad in ["localhost:", "local host:80", ":80", "localhost:99999"] {
            let e = parse(&GOOD.replace("127.0.0.1:7102", bad)).unwrap_err();
            assert!(e.contains("HOST:PORT"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_prometheus_config_scrapes_every_node_with_http() {
        let c = parse(&GOOD.replace("memory_gb = 1\n", "memory_gb = 1\nhttp = \"127.0.0.1:8080\"\n")).unwrap();
        let text = c.prometheus_config(1);
        assert!(text.contains("scrape_interval: 1s"), "{text}");
        assert!(text.contains("- targets: [\"127.0.0.1:8080\"]\n        labels:\n          node: \"node-a\""), "{text}");
        assert!(!text.contains("node-b"), "node-b has no http address: {text}");
    }

    #[test]
    fn autoscale_bounds_and_thresholds() {
        let c = parse(GOOD).unwrap();
        assert_eq!((c.autoscale.min_replicas, c.autoscale.max_replicas), (1, 16));
        assert_eq!(c.autoscale.thresholds, crate::autoscale::Thresholds::default());
        let c = parse(&format!("{GOOD}\n[autoscale]\nmin_replicas = 2\nmax_replicas = 4\nwaiting_per_replica = 5\nqueue_time_up_s = 2.5\nkv_usage_down = 0.25\n")).unwrap();
        assert_eq!((c.autoscale.min_replicas, c.autoscale.max_replicas), (2, 4));
        assert_eq!(c.autoscale.thresholds.waiting_per_replica, 5.0);
        assert_eq!(c.autoscale.thresholds.queue_time_up, std::time::Duration::from_millis(2500));
        assert_eq!(c.autoscale.thresholds.kv_usage_down, 0.25);
        for (extra, key) in [
            ("min_replicas = 0", "autoscale.min_replicas"),
            ("min_replicas = 3\nmax_replicas = 2", "autoscale.max_replicas"),
            ("kv_usage_up = 1.5", "autoscale.kv_usage_up"),
            ("waiting_per_replica = -1", "autoscale.waiting_per_replica"),
            ("kv_usage_up = 0.4", "autoscale.kv_usage_down"),
            ("queue_time_down_s = 9", "autoscale.queue_time_down_s"),
            ("colour = 1", "colour"),
        ] {
            let e = parse(&format!("{GOOD}\n[autoscale]\n{extra}\n")).unwrap_err();
            assert!(e.contains(key), "{extra}: {e}");
        }
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
