//! The elastic mesh with real processes on loopback: a three-node pipeline under 32 streaming
//! greedy requests loses a stage to `kill -9` mid-stream; every request still completes with
//! the tokens one node gives, the survivors take over the dead node's layers, and when the node
//! is started again (a new generation) it is taken back while streams run, with no request
//! failed. Also: the mesh answers 503 with Retry-After naming the layers when the live nodes
//! cannot hold the model, and serves again by itself when capacity returns.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[path = "support/mod.rs"]
mod support;

use support::cluster::{deep_tiny_model, log_tail, log_text, mesh, metric, node_state, reference, spawn_node, stream, write_cluster, Nodes};

fn wait_for(what: &str, secs: u64, cfg: &std::path::Path, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}\nnode-a log:\n{}", log_tail(cfg, "node-a"));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Certificates, then node-c, node-b and node-a (UCX over TCP); returns once the head is ready.
fn start_mesh(cfg: &std::path::Path, http: u16, model: &std::path::Path) -> (Nodes, support::Server) {
    start_mesh_with(cfg, http, model, &[])
}

/// The same, with extra arguments for every node (`--tensor-plane quic`: the chain).
fn start_mesh_with(cfg: &std::path::Path, http: u16, model: &std::path::Path, extra: &[&str]) -> (Nodes, support::Server) {
    let bin = env!("CARGO_BIN_EXE_baton");
    assert!(Command::new(bin).args(["cluster", "init", cfg.to_str().unwrap()]).stdout(Stdio::null()).status().unwrap().success());
    let mut nodes = Nodes(Vec::new());
    for name in ["node-c", "node-b", "node-a"] {
        nodes.0.push(spawn_node(cfg, name, extra, Some("tcp")));
    }
    let head = support::Server { child: Command::new("true").spawn().unwrap(), addr: format!("127.0.0.1:{http}"), quic: None, model: model.to_path_buf() };
    wait_for("the pipeline head to be ready", 60, cfg, || support::health_ok(&head.addr));
    (nodes, head)
}

const PROMPTS: [&str; 8] = ["Hello", "The mesh", "Once upon a time", "Pipeline stages", "KV cache", "a b c d", "Failover", "Tokens"];

#[test]
fn a_stage_killed_mid_stream_loses_no_request_and_rejoins_when_restarted() {
    let bin = env!("CARGO_BIN_EXE_baton");
    let model = deep_tiny_model("elastic-model");
    let (cfg, ports) = write_cluster("elastic", &model);
    let max_tokens = 400;
    let want: Vec<Vec<u64>> = PROMPTS.iter().map(|p| reference(&model, p, max_tokens)).collect();

    let (mut nodes, head) = start_mesh(&cfg, ports.http, &model);
    let start = mesh(&head);
    assert_eq!(start["epoch"], 1, "{start}");
    // Tokens streamed so far (one inter-token latency per token after each stream's first).
    let streamed = |h: &support::Server| metric(h, "baton:inter_token_latency_seconds_count");

    // 32 streams; node-b (layers 4..8) is killed once they are well under way.
    let head_ref = &head;
    let results = std::thread::scope(|scope| {
        let streams: Vec<_> = (0..32).map(|i| scope.spawn(move || stream(head_ref, PROMPTS[i % 8], max_tokens))).collect();
        wait_for("the streams to get going", 60, &cfg, || streamed(head_ref) >= 32.0 * 10.0);
        let _ = nodes.0[1].kill(); // node-b: SIGKILL
        let _ = nodes.0[1].wait();
        streams.into_iter().map(|s| s.join().unwrap()).collect::<Vec<_>>()
    });
    for (i, (status, tokens, text)) in results.iter().enumerate() {
        assert_eq!(*status, 200, "request {i}: {text}");
        assert_eq!(*tokens, want[i % 8], "request {i}: tokens differ from one node's\n{}", log_tail(&cfg, "node-a"));
    }
    wait_for("the head to re-place node-b's layers", 10, &cfg, || mesh(&head)["epoch"].as_u64() >= Some(2));
    let after = mesh(&head);
    assert_eq!(node_state(&after, "node-b"), "down", "{after}");
    let lost = &after["changes"][0];
    assert_eq!(lost["reason"], "node_lost", "{after}");
    assert_eq!(lost["nodes"], json!(["node-b"]), "{after}");
    // The survivors next to the gap took it over: node-a 0..6, node-c 6..12.
    let layers = |v: &Value, n: &str| v["nodes"].as_array().unwrap().iter().find(|x| x["name"] == n).unwrap()["layers"].clone();
    assert_eq!(layers(&after, "node-a"), json!([0, 6]), "{after}");
    assert_eq!(layers(&after, "node-c"), json!([6, 12]), "{after}");
    assert!(metric(&head, "baton:requests_recomputed_total") >= 1.0, "no request was migrated: the kill came too late");
    assert_eq!(metric(&head, "baton:request_failure_total"), 0.0);
    assert_eq!(metric(&head, "baton:plan_changes_total{reason=\"node_lost\"}"), 1.0);
    assert_eq!(metric(&head, "baton:failure_detection_seconds_count"), 1.0);

    // Two nodes serve on their own.
    let (status, tokens, text) = stream(&head, PROMPTS[0], 16);
    assert_eq!(status, 200, "{text}");
    assert_eq!(tokens, want[0][..16]);

    // node-b starts again (a new process, a new generation): once it has answered long enough it
    // is taken back, while streams run, and none of them notices but in latency.
    // (Long streams: the planner waits 2 s of steady answers before taking a node back.)
    let long = 2000;
    let want_long: Vec<Vec<u64>> = PROMPTS.iter().map(|p| reference(&model, p, long)).collect();
    nodes.0[1] = spawn_node(&cfg, "node-b", &[], Some("tcp"));
    wait_for("node-b to answer the head's probes", 60, &cfg, || node_state(&mesh(&head), "node-b") == "spare");
    let results = std::thread::scope(|scope| {
        let streams: Vec<_> = (0..8).map(|i| scope.spawn(move || stream(head_ref, PROMPTS[i], long))).collect();
        wait_for("node-b to be taken back", 60, &cfg, || node_state(&mesh(head_ref), "node-b") == "serving");
        let joined_with_streams_running = streams.iter().any(|s| !s.is_finished());
        (streams.into_iter().map(|s| s.join().unwrap()).collect::<Vec<_>>(), joined_with_streams_running)
    });
    let (results, during) = results;
    assert!(during, "every stream had finished before node-b was taken back: the join was not tested under load");
    for (i, (status, tokens, text)) in results.iter().enumerate() {
        assert_eq!(*status, 200, "request {i}: {text}");
        assert_eq!(*tokens, want_long[i], "request {i} across the join");
    }
    let back = mesh(&head);
    assert_eq!(back["changes"].as_array().unwrap().last().unwrap()["reason"], "node_joined", "{back}");
    assert_eq!(layers(&back, "node-b"), json!([4, 8]), "{back}");
    assert_eq!(metric(&head, "baton:request_failure_total"), 0.0);

    // Every node published the speed its GPU shard measured, and the head weighs them by it.
    let speed = |v: &Value, n: &str| v["nodes"].as_array().and_then(|x| x.iter().find(|x| x["name"] == n)).and_then(|x| x["us_per_layer_token"].as_f64());
    wait_for("every node's measured speed", 15, &cfg, || {
        let v = mesh(&head);
        ["node-a", "node-b", "node-c"].iter().all(|n| speed(&v, n).is_some_and(|us| us > 0.0))
    });

    // `baton status` tells the story.
    let out = Command::new(bin).args(["status", "--cluster", cfg.to_str().unwrap()]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("node_lost (node-b") && text.contains("node_joined (node-b") && text.contains("plan epoch"), "{text}");
    assert!(text.contains("measured µs per layer per token: node-a"), "{text}");
}

/// Steps go down the chain (QUIC: the head sends each to node-b, which sends it on to node-c).
/// node-c, the last stage, is killed mid-stream: node-b's call to it breaks, node-b says so, and
/// the head re-places node-c's layers at once; no request fails and every token is one
/// engine's.
#[test]
fn the_last_stage_killed_down_the_chain_loses_no_request() {
    let model = deep_tiny_model("elastic-chain-model");
    let (cfg, ports) = write_cluster("elastic-chain", &model);
    let max_tokens = 300;
    let want: Vec<Vec<u64>> = PROMPTS.iter().map(|p| reference(&model, p, max_tokens)).collect();
    let (mut nodes, head) = start_mesh_with(&cfg, ports.http, &model, &["--tensor-plane", "quic"]);
    let streamed = |h: &support::Server| metric(h, "baton:inter_token_latency_seconds_count");
    let head_ref = &head;
    let results = std::thread::scope(|scope| {
        let streams: Vec<_> = (0..16).map(|i| scope.spawn(move || stream(head_ref, PROMPTS[i % 8], max_tokens))).collect();
        wait_for("the streams to get going", 60, &cfg, || streamed(head_ref) >= 16.0 * 10.0);
        let _ = nodes.0[0].kill(); // node-c: SIGKILL
        let _ = nodes.0[0].wait();
        streams.into_iter().map(|s| s.join().unwrap()).collect::<Vec<_>>()
    });
    for (i, (status, tokens, text)) in results.iter().enumerate() {
        assert_eq!(*status, 200, "request {i}: {text}");
        assert_eq!(*tokens, want[i % 8], "request {i}: tokens differ from one node's\n{}", log_tail(&cfg, "node-a"));
    }
    wait_for("the head to re-place node-c's layers", 10, &cfg, || mesh(&head)["epoch"].as_u64() >= Some(2));
    let after = mesh(&head);
    assert_eq!(node_state(&after, "node-c"), "down", "{after}");
    assert_eq!(after["changes"][0]["reason"], "node_lost", "{after}");
    assert_eq!(after["changes"][0]["nodes"], json!(["node-c"]), "{after}");
    assert!(metric(&head, "baton:requests_recomputed_total") >= 1.0, "no request was migrated: the kill came too late");
    assert_eq!(metric(&head, "baton:request_failure_total"), 0.0);
    // The two left serve on their own (a chain of one remote stage is a plain call).
    let (status, tokens, text) = stream(&head, PROMPTS[0], 16);
    assert_eq!(status, 200, "{text}");
    assert_eq!(tokens, want[0][..16]);
}

/// With node memory that holds only part of the model, losing a stage leaves layers no live
/// node can hold: requests get 503 with Retry-After naming them, and the mesh serves again by
/// itself when the node is back.
#[test]
fn without_room_for_every_layer_the_mesh_answers_503_until_capacity_returns() {
    let model = deep_tiny_model("elastic-503-model");
    let (cfg, ports) = write_cluster("elastic-503", &model);
    // Each node holds 4 layers of this model: a layer of the tiny model has 2 * 64 * 64 +
    // 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64 = 36,992 parameters, 73,984 bytes in bf16, and
    // 0.00031 GiB is 4.5 layers' worth.
    let text = std::fs::read_to_string(&cfg).unwrap().replace("memory_gb = 1", "memory_gb = 0.00031");
    std::fs::write(&cfg, text).unwrap();
    let (mut nodes, head) = start_mesh(&cfg, ports.http, &model);
    let _ = nodes.0[0].kill(); // node-c
    let _ = nodes.0[0].wait();
    wait_for("the head to say it cannot serve", 30, &cfg, || support::http(&head, "GET", "/health", None).0 == 503);
    let (status, headers, body) = support::http(&head, "POST", "/v1/completions", Some(&json!({"prompt": "Hello", "max_tokens": 4}).to_string()));
    assert_eq!(status, 503, "{body}");
    assert!(headers.to_lowercase().contains("retry-after"), "{headers}");
    let err: Value = serde_json::from_str(&body).unwrap();
    let message = err["error"]["message"].as_str().unwrap_or("");
    assert!(message.contains("layers 8..12") && message.contains("node-c"), "{body}");
    assert!(mesh(&head)["epoch"].is_null());

    nodes.0[0] = spawn_node(&cfg, "node-c", &[], Some("tcp"));
    wait_for("the mesh to serve again", 60, &cfg, || support::http(&head, "GET", "/health", None).0 == 200);
    let want = reference(&model, "Hello", 8);
    let (status, tokens, text) = stream(&head, "Hello", 8);
    assert_eq!(status, 200, "{text}");
    assert_eq!(tokens, want);
    assert_eq!(mesh(&head)["changes"].as_array().unwrap().last().unwrap()["reason"], "capacity_returned");
}

/// A fourth node that cluster.toml never names joins a running mesh through the seeds with a
/// certificate from `baton cluster add-node` and takes layers while streams run; it then
/// drains (`baton node --drain`): its layers move back while it still serves, and it exits
/// once released, with no request failed. A revoked node is refused.
#[test]
fn a_new_node_joins_through_the_seeds_takes_layers_and_drains_away() {
    let bin = env!("CARGO_BIN_EXE_baton");
    let model = deep_tiny_model("elastic-join-model");
    let (cfg, ports) = write_cluster("elastic-join", &model);
    let (mut nodes, head) = start_mesh(&cfg, ports.http, &model);
    let long = 2000;
    let want: Vec<Vec<u64>> = PROMPTS.iter().map(|p| reference(&model, p, long)).collect();

    // node-d: a certificate from add-node, a name the file does not have.
    let out = Command::new(bin).args(["cluster", "add-node", "node-d", "--cluster", cfg.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let control_d = format!("127.0.0.1:{}", support::cluster::free_udp());
    let head_ref = &head;
    let recomputed = metric(&head, "baton:requests_recomputed_total");
    let (results, joined_under_load) = std::thread::scope(|scope| {
        let streams: Vec<_> = (0..8).map(|i| scope.spawn(move || stream(head_ref, PROMPTS[i], long))).collect();
        nodes.0.push(spawn_node(&cfg, "node-d", &["--control", &control_d], Some("tcp")));
        wait_for("node-d to be taken into the plan", 60, &cfg, || node_state(&mesh(head_ref), "node-d") == "serving");
        let under_load = streams.iter().any(|s| !s.is_finished());
        (streams.into_iter().map(|s| s.join().unwrap()).collect::<Vec<_>>(), under_load)
    });
    assert!(joined_under_load, "every stream had finished before node-d joined");
    for (i, (status, tokens, text)) in results.iter().enumerate() {
        assert_eq!(*status, 200, "request {i}: {text}");
        assert_eq!(*tokens, want[i], "request {i} across node-d's join");
    }
    let view = mesh(&head);
    let layers = |v: &Value, n: &str| v["nodes"].as_array().unwrap().iter().find(|x| x["name"] == n).unwrap()["layers"].clone();
    assert_eq!(layers(&view, "node-d"), json!([9, 12]), "{view}");
    // Add before drop: node-d loaded its layers while the old plan served, before the switch.
    let head_log = log_text(&cfg, "node-a");
    assert!(head_log.contains("node-d loaded their layers while the running plan served"), "{head_log}");

    // node-d drains: its layers move while it serves, then it is released and exits.
    let results = std::thread::scope(|scope| {
        let streams: Vec<_> = (0..8).map(|i| scope.spawn(move || stream(head_ref, PROMPTS[i], long))).collect();
        let out = Command::new(bin).args(["node", "--cluster", cfg.to_str().unwrap(), "--name", "node-d", "--control", &control_d, "--drain"]).output().unwrap();
        assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let deadline = Instant::now() + Duration::from_secs(60);
        while nodes.0[3].try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "node-d did not exit after draining\n{}", log_tail(&cfg, "node-d"));
            std::thread::sleep(Duration::from_millis(50));
        }
        streams.into_iter().map(|s| s.join().unwrap()).collect::<Vec<_>>()
    });
    for (i, (status, tokens, text)) in results.iter().enumerate() {
        assert_eq!(*status, 200, "request {i}: {text}");
        assert_eq!(*tokens, want[i], "request {i} across node-d's drain");
    }
    let view = mesh(&head);
    assert!(view["changes"].as_array().unwrap().iter().any(|c| c["reason"] == "node_drained" && c["nodes"] == json!(["node-d"])), "{view}");
    // A join and a drain move the KV with the layers: nothing was recomputed.
    assert!(metric(&head, "baton:requests_migrated_total") >= 8.0, "the join and the drain moved no running request");
    assert_eq!(metric(&head, "baton:requests_recomputed_total"), recomputed, "a planned change recomputed KV\n{}", log_tail(&cfg, "node-a"));
    // Released, node-d is forgotten: no longer probed nor shown.
    let gone = |v: &Value| v["nodes"].as_array().is_some_and(|n| n.iter().all(|x| x["name"] != "node-d"));
    wait_for("the head to forget the released node-d", 10, &cfg, || gone(&mesh(&head)));
    assert_eq!(metric(&head, "baton:request_failure_total"), 0.0);

    // Revoked: node-d's certificate is refused from the nodes' next start or SIGHUP.
    assert!(Command::new(bin).args(["cluster", "revoke", "node-d", "--cluster", cfg.to_str().unwrap()]).stdout(Stdio::null()).status().unwrap().success());
    for child in &nodes.0[..3] {
        assert!(Command::new("kill").args(["-HUP", &child.id().to_string()]).status().unwrap().success());
    }
    wait_for("the nodes to reload the revocation list", 10, &cfg, || log_tail(&cfg, "node-a").contains("revocation list reloaded"));
    nodes.0[3] = spawn_node(&cfg, "node-d", &["--control", &control_d], Some("tcp"));
    std::thread::sleep(Duration::from_millis(100));
    let deadline = Instant::now() + Duration::from_secs(6);
    while Instant::now() < deadline {
        assert_ne!(node_state(&mesh(&head), "node-d"), "spare", "a revoked node answered the head's probes");
        assert_ne!(node_state(&mesh(&head), "node-d"), "serving", "a revoked node was given layers");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `placement.replicas` is a minimum: a node that joins with a replica cluster.toml has no node
/// of (and memory for the whole model) forms that replica and heads it; entry nodes learn of it
/// through the gossip and spread requests over it too, and once it dies they go on with the
/// heads they have. Too little memory for a new replica's first node is a clear error.
#[test]
fn a_node_of_a_new_replica_heads_a_second_pipeline_that_entry_nodes_use() {
    let bin = env!("CARGO_BIN_EXE_baton");
    let model = deep_tiny_model("elastic-replica-model");
    let (cfg, ports) = write_cluster("elastic-replica", &model);
    let (mut nodes, head) = start_mesh(&cfg, ports.http, &model);
    let c = cfg.to_str().unwrap();
    let out = Command::new(bin).args(["cluster", "add-node", "node-e", "--cluster", c]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let control_e = format!("127.0.0.1:{}", support::cluster::free_udp());

    let small = Command::new(bin)
        .args(["node", "--cluster", c, "--name", "node-e", "--control", &control_e, "--replica", "1", "--memory-gb", "0.0001", "--threads", "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&small.stderr);
    assert!(!small.status.success() && err.contains("--replica 1") && err.contains("--memory-gb"), "{err}");

    let http_e = support::cluster::free_tcp();
    let http_e_arg = format!("127.0.0.1:{http_e}");
    nodes.0.push(spawn_node(&cfg, "node-e", &["--control", &control_e, "--replica", "1", "--http", &http_e_arg], Some("tcp")));
    let head_e = support::Server { child: Command::new("true").spawn().unwrap(), addr: http_e_arg.clone(), quic: None, model: model.clone() };
    wait_for("node-e to serve its own pipeline", 60, &cfg, || support::health_ok(&head_e.addr));
    let own = mesh(&head_e);
    assert_eq!(own["nodes"][0]["name"], "node-e", "{own}");
    assert_eq!(own["nodes"][0]["layers"], json!([0, 12]), "{own}");
    wait_for("node-b to learn of the new head", 30, &cfg, || log_text(&cfg, "node-b").contains("pipeline head node-e"));

    // Requests entering at node-b (a stage of replica 0) go to both heads, token for token.
    let entry = support::Server { child: Command::new("true").spawn().unwrap(), addr: format!("127.0.0.1:{}", ports.http_b), quic: None, model: model.clone() };
    let want: Vec<Vec<u64>> = PROMPTS.iter().map(|p| reference(&model, p, 48)).collect();
    let served = |h: &support::Server| metric(h, "baton:request_success_total{finished_reason=\"length\"}");
    let entry_ref = &entry;
    let results = std::thread::scope(|scope| {
        let streams: Vec<_> = (0..16).map(|i| scope.spawn(move || stream(entry_ref, PROMPTS[i % 8], 48))).collect();
        streams.into_iter().map(|s| s.join().unwrap()).collect::<Vec<_>>()
    });
    for (i, (status, tokens, text)) in results.iter().enumerate() {
        assert_eq!(*status, 200, "request {i}: {text}");
        assert_eq!(*tokens, want[i % 8], "request {i}");
    }
    assert!(served(&head_e) >= 1.0 && served(&head) >= 1.0, "node-a served {}, node-e {}", served(&head), served(&head_e));

    // node-e dies: requests entering at node-b go on with node-a.
    let e = nodes.0.last_mut().unwrap();
    let _ = e.kill();
    let _ = e.wait();
    for (i, p) in PROMPTS.iter().enumerate() {
        let (status, tokens, text) = stream(&entry, p, 48);
        assert_eq!(status, 200, "request {i} after node-e died: {text}");
        assert_eq!(tokens, want[i]);
    }
}

/// The pipeline head dies under load (`kill -9`) while every request entered at the other
/// nodes: its neighbour (node-b, layers 4..8) takes over as head (loading layers 0..4 and the
/// embedding), the entry nodes resume each stream there from the tokens they relayed, and every
/// stream ends with exactly the tokens one node gives. When node-a starts again it finds the
/// new head in the gossip and serves it as a stage.
#[test]
fn a_dead_head_costs_no_request_that_entered_elsewhere() {
    let model = deep_tiny_model("elastic-head-model");
    let (cfg, ports) = write_cluster("elastic-head", &model);
    let max_tokens = 300;
    let want: Vec<Vec<u64>> = PROMPTS.iter().map(|p| reference(&model, p, max_tokens)).collect();
    let (mut nodes, head) = start_mesh(&cfg, ports.http, &model);
    let entry = |port: u16| support::Server { child: Command::new("true").spawn().unwrap(), addr: format!("127.0.0.1:{port}"), quic: None, model: model.clone() };
    let (entry_b, entry_c) = (entry(ports.http_b), entry(ports.http_c));
    let streamed = |h: &support::Server| metric(h, "baton:inter_token_latency_seconds_count");

    let (b, c, h) = (&entry_b, &entry_c, &head);
    let results = std::thread::scope(|scope| {
        let streams: Vec<_> = (0..24).map(|i| scope.spawn(move || stream(if i % 2 == 0 { b } else { c }, PROMPTS[i % 8], max_tokens))).collect();
        wait_for("the streams to get going", 60, &cfg, || streamed(h) >= 24.0 * 10.0);
        let _ = nodes.0[2].kill(); // node-a, the head: SIGKILL
        let _ = nodes.0[2].wait();
        streams.into_iter().map(|s| s.join().unwrap()).collect::<Vec<_>>()
    });
    let logs = || format!("node-b:\n{}\nnode-c:\n{}", log_tail(&cfg, "node-b"), log_tail(&cfg, "node-c"));
    for (i, (status, tokens, text)) in results.iter().enumerate() {
        assert_eq!(*status, 200, "request {i}: {text}\n{}", logs());
        assert_eq!(tokens.len(), max_tokens, "request {i}: {} tokens\n{text}\n{}", tokens.len(), logs());
        assert_eq!(*tokens, want[i % 8], "request {i}: tokens differ from one node's\n{}", logs());
    }
    let b_log = log_text(&cfg, "node-b");
    assert!(b_log.contains("heads the pipeline now"), "node-b did not take over:\n{}", logs());
    let resumed = log_text(&cfg, "node-b").matches("a request resumed at").count() + log_text(&cfg, "node-c").matches("a request resumed at").count();
    assert!(resumed >= 1, "no stream was resumed: the kill came too late\n{}", logs());

    // The new head's view, through an entry node: node-b heads from layer 0, node-a is down.
    let view = mesh(&entry_c);
    let layers = |v: &Value, n: &str| v["nodes"].as_array().and_then(|x| x.iter().find(|x| x["name"] == n)).map_or(Value::Null, |x| x["layers"].clone());
    assert!(view["epoch"].as_u64() >= Some(2), "{view}");
    assert_eq!(layers(&view, "node-b"), json!([0, 8]), "{view}");
    assert_eq!(layers(&view, "node-c"), json!([8, 12]), "{view}");
    // Peers' bad input is counted by kind, at the new head and on each node's own /metrics; a
    // kill is none.
    for kind in ["malformed_gossip", "forged_gossip", "malformed_control", "oversized_control"] {
        assert_eq!(view["dropped"][kind], 0, "{kind}: {view}");
        assert_eq!(metric(&entry_c, &format!("baton:peer_messages_dropped_total{{kind=\"{kind}\"}}")), 0.0);
    }

    // node-a comes back: not as a second head, but as a stage of node-b's pipeline; a request
    // entering at it is served token for token.
    nodes.0[2] = spawn_node(&cfg, "node-a", &[], Some("tcp"));
    wait_for("node-a to join node-b's pipeline", 60, &cfg, || log_text(&cfg, "node-a").contains("joining it as a stage"));
    wait_for("node-a to be taken in", 60, &cfg, || node_state(&mesh(&entry_c), "node-a") == "serving");
    let entry_a = entry(ports.http);
    wait_for("node-a's front", 30, &cfg, || support::health_ok(&entry_a.addr));
    let (status, tokens, text) = stream(&entry_a, PROMPTS[3], 32);
    assert_eq!(status, 200, "{text}");
    assert_eq!(tokens, want[3][..32]);
}

/// The native QUIC client resumes by itself: `baton client` streams through node-b's QUIC
/// relay, knowing only node-b; node-b is killed mid-stream (a stage too: the head re-places
/// its layers); each client reconnects to a node the server named when the stream started,
/// resumes from the tokens it holds, and prints one stream with exactly one node's tokens.
#[test]
fn a_quic_client_resumes_its_stream_at_another_node_when_its_node_dies() {
    let bin = env!("CARGO_BIN_EXE_baton");
    let model = deep_tiny_model("elastic-client-model");
    let (cfg, ports) = write_cluster("elastic-client", &model);
    let max_tokens = 300;
    let want: Vec<Vec<u64>> = PROMPTS.iter().take(4).map(|p| reference(&model, p, max_tokens)).collect();
    let (mut nodes, head) = start_mesh(&cfg, ports.http, &model);
    let ca = cfg.with_file_name("cluster-tls").join("ca.der");
    assert!(ca.exists(), "{}", ca.display());
    let addr = format!("node-b=127.0.0.1:{}", ports.quic_b);
    let clients: Vec<_> = (0..4)
        .map(|i| {
            Command::new(bin)
                .args(["client", "--addr", &addr, "--cert", ca.to_str().unwrap(), "--prompt", PROMPTS[i], "--max-tokens", &max_tokens.to_string(), "--ignore-eos", "--json"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    wait_for("the streams to get going", 60, &cfg, || metric(&head, "baton:inter_token_latency_seconds_count") >= 4.0 * 10.0);
    let _ = nodes.0[1].kill(); // node-b: SIGKILL
    let _ = nodes.0[1].wait();
    for (i, c) in clients.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "client {i}: {err}\n{}", log_tail(&cfg, "node-a"));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("client {i}: {e}: {}", String::from_utf8_lossy(&out.stdout)));
        let tokens: Vec<u64> = v["token_ids"].as_array().unwrap().iter().filter_map(Value::as_u64).collect();
        assert_eq!(tokens, want[i], "client {i}: tokens differ from one node's ({})", v["served_by"]);
        assert_eq!(v["usage"]["completion_tokens"], max_tokens, "{v}");
        assert_eq!(v["served_by"], json!(["node-b", "node-a"]), "client {i} did not move to node-a: {v}\n{err}");
    }
}

/// A stage paused with SIGSTOP under load is lost to the head (its probes go unanswered) and its
/// layers re-placed; resumed with SIGCONT (the same process, the same generation) it answers
/// again and is taken back. No request fails, and every one has one node's tokens.
#[test]
fn a_stage_paused_and_resumed_rejoins_without_a_failed_request() {
    let model = deep_tiny_model("elastic-pause-model");
    let (cfg, ports) = write_cluster("elastic-pause", &model);
    let max_tokens = 2000;
    let want: Vec<Vec<u64>> = PROMPTS.iter().map(|p| reference(&model, p, max_tokens)).collect();
    let (nodes, head) = start_mesh(&cfg, ports.http, &model);
    let node_c = nodes.0[0].id().to_string();
    let signal = |sig: &str| assert!(Command::new("kill").args([sig, &node_c]).status().unwrap().success());
    let h = &head;
    let results = std::thread::scope(|scope| {
        let streams: Vec<_> = (0..8).map(|i| scope.spawn(move || stream(h, PROMPTS[i], max_tokens))).collect();
        wait_for("the streams to get going", 60, &cfg, || metric(h, "baton:inter_token_latency_seconds_count") >= 8.0 * 10.0);
        signal("-STOP");
        wait_for("the head to lose node-c", 30, &cfg, || node_state(&mesh(h), "node-c") == "down");
        signal("-CONT");
        wait_for("node-c to be taken back", 60, &cfg, || node_state(&mesh(h), "node-c") == "serving");
        let during = streams.iter().any(|s| !s.is_finished());
        (streams.into_iter().map(|s| s.join().unwrap()).collect::<Vec<_>>(), during)
    });
    let (results, during) = results;
    assert!(during, "every stream had finished before node-c was back: the pause was not tested under load");
    for (i, (status, tokens, text)) in results.iter().enumerate() {
        assert_eq!(*status, 200, "request {i}: {text}");
        assert_eq!(*tokens, want[i], "request {i}: tokens differ from one node's\n{}", log_tail(&cfg, "node-a"));
    }
    assert_eq!(metric(&head, "baton:request_failure_total"), 0.0);
    drop(nodes);
}
