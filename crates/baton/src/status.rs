//! `baton status`: each node of a cluster.toml, the layers it serves now, whether it is
//! reachable (the head over HTTP, stages over the mutually authenticated control plane), the
//! head's load, and each pipeline's plan epoch and last plan changes with their reasons.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use baton_mesh::config::ClusterConfig;
use baton_mesh::control::ControlNode;
use baton_mesh::stage_service;
use baton_mesh::stage_wire::{StageReply, StageRequest};
use baton_mesh::{pki, placement};
use serde_json::Value;

use crate::load;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value = "cluster.toml")]
    cluster: PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(c, "GET {path} HTTP/1.0\r\nHost: baton\r\n\r\n").ok()?;
    let mut raw = String::new();
    c.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    Some((head.split_whitespace().nth(1)?.parse().ok()?, body.to_string()))
}

/// Pings node `name` over the control plane: its answer (layers, epoch, whom it serves, how far
/// it has loaded its layers while it loads), or `None` if it does not answer within 3 s.
fn ping(rt: &tokio::runtime::Runtime, identity: &pki::NodeIdentity, control: SocketAddr, name: &str) -> Option<Value> {
    rt.block_on(async {
        let bind = SocketAddr::new(if control.is_ipv4() { std::net::Ipv4Addr::UNSPECIFIED.into() } else { std::net::Ipv6Addr::UNSPECIFIED.into() }, 0);
        let me = ControlNode::bind(bind, identity.clone(), std::sync::Arc::default()).ok()?;
        let link = tokio::time::timeout(Duration::from_secs(3), me.connect(control, name)).await.ok()?.ok()?;
        let start = Instant::now();
        let reply = tokio::time::timeout(Duration::from_secs(3), stage_service::call(&link, &StageRequest::Query { nonce: 1 })).await.ok()?.ok()?;
        let rtt = start.elapsed().as_secs_f64() * 1e3;
        me.close();
        match reply {
            StageReply::Pong { loaded, tensor_plane, ucx_steps, window_steps, chained_steps, busy_us, generation, epoch, first_layer, end_layer, head, loading_mib_done, loading_mib_total, .. } => Some(serde_json::json!({
                "loading": if loading_mib_total > 0 { serde_json::json!({"mib_done": loading_mib_done, "mib_total": loading_mib_total}) } else { Value::Null },
                "up": true, "loaded": loaded, "head": head, "ping_ms": rtt, "tensor_plane": tensor_plane, "busy_seconds": busy_us as f64 / 1e6,
                "ucx_steps": ucx_steps, "rma_window_steps": window_steps, "chained_steps": chained_steps, "generation": generation,
                "epoch": epoch, "serving": if loaded { serde_json::json!([first_layer, end_layer]) } else { Value::Null }
            })),
            _ => None,
        }
    })
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let c = ClusterConfig::from_file(&args.cluster)?;
    let layers = load::ClusterModel::of(&c, &args.cluster)?.num_layers().context("the cluster's model")?;
    let plan = placement::plan(&c, layers)?;
    let head = &plan.pipelines[0].stages[0].0;
    let identity = pki::load(&c.tls_dir, head).with_context(|| format!("the head's certificate (run `baton cluster init {}`)", args.cluster.display()))?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut rows = Vec::new();
    // Per pipeline: each head named by a node, and the nodes that serve it.
    let mut sides: std::collections::BTreeMap<usize, std::collections::BTreeMap<String, Vec<String>>> = Default::default();
    for (pi, p) in plan.pipelines.iter().enumerate() {
        for (si, (name, range)) in p.stages.iter().enumerate() {
            let Some(node) = c.node(name) else { continue };
            let state = if si == 0 {
                match node.http.and_then(|a| get(a, "/v1/stats").map(|r| (a, r))) {
                    Some((_, (200, body))) => {
                        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                        let ready = node.http.and_then(|a| get(a, "/health")).is_some_and(|(s, _)| s == 200);
                        let mesh = node.http.and_then(|a| get(a, "/v1/mesh")).filter(|(s, _)| *s == 200).and_then(|(_, b)| serde_json::from_str::<Value>(&b).ok());
                        let serving = mesh.as_ref().and_then(|m| m["nodes"].as_array()?.iter().find(|n| n["name"] == name.as_str()).map(|n| n["layers"].clone()));
                        serde_json::json!({"up": true, "ready": ready, "running": v["running"], "waiting": v["waiting"],
                                           "kv_cache_usage": v["kv_cache_usage"], "mesh": mesh, "serving": serving})
                    }
                    // No HTTP yet: a head still loading answers on its control plane.
                    _ => match ping(&rt, &identity, node.control, name) {
                        Some(p) => serde_json::json!({"up": true, "ready": false, "loading": p["loading"]}),
                        None => serde_json::json!({"up": false}),
                    },
                }
            } else {
                ping(&rt, &identity, node.control, name).unwrap_or_else(|| serde_json::json!({"up": false}))
            };
            // Whom the node serves (its own name while it heads a pipeline): two heads in one
            // pipeline mean the cluster is split.
            let head_pong;
            let pong = if si == 0 {
                head_pong = ping(&rt, &identity, node.control, name);
                head_pong.as_ref()
            } else {
                Some(&state)
            };
            let head_of = pong.map(|p| p["head"].clone());
            // The device's time in steps since it started: sampled twice, a stage's busy share.
            let busy_seconds = pong.map_or(Value::Null, |p| p["busy_seconds"].clone());
            if let Some(h) = head_of.as_ref().and_then(Value::as_str).filter(|h| !h.is_empty()) {
                sides.entry(pi).or_default().entry(h.to_string()).or_default().push(name.clone());
            }
            let serving = state.get("serving").cloned().filter(|v| !v.is_null());
            rows.push(serde_json::json!({"pipeline": pi, "stage": si, "node": name, "control": node.control.to_string(),
                                         "configured_layers": [range.start, range.end], "layers": serving, "busy_seconds": busy_seconds,
                                         "role": if si == 0 { "head" } else if state["head"] == name.as_str() { "head*" } else { "stage" }, "state": state}));
        }
    }
    let split: Vec<Value> = sides
        .iter()
        .filter(|(_, heads)| heads.len() > 1)
        .map(|(pi, heads)| serde_json::json!({"pipeline": pi, "sides": heads.iter().map(|(h, n)| serde_json::json!({"head": h, "nodes": n})).collect::<Vec<_>>()}))
        .collect();
    if args.json {
        println!("{}", serde_json::json!({"cluster": c.name, "model": c.model, "layers": layers, "nodes": rows, "split": split}));
        return Ok(());
    }
    println!("cluster `{}`: model {} ({layers} layers), {} pipeline(s)", c.name, c.model, plan.pipelines.len());
    for r in &rows {
        let s = &r["state"];
        let state = if s["up"] != true {
            "DOWN".to_string()
        } else if r["role"] == "head*" {
            format!("up, heads the pipeline now (it took over from a head that died; generation {})", s["generation"])
        } else if r["role"] == "head" && s["ready"] != true {
            format!("up, {}", loading(&s["loading"]).unwrap_or_else(|| "starting (its stages, then its layers)".into()))
        } else if r["role"] == "head" {
            format!("up, ready | running {} waiting {} kv {:.1}%", s["running"], s["waiting"], s["kv_cache_usage"].as_f64().unwrap_or(0.0) * 100.0)
        } else {
            format!(
                "up, link {:.2} ms, {}, generation {}, tensors over {}",
                s["ping_ms"].as_f64().unwrap_or(0.0),
                match loading(&s["loading"]) {
                    Some(l) => l,
                    None if s["loaded"] == true => format!("serving epoch {}", s["epoch"]),
                    None => "not in the plan".to_string(),
                },
                s["generation"],
                s["tensor_plane"].as_str().unwrap_or("?")
            )
        };
        let layers = match r["layers"].as_array() {
            Some(l) => format!("layers {:>3}..{:<3}", l[0], l[1]),
            None => format!("{:<14}", "no layers"),
        };
        println!("  {:<10} {:<6} {:<22} {layers} {state}", r["node"].as_str().unwrap_or(""), r["role"].as_str().unwrap_or(""), r["control"].as_str().unwrap_or(""));
    }
    for (pi, heads) in sides.iter().filter(|(_, heads)| heads.len() > 1) {
        let sides: Vec<String> = heads.iter().map(|(head, nodes)| format!("{head} heads {}", nodes.join(", "))).collect();
        println!(
            "pipeline {pi}: SPLIT: {} (its nodes cannot reach each other; each side serves its own clients, and when the link heals the lesser head steps down)",
            sides.join("; ")
        );
    }
    for r in rows.iter().filter(|r| r["role"] == "head") {
        let mesh = &r["state"]["mesh"];
        if mesh.is_null() {
            continue;
        }
        // Nodes that joined through the gossip (cluster.toml does not name them).
        for n in mesh["nodes"].as_array().into_iter().flatten().filter(|n| n["name"].as_str().is_some_and(|name| c.node(name).is_none())) {
            let layers = match n["layers"].as_array() {
                Some(l) => format!("layers {:>3}..{:<3}", l[0], l[1]),
                None => format!("{:<14}", "no layers"),
            };
            println!("  {:<10} {:<6} {:<22} {layers} {}, generation {} (joined)", n["name"].as_str().unwrap_or(""), "stage", "-", n["state"].as_str().unwrap_or(""), n["generation"]);
        }
        match mesh["epoch"].as_u64() {
            Some(e) => println!("pipeline {}: plan epoch {e}", r["pipeline"]),
            None => println!("pipeline {}: NOT SERVING: no live node holds layers {}..{}", r["pipeline"], mesh["unserved"][0], mesh["unserved"][1]),
        }
        // What the planner weighs the nodes by, once they have run steps.
        let speeds: Vec<String> = mesh["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| {
                let slow = n["slowdown"].as_f64().filter(|f| *f > 1.0).map(|f| format!(" (slow: waited on {f:.1}x its compute)")).unwrap_or_default();
                Some(format!("{} {:.2}{slow}", n["name"].as_str()?, n["us_per_layer_token"].as_f64()?))
            })
            .collect();
        if !speeds.is_empty() {
            println!("  measured µs per layer per token: {}", speeds.join(", "));
        }
        for c in mesh["changes"].as_array().into_iter().flatten() {
            let detection = c["detection_ms"].as_f64().map(|d| format!(", detected after {d:.0} ms")).unwrap_or_default();
            println!(
                "  epoch {} at {:.1} s: {} ({}{detection}): {}",
                c["epoch"],
                c["at_s"].as_f64().unwrap_or(0.0),
                c["reason"].as_str().unwrap_or(""),
                c["nodes"].as_array().map(|n| n.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", ")).unwrap_or_default(),
                c["moved"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}

/// "loading 45% of 266 MiB of weights" from a ping's `loading`, if it is loading.
fn loading(v: &Value) -> Option<String> {
    let (done, total) = (v["mib_done"].as_f64()?, v["mib_total"].as_f64()?);
    Some(format!("loading its layers: {:.0}% of {total:.0} MiB", (done / total.max(1.0) * 100.0).min(100.0)))
}
