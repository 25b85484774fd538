//! A three-node pipeline on loopback, each node a real `baton node` process, once per tensor
//! plane (UCX over TCP, UCX over shared memory, the QUIC fallback): requests entering at every
//! node give token for token what one node gives, 32 concurrent streams all finish correctly,
//! long prompts take the RMA path on UCX, and garbage sent to a node's control port leaves the
//! mesh serving.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[path = "support/mod.rs"]
mod support;

use support::cluster::{free_tcp, free_udp, spawn_node, write_cluster, Nodes, Ports};

/// bootstrap.sh starts node-a and node-c as local processes and node-b "remotely": through
/// stand-ins for ssh and scp that run in a scratch home directory on this machine, which
/// exercises the remote path (copying cluster.toml and the node's certificates, starting and
/// stopping it there) without a second host.
#[test]
fn bootstrap_starts_reports_and_stops_a_cluster_with_a_remote_node() {
    let bin = env!("CARGO_BIN_EXE_baton");
    let model = support::tiny_model("boot-model");
    let (cfg, ports) = write_cluster("boot", &model);
    let http = ports.http;
    let home = cfg.parent().unwrap().join("remote-home");
    std::fs::create_dir_all(&home).unwrap();
    let fake_ssh = cfg.parent().unwrap().join("fake-ssh");
    let fake_scp = cfg.parent().unwrap().join("fake-scp");
    std::fs::write(&fake_ssh, "#!/bin/sh\nshift\ncd \"$FAKE_HOME\" && HOME=\"$FAKE_HOME\" exec sh -c \"$*\"\n").unwrap();
    std::fs::write(
        &fake_scp,
        "#!/bin/sh\n[ \"$1\" = -q ] && shift\nfor a; do last=$a; done\ndest=${last#*:}\ncase $dest in /*) ;; *) dest=$FAKE_HOME/$dest ;; esac\nwhile [ $# -gt 1 ]; do cp \"$1\" \"$dest\" || exit 1; shift; done\n",
    )
    .unwrap();
    for f in [&fake_ssh, &fake_scp] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/bootstrap.sh");
    let run = |extra: &[&str]| {
        Command::new("bash")
            .arg(&script)
            .arg(&cfg)
            .args(extra)
            .env("BATON", bin)
            .env("BATON_REMOTE_BATON", bin)
            .env("BATON_REMOTE_NODES", "node-b")
            .env("BATON_SSH", &fake_ssh)
            .env("BATON_SCP", &fake_scp)
            .env("FAKE_HOME", &home)
            .output()
            .unwrap()
    };
    let out = run(&[]);
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        run(&["--stop"]);
        panic!("bootstrap failed: {text}\n{}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(text.contains("started node-b on 127.0.0.1"), "{text}");
    assert!(text.contains(&format!("http://127.0.0.1:{http}/v1")), "{text}");
    assert_eq!(text.matches("serving epoch 1").count(), 2, "{text}");
    assert!(text.contains("head") && text.contains("ready"), "{text}");
    assert!(home.join("baton-cluster/cluster-tls/node-b.key.der").exists(), "node-b's key was not copied");
    assert!(!home.join("baton-cluster/cluster-tls/node-a.key.der").exists(), "another node's key was copied");
    let server = support::Server { child: Command::new("true").spawn().unwrap(), addr: format!("127.0.0.1:{http}"), quic: None, model };
    let (status, got) = support::post(&server, "/v1/completions", &json!({"prompt": "Hello", "max_tokens": 4}));
    assert_eq!(status, 200, "{got}");
    let log = std::fs::read_to_string(home.join("baton-cluster/node-b.log")).unwrap_or_default();
    assert!(log.contains("node node-b of cluster"), "the remote node's log: {log}");

    let stopped = run(&["--stop"]);
    let said = String::from_utf8_lossy(&stopped.stdout);
    assert_eq!(said.matches("stopped").count(), 3, "{said}");
    assert!(said.contains("stopped node-b on 127.0.0.1"), "{said}");
    // With none of the optional settings (a plain operator's environment), the script runs too.
    let plain = Command::new("bash").arg(&script).arg(&cfg).arg("--stop").env("BATON", bin).env_remove("BATON_REMOTE_NODES").output().unwrap();
    assert!(plain.status.success(), "{}", String::from_utf8_lossy(&plain.stderr));
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(&server.addr).is_ok() || std::net::TcpStream::connect(format!("127.0.0.1:{}", ports.http_b)).is_ok() {
        assert!(Instant::now() < deadline, "a node still listens after --stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The tensor plane a run uses: `--tensor-plane` and UCX_TLS for every node.
struct Plane {
    name: &'static str,
    arg: &'static str,
    ucx_tls: Option<&'static str>,
}

#[test]
fn a_three_stage_pipeline_over_ucx_tcp_matches_one_node() {
    three_stage_pipeline_matches_one_node(Plane { name: "ucx-tcp", arg: "ucx", ucx_tls: Some("tcp") });
}

#[test]
fn a_three_stage_pipeline_over_ucx_shared_memory_matches_one_node() {
    three_stage_pipeline_matches_one_node(Plane { name: "ucx-shm", arg: "ucx", ucx_tls: Some("shm") });
}

#[test]
fn a_three_stage_pipeline_over_the_quic_fallback_matches_one_node() {
    three_stage_pipeline_matches_one_node(Plane { name: "quic", arg: "quic", ucx_tls: None });
}

/// `baton status --json`'s row for `node`.
fn status_row(cfg: &std::path::Path, node: &str) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_baton")).args(["status", "--cluster", cfg.to_str().unwrap(), "--json"]).output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("status --json: {e}: {}", String::from_utf8_lossy(&out.stdout)));
    v["nodes"].as_array().unwrap().iter().find(|r| r["node"] == node).cloned().unwrap_or(Value::Null)
}

fn three_stage_pipeline_matches_one_node(plane: Plane) {
    let bin = env!("CARGO_BIN_EXE_baton");
    let model = support::tiny_model(&format!("mesh-model-{}", plane.name));
    let (cfg, ports) = write_cluster(&format!("mesh-{}", plane.name), &model);
    let Ports { http, quic, control_b: cb, http_b, quic_b, http_c } = ports;
    assert!(Command::new(bin).args(["cluster", "init", cfg.to_str().unwrap()]).status().unwrap().success());
    let check = Command::new(bin).args(["cluster", "check", cfg.to_str().unwrap()]).output().unwrap();
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(text.contains("node-a") && text.contains("layers 0..2") && text.contains("layers 3..4"), "{text}");

    let mut nodes = Nodes(Vec::new());
    let mut logs = Vec::new();
    for name in ["node-c", "node-b", "node-a"] {
        let mut cmd = Command::new(bin);
        cmd.args(["node", "--cluster", cfg.to_str().unwrap(), "--name", name, "--threads", "1", "--kv-cache-mb", "64", "--tensor-plane", plane.arg]);
        match plane.ucx_tls {
            Some(tls) => cmd.env("UCX_TLS", tls),
            None => cmd.env_remove("UCX_TLS"),
        };
        let mut child = cmd.stderr(Stdio::piped()).spawn().unwrap();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        let mut log = std::fs::File::create(cfg.with_file_name(format!("{name}.log"))).unwrap();
        std::thread::spawn(move || {
            use std::io::Write;
            for line in stderr.lines().map_while(Result::ok) {
                let _ = writeln!(log, "{line}");
                let _ = tx.send(line);
            }
        });
        nodes.0.push(child);
        logs.push((name, rx));
    }
    let server = support::Server { child: Command::new("true").spawn().unwrap(), addr: format!("127.0.0.1:{http}"), quic: None, model: model.clone() };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !support::health_ok(&server.addr) {
        if Instant::now() > deadline {
            let said: Vec<String> = logs.iter().flat_map(|(n, rx)| rx.try_iter().map(move |l| format!("{n}: {l}"))).collect();
            panic!("the pipeline head never became ready:\n{}", said.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Every node says which tensor plane it runs; the head says which one each link uses.
    let said: Vec<String> = logs.iter().flat_map(|(n, rx)| rx.try_iter().map(move |l| format!("{n}: {l}"))).collect();
    let said = said.join("\n");
    let (plane_line, link_line) = match plane.ucx_tls {
        Some(tls) => (format!("tensor plane: UCX 1.22.0 (transports: {tls})"), "activations over ucx"),
        None => ("tensor plane: QUIC streams on the control plane (chosen with --tensor-plane quic)".to_string(), "activations over quic"),
    };
    assert_eq!(said.matches(&plane_line).count(), 3, "{said}");
    assert_eq!(said.matches(link_line).count(), 2, "{said}");

    // Token for token what one node gives (`baton generate`, no server). The long prompt's
    // prefill carries more than 64 KiB of hidden states: the RMA path on UCX.
    let long = "the quick brown fox jumps over the lazy dog and runs far away ".repeat(8);
    let prompts = ["Hello, world", "The quick brown fox jumps over the lazy dog", "1 2 3", long.as_str()];
    let mut expected = Vec::new();
    for p in prompts {
        let out = Command::new(bin)
            .args(["generate", "--model", model.to_str().unwrap(), "--prompt", p, "--max-tokens", "16", "--ignore-eos", "--json"])
            .output()
            .unwrap();
        let want: Value = serde_json::from_slice(&out.stdout).unwrap();
        let (status, got) = support::post(&server, "/v1/completions", &json!({"prompt": p, "max_tokens": 16, "temperature": 0, "ignore_eos": true, "return_token_ids": true}));
        assert_eq!(status, 200, "{got}");
        assert_eq!(got["choices"][0]["token_ids"], want["token_ids"], "prompt {p:?}: the pipeline differs from one node");
        expected.push(want["token_ids"].clone());
    }

    // Requests entering at the other nodes (their HTTP) are forwarded to the head.
    let via_b = support::Server { child: Command::new("true").spawn().unwrap(), addr: format!("127.0.0.1:{http_b}"), quic: None, model: model.clone() };
    let via_c = support::Server { child: Command::new("true").spawn().unwrap(), addr: format!("127.0.0.1:{http_c}"), quic: None, model: model.clone() };
    for (node, via) in [("node-b", &via_b), ("node-c", &via_c)] {
        for (p, want) in prompts.iter().zip(&expected) {
            let (status, got) = support::post(via, "/v1/completions", &json!({"prompt": p, "max_tokens": 16, "temperature": 0, "ignore_eos": true, "return_token_ids": true}));
            assert_eq!(status, 200, "{got}");
            assert_eq!(&got["choices"][0]["token_ids"], want, "a request entering at {node} differs");
        }
    }
    let chunks = support::sse(&via_b, "/v1/completions", &json!({"prompt": prompts[1], "max_tokens": 16, "temperature": 0, "ignore_eos": true, "stream": true, "return_token_ids": true}));
    let streamed: Vec<Value> = chunks.iter().filter_map(|c| c["choices"][0]["token_ids"].as_array()).flatten().cloned().collect();
    assert_eq!(Value::Array(streamed), expected[1]);
    let (status, err) = support::post(&via_b, "/v1/completions", &json!({"prompt": "x", "temperature": -1}));
    assert_eq!((status, err["error"]["param"].clone()), (400, json!("temperature")));

    // The QUIC API at the head and relayed by node-b (clients trust the cluster CA and name the
    // node): the same tokens; garbage through the relay closes only that client's connection.
    let ca = std::fs::read(cfg.parent().unwrap().join("cluster-tls/ca.der")).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        for (node, port) in [("node-a", quic), ("node-b", quic_b)] {
            let addr = format!("127.0.0.1:{port}").parse().unwrap();
            let c = baton_client::Client::connect(addr, node, &ca).await.unwrap_or_else(|e| panic!("QUIC to {node}: {e}"));
            for (p, want) in prompts.iter().zip(&expected) {
                let mut r = baton_client::GenerateRequest::new(baton_client::Prompt::Text(p.to_string()));
                r.max_tokens = Some(16);
                r.temperature = 0.0;
                r.ignore_eos = true;
                let mut g = c.generate(&r).await.unwrap();
                let mut ids = Vec::new();
                while let Some(frame) = g.next().await.unwrap() {
                    if let baton_proto::Frame::Token { id, .. } = frame {
                        ids.push(json!(id));
                    }
                }
                assert_eq!(&Value::Array(ids), want, "QUIC at {node}: prompt {p:?}");
            }
        }
        let addr = format!("127.0.0.1:{quic_b}").parse().unwrap();
        let bad = baton_client::Client::connect(addr, "node-b", &ca).await.unwrap();
        let mut g = bad.send_raw(&[16, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]).await.unwrap();
        assert!(g.next().await.is_err(), "garbage through the relay was answered");
        let good = baton_client::Client::connect(addr, "node-b", &ca).await.unwrap();
        let mut r = baton_client::GenerateRequest::new(baton_client::Prompt::Text("still here".into()));
        r.max_tokens = Some(3);
        // Three tokens whatever is sampled (an end-of-sequence token would end it sooner).
        r.ignore_eos = true;
        let mut g = good.generate(&r).await.unwrap();
        let mut n = 0;
        let mut frames = Vec::new();
        while let Some(f) = g.next().await.unwrap() {
            n += matches!(f, baton_proto::Frame::Token { .. }) as usize;
            frames.push(format!("{f:?}"));
        }
        assert_eq!(n, 3, "frames: {frames:?}\nnode-a: {}", std::fs::read_to_string(cfg.with_file_name("node-a.log")).unwrap_or_default());
    });

    // Garbage datagrams at a stage's control port: the mesh keeps serving.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..50u8 {
        sock.send_to(&[i; 1200], format!("127.0.0.1:{cb}")).unwrap();
    }

    // 32 concurrent streams through the pipeline.
    let server_ref = &server;
    let n = prompts.len();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..32)
            .map(|i| {
                let p = prompts[i % n];
                scope.spawn(move || {
                    let chunks = support::sse(server_ref, "/v1/completions", &json!({"prompt": p, "max_tokens": 16, "temperature": 0, "ignore_eos": true, "stream": true, "return_token_ids": true}));
                    chunks.iter().filter_map(|c| c["choices"][0]["token_ids"].as_array()).flatten().cloned().collect::<Vec<Value>>()
                })
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            assert_eq!(Value::Array(h.join().unwrap()), expected[i % n], "stream {i}");
        }
    });

    // The head measures what the tensor plane costs per step, for dashboards.
    let transfer = &support::stats(&server)["histograms"]["pipeline_transfer_time_seconds"];
    assert!(transfer["count"].as_u64().unwrap_or(0) > 32, "{transfer}");
    let (_, _, prom) = support::http(&server, "GET", "/metrics", None);
    assert!(prom.contains("baton:pipeline_transfer_time_seconds_count"), "{prom}");

    // `baton status` shows the three stages and each stage's tensor plane; on UCX every step
    // came over it, and the long prompts' hidden states came by RMA (relayed by the head); over
    // QUIC every step came down the chain (node-b sent each on to node-c).
    for node in ["node-b", "node-c"] {
        let row = status_row(&cfg, node);
        let state = &row["state"];
        assert_eq!(state["loaded"], true, "{row}");
        let steps = state["ucx_steps"].as_u64().unwrap_or(0);
        let window = state["rma_window_steps"].as_u64().unwrap_or(0);
        let chained = state["chained_steps"].as_u64().unwrap_or(0);
        if plane.ucx_tls.is_some() {
            assert!(state["tensor_plane"].as_str().is_some_and(|t| t.starts_with("UCX")), "{row}");
            assert!(steps > 32 && window > 0 && chained == 0, "{node}: {steps} steps over UCX, {window} by RMA, {chained} chained: {row}");
        } else {
            assert_eq!((steps, window), (0, 0), "{row}");
            assert!(chained > 32, "{node}: {chained} steps down the chain: {row}");
        }
        // The stage ran steps, so its device time is counted (the busy share's numerator).
        let busy = row["busy_seconds"].as_f64().unwrap_or(0.0);
        assert!(busy > 0.0, "{node}: busy_seconds {busy}: {row}");
    }
}

/// Two replicas of a two-stage pipeline: requests entering at a non-head node, or at one of the
/// heads, are spread over both heads by load, and each answers what one node gives.
#[test]
fn two_replicas_share_requests_entering_at_a_stage_or_a_head() {
    let bin = env!("CARGO_BIN_EXE_baton");
    let model = support::tiny_model("replica-model");
    let dir = support::scratch("replicas");
    std::fs::create_dir_all(&dir).unwrap();
    let (h0, s0, h1) = (free_tcp(), free_tcp(), free_tcp());
    let cfg = dir.join("cluster.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[cluster]
name = "replicas"
[model]
path = "{model}"
[placement]
mode = "auto"
replicas = 2
# Any queueing at all asks for a replica more: the autoscaling signal's thresholds come from here.
[autoscale]
queue_time_up_s = 0.000001
queue_time_down_s = 0.000001
[[nodes]]
name = "r0-head"
control = "127.0.0.1:{}"
http = "127.0.0.1:{h0}"
memory_gb = 1
[[nodes]]
name = "r0-tail"
control = "127.0.0.1:{}"
http = "127.0.0.1:{s0}"
memory_gb = 1
[[nodes]]
name = "r1-head"
control = "127.0.0.1:{}"
http = "127.0.0.1:{h1}"
memory_gb = 1
replica = 1
[[nodes]]
name = "r1-tail"
control = "127.0.0.1:{}"
memory_gb = 1
replica = 1
"#,
            free_udp(),
            free_udp(),
            free_udp(),
            free_udp(),
            model = model.display()
        ),
    )
    .unwrap();
    assert!(Command::new(bin).args(["cluster", "init", cfg.to_str().unwrap()]).status().unwrap().success());
    let mut nodes = Nodes(Vec::new());
    for name in ["r0-tail", "r1-tail", "r0-head", "r1-head"] {
        nodes.0.push(spawn_node(&cfg, name, &[], None));
    }
    let server = |port: u16| support::Server { child: Command::new("true").spawn().unwrap(), addr: format!("127.0.0.1:{port}"), quic: None, model: model.clone() };
    let (head0, head1, entry) = (server(h0), server(h1), server(s0));
    let deadline = Instant::now() + Duration::from_secs(60);
    for s in [&head0, &head1, &entry] {
        while !support::health_ok(&s.addr) {
            assert!(Instant::now() < deadline, "{} never became ready", s.addr);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let prompt = "Hello, world";
    let out = Command::new(bin)
        .args(["generate", "--model", model.to_str().unwrap(), "--prompt", prompt, "--max-tokens", "24", "--ignore-eos", "--json"])
        .output()
        .unwrap();
    let want: Value = serde_json::from_slice(&out.stdout).unwrap();
    // 16 concurrent requests at `at`, each checked against one node.
    let burst = |at: &support::Server| {
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..16)
                .map(|_| {
                    scope.spawn(move || {
                        support::post(at, "/v1/completions", &json!({"prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": true, "return_token_ids": true}))
                    })
                })
                .collect();
            for (i, h) in handles.into_iter().enumerate() {
                let (status, got) = h.join().unwrap();
                assert_eq!(status, 200, "{got}");
                assert_eq!(got["choices"][0]["token_ids"], want["token_ids"], "request {i}");
            }
        })
    };
    let served = |s: &support::Server| support::stats(s)["generation_tokens_total"].as_u64().unwrap_or(0);
    // What routers poll: a head's load, cheaply.
    let (status, _, body) = support::http(&head0, "GET", "/v1/load", None);
    let load: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status, 200);
    assert!(load["running"].is_u64() && load["waiting"].is_u64() && load["kv_cache_usage"].is_number(), "{load}");
    assert!(load["queue_time_count"].is_u64() && load["queue_time_sum_s"].is_number(), "{load}");
    // The autoscaling signal, on every node's /metrics, once its front has polled both heads:
    // idle, the minimum (placement.replicas).
    let scrape = |s: &support::Server| support::http(s, "GET", "/metrics", None).2;
    let until_metrics = |s: &support::Server, want: &[&str]| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = scrape(s);
            if want.iter().all(|w| text.contains(w)) {
                return text;
            }
            assert!(Instant::now() < deadline, "{}: /metrics never showed {want:?}:\n{text}", s.addr);
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    for s in [&entry, &head0] {
        until_metrics(s, &["baton:replicas 2\n", "baton:desired_replicas{reason=\"bounds\"} 2\n", "baton:replica_requests_waiting{head=\"r0-head\"} 0", "baton:replica_kv_cache_usage_perc{head=\"r1-head\"}"]);
    }

    // Entering at a stage node.
    burst(&entry);
    let (a, b) = (served(&head0), served(&head1));
    assert_eq!(a + b, 16 * 24, "every generated token is counted by exactly one head");
    assert!(a >= 4 * 24 && b >= 4 * 24, "requests entering at a stage were not spread: {a} and {b} tokens");
    // The cluster's view from any node: both replicas, every node, histograms merged as HDR
    // data (the cluster's TTFT count is the two heads' together; its p99 is at least either
    // head's p50).
    let heads_ttft: Vec<Value> = [&head0, &head1].iter().map(|h| support::stats(h)["histograms"]["time_to_first_token_seconds"].clone()).collect();
    let (_, _, body) = support::http(&entry, "GET", "/v1/cluster/stats", None);
    let view: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(view["replicas"].as_array().map(Vec::len), Some(2), "{view}");
    let names: Vec<&str> = view["nodes"].as_array().unwrap().iter().filter_map(|n| n["name"].as_str()).collect();
    assert_eq!(names, ["r0-head", "r0-tail", "r1-head", "r1-tail"], "{view}");
    let merged = &view["cluster"]["histograms"]["time_to_first_token_seconds"];
    let sum: u64 = heads_ttft.iter().map(|h| h["count"].as_u64().unwrap()).sum();
    assert_eq!(merged["count"].as_u64(), Some(sum), "{merged}");
    assert!(heads_ttft.iter().all(|h| merged["p99"].as_f64().unwrap() >= h["p50"].as_f64().unwrap()), "{merged}");
    assert_eq!(view["cluster"]["generation_tokens_total"].as_u64(), Some(a + b));
    let (status, _, page) = support::http(&entry, "GET", "/dashboard", None);
    assert!(status == 200 && page.contains("/v1/cluster/stats"), "{status}");
    // Those requests queued (at all, the threshold here): one replica more is asked for, and
    // each replica's window mean queue time is exported.
    let text = until_metrics(&entry, &["baton:desired_replicas{reason=\"queue_time\"} 3\n"]);
    assert!(text.contains("baton:replica_queue_time_seconds{head=\"r0-head\"}") && text.contains("baton:replica_queue_time_seconds{head=\"r1-head\"}"), "{text}");

    // Entering at a head directly: it sends some to the other head too.
    burst(&head0);
    let (a2, b2) = (served(&head0) - a, served(&head1) - b);
    assert_eq!(a2 + b2, 16 * 24);
    assert!(a2 >= 4 * 24 && b2 >= 4 * 24, "requests entering at head r0 were not spread: {a2} and {b2} tokens");
}
