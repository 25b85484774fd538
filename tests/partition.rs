//! Partitions between real processes: each node runs in its own network namespace, joined to
//! the others through a bridge by a veth pair (the cluster's network), and to the test by a
//! second veth pair (its clients' and `baton status`'s network, never cut). A cut sets the
//! bridge end of one node's veth down: that node and the rest cannot reach each other, while
//! clients still reach both sides. Namespaces and links are made and removed by the test, which
//! is skipped, saying why, where the kernel or the user may not make them (it needs root).
//!
//! - A stage cut off under load: the head re-places its layers and every stream completes with
//!   one node's tokens; the cut node, holding the whole checkpoint, heads its own side and serves
//!   its clients; `baton status` says the cluster is split; when the link heals it steps down and
//!   is taken back into the head's pipeline under a new plan, and every node answers alike.
//! - The head cut off under load, with requests entering at the stages: the stage next to it
//!   becomes head and the entry nodes resume their streams there; the old head serves its own
//!   side alone; on heal one of the two steps down and one pipeline of three remains.

use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

#[path = "support/mod.rs"]
mod support;

use support::cluster::{deep_tiny_model, log_path, log_tail, log_text, mesh, metric, node_state, reference, stream};

/// The two scenarios run one at a time: six nodes on two cores at once would test the machine.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];
const PROMPTS: [&str; 4] = ["Hello", "The mesh", "Once upon a time", "Partitions"];
const MAX_TOKENS: usize = 300;

/// Runs `ip ARGS`; the error says what failed.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Three namespaces on a bridge, each with a management link to this one; removed when dropped.
struct Net {
    /// Distinguishes this scenario's namespaces, links and subnets from the other's.
    sub: u8,
}

impl Net {
    fn ns(&self, i: usize) -> String {
        format!("baton-part-{}-{i}", self.sub)
    }

    fn bridge(&self) -> String {
        format!("bt{}br", self.sub)
    }

    /// The bridge end of node `i`'s cluster link.
    fn cluster_link(&self, i: usize) -> String {
        format!("bt{}n{i}", self.sub)
    }

    fn mgmt_link(&self, i: usize) -> String {
        format!("bt{}m{i}", self.sub)
    }

    /// Node `i`'s address: on its cluster link, reached from here through its management link.
    fn ip(&self, i: usize) -> String {
        format!("10.77.{}.{}", self.sub, i + 1)
    }

    fn create(sub: u8) -> Result<Net, String> {
        let net = Net { sub };
        net.remove();
        let (br, s) = (net.bridge(), sub.to_string());
        ip(&["link", "add", &br, "type", "bridge"])?;
        ip(&["link", "set", &br, "up"])?;
        for i in 0..NODES.len() {
            let ns = net.ns(i);
            ip(&["netns", "add", &ns])?;
            let (outer, inner) = (net.cluster_link(i), format!("bt{s}p{i}"));
            ip(&["link", "add", &outer, "type", "veth", "peer", "name", &inner, "netns", &ns])?;
            ip(&["link", "set", &outer, "master", &br, "up"])?;
            let (m_outer, m_inner) = (net.mgmt_link(i), format!("bt{s}q{i}"));
            ip(&["link", "add", &m_outer, "type", "veth", "peer", "name", &m_inner, "netns", &ns])?;
            let (m_here, m_there) = (format!("10.78.{s}.{}", 4 * i + 1), format!("10.78.{s}.{}", 4 * i + 2));
            ip(&["addr", "add", &format!("{m_here}/30"), "dev", &m_outer])?;
            ip(&["link", "set", &m_outer, "up"])?;
            ip(&["route", "replace", &format!("{}/32", net.ip(i)), "via", &m_there])?;
            for args in [
                vec!["link", "set", "lo", "up"],
                vec!["addr", "add", &format!("{}/24", net.ip(i)), "dev", &inner],
                vec!["link", "set", &inner, "up"],
                vec!["addr", "add", &format!("{m_there}/30"), "dev", &m_inner],
                vec!["link", "set", &m_inner, "up"],
            ] {
                let mut all = vec!["-n", ns.as_str()];
                all.extend(args.iter().copied());
                ip(&all)?;
            }
        }
        Ok(net)
    }

    /// Cuts node `i` off from the other nodes (its clients still reach it).
    fn cut(&self, i: usize) {
        ip(&["link", "set", &self.cluster_link(i), "down"]).unwrap();
    }

    fn heal(&self, i: usize) {
        ip(&["link", "set", &self.cluster_link(i), "up"]).unwrap();
    }

    fn remove(&self) {
        for i in 0..NODES.len() {
            let _ = ip(&["link", "del", &self.mgmt_link(i)]);
            let _ = ip(&["link", "del", &self.cluster_link(i)]);
            let _ = ip(&["netns", "del", &self.ns(i)]);
        }
        let _ = ip(&["link", "del", &self.bridge()]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.remove();
    }
}

/// The nodes' processes, killed when dropped (before the namespaces go).
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The network, or why this machine cannot make one.
fn network(sub: u8) -> Option<Net> {
    match Net::create(sub) {
        Ok(net) => Some(net),
        Err(e) => {
            eprintln!("SKIPPED: the partition tests need network namespaces and veth pairs (run as root with iproute2): {e}");
            None
        }
    }
}

/// Fields drop in order: the processes end before their namespaces go.
struct Cluster {
    _procs: Procs,
    cfg: std::path::PathBuf,
    model: std::path::PathBuf,
    /// One engine's tokens for each of `PROMPTS`, `MAX_TOKENS` of them.
    want: Vec<Vec<u64>>,
    net: Net,
}

impl Cluster {
    /// cluster.toml for the three nodes at their namespaces' addresses, the cluster's
    /// certificates, and the nodes (QUIC tensor plane); returns once node-a serves.
    fn start(name: &str, net: Net) -> Cluster {
        let model = deep_tiny_model(&format!("{name}-model"));
        let dir = support::scratch(name);
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("cluster.toml");
        let mut text = format!("[cluster]\nname = \"{name}\"\n[model]\npath = \"{}\"\n[placement]\nmode = \"auto\"\n", model.display());
        for (i, n) in NODES.iter().enumerate() {
            let a = net.ip(i);
            text += &format!("[[nodes]]\nname = \"{n}\"\ncontrol = \"{a}:7000\"\nhttp = \"{a}:8000\"\nmemory_gb = 1\n");
        }
        std::fs::write(&cfg, text).unwrap();
        let bin = env!("CARGO_BIN_EXE_baton");
        assert!(Command::new(bin).args(["cluster", "init", cfg.to_str().unwrap()]).stdout(Stdio::null()).status().unwrap().success());
        let mut procs = Procs(Vec::new());
        for i in (0..NODES.len()).rev() {
            let log = std::fs::OpenOptions::new().create(true).append(true).open(log_path(&cfg, NODES[i])).unwrap();
            let child = Command::new("ip")
                .args(["netns", "exec", &net.ns(i), bin, "node", "--cluster", cfg.to_str().unwrap(), "--name", NODES[i]])
                .args(["--threads", "1", "--kv-cache-mb", "64", "--tensor-plane", "quic"])
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .spawn()
                .unwrap();
            procs.0.push(child);
        }
        let want = PROMPTS.iter().map(|p| reference(&model, p, MAX_TOKENS)).collect();
        let c = Cluster { _procs: procs, cfg, model, want, net };
        c.wait_for("node-a to serve", 90, || support::health_ok(&c.at(0).addr));
        c
    }

    /// Node `i`'s HTTP API (a head's own, or an entry front's).
    fn at(&self, i: usize) -> support::Server {
        support::Server { child: Command::new("true").spawn().unwrap(), addr: format!("{}:8000", self.net.ip(i)), quic: None, model: self.model.clone() }
    }

    fn logs(&self) -> String {
        NODES.iter().map(|n| format!("--- {n}:\n{}\n", log_tail(&self.cfg, n))).collect()
    }

    fn wait_for(&self, what: &str, secs: u64, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `baton status --json`, run here (it reaches every node through its management link).
    fn status(&self) -> Value {
        let out = Command::new(env!("CARGO_BIN_EXE_baton")).args(["status", "--cluster", self.cfg.to_str().unwrap(), "--json"]).output().unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    /// The heads the cluster's sides follow, as `baton status` reports a split (empty: none).
    fn split(&self) -> Vec<String> {
        let s = self.status();
        let sides = s["split"].as_array().and_then(|p| p.first()).map(|p| p["sides"].clone()).unwrap_or(Value::Null);
        sides.as_array().map_or(Vec::new(), |s| s.iter().filter_map(|x| x["head"].as_str().map(str::to_string)).collect())
    }

    /// Every stream completed with exactly one node's tokens.
    fn check(&self, results: &[(u16, Vec<u64>, String)], want: &[Vec<u64>], what: &str) {
        for (i, (status, tokens, text)) in results.iter().enumerate() {
            assert_eq!(*status, 200, "{what}: request {i}: {text}\n{}", self.logs());
            assert_eq!(*tokens, want[i % want.len()], "{what}: request {i}: tokens differ from one node's\n{}", self.logs());
        }
    }

    /// Eight greedy streams entering at the nodes `entries` in turn; node `cut` is cut off once
    /// they are under way (the head, node-a, has streamed ten tokens each). Each is checked.
    fn streams_across_a_cut(&self, entries: &[usize], cut: usize, what: &str) {
        let nodes: Vec<support::Server> = entries.iter().map(|&i| self.at(i)).collect();
        let head = self.at(0);
        let (nodes, h) = (&nodes, &head);
        let results = std::thread::scope(|scope| {
            let streams: Vec<_> = (0..8).map(|i| scope.spawn(move || stream(&nodes[i % nodes.len()], PROMPTS[i % 4], MAX_TOKENS))).collect();
            self.wait_for("the streams to get going", 60, || metric(h, "baton:inter_token_latency_seconds_count") >= 8.0 * 10.0);
            self.net.cut(cut);
            streams.into_iter().map(|s| s.join().unwrap()).collect::<Vec<_>>()
        });
        self.check(&results, &self.want, what);
    }

    /// After a heal: every node serves again, each giving one engine's tokens.
    fn every_node_answers(&self, want: &[u64]) {
        for i in 0..NODES.len() {
            self.wait_for("every node to answer", 30, || support::health_ok(&self.at(i).addr));
            self.ask(i, want, "after the heal");
        }
    }

    /// One greedy stream entering at node `i`, checked against `want`.
    fn ask(&self, i: usize, want: &[u64], what: &str) {
        let r = stream(&self.at(i), PROMPTS[0], want.len());
        self.check(&[r], &[want.to_vec()], &format!("{what} (entering at {})", NODES[i]));
    }
}

/// The head's view of node `name` and the plan's epoch, through node `i`'s API.
fn view(c: &Cluster, i: usize, name: &str) -> (String, u64) {
    let v = mesh(&c.at(i));
    (node_state(&v, name), v["epoch"].as_u64().unwrap_or(0))
}

#[test]
fn a_cut_stage_serves_its_own_side_and_is_taken_back_when_the_link_heals() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(net) = network(101) else { return };
    let c = Cluster::start("partition-stage", net);
    let short = &c.want[0][..24];
    let head = c.at(0);

    // Streams entering at node-a; node-c (layers 8..12) is cut off once they are under way.
    c.streams_across_a_cut(&[0], 2, "streams across the cut");
    c.wait_for("node-a to re-place node-c's layers", 30, || view(&c, 0, "node-c").0 == "down");
    assert!(metric(&head, "baton:requests_recomputed_total") >= 1.0, "no stream was migrated: the cut came too late");

    // node-c holds the whole checkpoint: alone on its side it heads a pipeline of its own and
    // serves the clients that reach it, while node-a serves its side.
    c.wait_for("node-c to head its own side", 60, || c.split().len() == 2);
    let mut sides = c.split();
    sides.sort();
    assert_eq!(sides, ["node-a", "node-c"], "{}", c.status());
    c.wait_for("node-c to serve", 30, || support::health_ok(&c.at(2).addr));
    c.ask(2, short, "the cut side");
    c.ask(0, short, "the head's side");
    c.ask(1, short, "the head's side");
    let (_, epoch_split) = view(&c, 0, "node-c");

    // The link heals: node-c, the lesser head, steps down, and node-a takes it back.
    c.net.heal(2);
    c.wait_for("node-c to step down", 60, || log_text(&c.cfg, "node-c").contains("stepping down"));
    c.wait_for("node-a to take node-c back", 90, || view(&c, 0, "node-c").0 == "serving");
    c.wait_for("the split to end", 30, || c.split().is_empty());
    assert!(view(&c, 0, "node-c").1 > epoch_split, "node-c was taken back under the old plan");
    c.every_node_answers(short);
    assert_eq!(metric(&head, "baton:request_failure_total"), 0.0);
}

#[test]
fn a_cut_head_is_succeeded_on_the_other_side_and_one_head_remains_when_the_link_heals() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(net) = network(102) else { return };
    let c = Cluster::start("partition-head", net);
    let short = &c.want[0][..24];

    // Streams entering at node-b and node-c; node-a, the head, is cut off once they are under way.
    c.streams_across_a_cut(&[1, 2], 0, "streams entering at the stages across the head's cut");
    assert!(log_text(&c.cfg, "node-b").contains("heads the pipeline now"), "node-b did not take over\n{}", c.logs());

    // Two sides, each with a head: node-b (with node-c), and node-a alone.
    c.wait_for("both sides to have a head", 60, || c.split().len() == 2);
    let mut sides = c.split();
    sides.sort();
    assert_eq!(sides, ["node-a", "node-b"], "{}", c.status());
    c.wait_for("node-a to serve alone", 60, || support::health_ok(&c.at(0).addr));
    c.ask(0, short, "the old head's side");
    c.ask(1, short, "the new head's side");
    c.ask(2, short, "the new head's side");

    // The link heals: one head steps down and serves the other; one pipeline of three remains.
    c.net.heal(0);
    c.wait_for("one head to step down", 60, || NODES.iter().any(|n| log_text(&c.cfg, n).contains("stepping down")));
    c.wait_for("the split to end", 60, || c.split().is_empty());
    c.wait_for("one pipeline of three", 90, || {
        let v = mesh(&c.at(2));
        NODES.iter().all(|n| node_state(&v, n) == "serving")
    });
    c.every_node_answers(short);
}
