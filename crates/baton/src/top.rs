//! `baton top`: the dashboard's live view in a terminal (ratatui), for an operator on a node
//! over ssh: the cluster's nodes, throughput and load, latency percentiles merged across the
//! heads, and the replicas; from any node's `/v1/cluster/stats`, once a second. `q` quits.

use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Paragraph, Row, Table};
use serde_json::Value;

#[derive(clap::Args)]
pub struct Args {
    /// Any node's HTTP address.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Milliseconds between refreshes.
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
}

/// What the screen shows, as text: built from `/v1/cluster/stats` (tested without a terminal).
#[derive(Debug, Default, PartialEq)]
pub struct View {
    pub header: String,
    pub load: Vec<(String, String)>,
    pub nodes: Vec<[String; 9]>,
    pub latency: Vec<[String; 7]>,
    pub replicas: Vec<[String; 7]>,
}

const LATENCIES: [(&str, &str); 6] = [
    ("time_to_first_token_seconds", "TTFT"),
    ("inter_token_latency_seconds", "ITL"),
    ("e2e_request_latency_seconds", "end to end"),
    ("request_queue_time_seconds", "queue"),
    ("iteration_time_seconds", "step"),
    ("pipeline_transfer_time_seconds", "transfer/step"),
];

fn secs(v: &Value) -> String {
    match v.as_f64() {
        None => "-".into(),
        Some(s) if s < 1e-3 => format!("{:.0} µs", s * 1e6),
        Some(s) if s < 1.0 => format!("{:.1} ms", s * 1e3),
        Some(s) => format!("{s:.2} s"),
    }
}

fn rate(v: &Value) -> String {
    v.as_f64().map_or_else(|| "-".into(), |r| format!("{r:.1}"))
}

impl View {
    pub fn of(s: &Value) -> View {
        let c = &s["cluster"];
        let nodes = s["nodes"].as_array().cloned().unwrap_or_default();
        let replicas = s["replicas"].as_array().cloned().unwrap_or_default();
        let epochs: Vec<String> = s["plans"].as_object().into_iter().flatten().map(|(h, p)| format!("{h} epoch {}", p["epoch"].as_u64().map_or("-".into(), |e| e.to_string()))).collect();
        let unreachable: Vec<&str> = s["unreachable_heads"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        let mut header = format!("{} nodes, {} replica(s); {}; seen from {}", nodes.len(), replicas.len(), if epochs.is_empty() { "no plan".into() } else { epochs.join(", ") }, s["seen_from"].as_str().unwrap_or("?"));
        if !unreachable.is_empty() {
            header.push_str(&format!("; UNREACHABLE: {}", unreachable.join(", ")));
        }
        let r = &s["rates"];
        let load = vec![
            ("out tok/s".into(), rate(&r["output_tokens_per_s"])),
            ("in tok/s".into(), rate(&r["prompt_tokens_per_s"])),
            ("req/s".into(), rate(&r["requests_per_s"])),
            ("failures/s".into(), rate(&r["failures_per_s"])),
            ("running".into(), c["running"].to_string()),
            ("waiting".into(), c["waiting"].to_string()),
            ("KV".into(), c["kv_cache_usage"].as_f64().map_or("-".into(), |k| format!("{:.1}%", k * 100.0))),
            ("preemptions".into(), c["preemptions"].to_string()),
        ];
        // Each head's plan says what its probes measured of its stages' links.
        let links: std::collections::HashMap<&str, &Value> = s["plans"].as_object().into_iter().flatten().flat_map(|(_, p)| p["nodes"].as_array().into_iter().flatten()).filter_map(|n| Some((n["name"].as_str()?, n))).collect();
        let nodes = nodes
            .iter()
            .map(|n| {
                let link = n["name"].as_str().and_then(|name| links.get(name)).copied().unwrap_or(&Value::Null);
                let layers = n["serving"].as_object().map_or("-".into(), |l| format!("{}..{}", l["first"], l["end"]));
                [
                    n["name"].as_str().unwrap_or("?").to_string(),
                    n["state"].as_str().unwrap_or("?").to_lowercase(),
                    n["replica"].to_string(),
                    if n["head"].as_bool() == Some(true) { "head".into() } else { "stage".into() },
                    layers,
                    n["busy_permille"].as_f64().map_or("-".into(), |b| format!("{:.0}%", b / 10.0)),
                    n["us_per_layer_token"].as_f64().map_or("-".into(), |u| format!("{u:.2}")),
                    n["device"].as_str().unwrap_or("-").to_string(),
                    link["link_ms"].as_f64().map_or("-".into(), |l| format!("{l:.2} ms")),
                ]
            })
            .collect();
        let latency = LATENCIES
            .iter()
            .map(|(key, label)| {
                let h = &c["histograms"][*key];
                [label.to_string(), h["count"].as_u64().unwrap_or(0).to_string(), secs(&h["p50"]), secs(&h["p90"]), secs(&h["p99"]), secs(&h["p99_9"]), secs(&h["max"])]
            })
            .collect();
        let replicas = replicas
            .iter()
            .map(|x| {
                let h = &x["histograms"];
                [
                    x["head"].as_str().unwrap_or("?").to_string(),
                    x["running"].to_string(),
                    x["waiting"].to_string(),
                    x["kv_cache_usage"].as_f64().map_or("-".into(), |k| format!("{:.1}%", k * 100.0)),
                    secs(&h["time_to_first_token_seconds"]["p50"]),
                    secs(&h["time_to_first_token_seconds"]["p99"]),
                    secs(&h["inter_token_latency_seconds"]["p50"]),
                ]
            })
            .collect();
        View { header, load, nodes, latency, replicas }
    }
}

fn table<'a, const N: usize>(title: &'a str, head: [&'a str; N], rows: &'a [[String; N]], widths: [u16; N]) -> Table<'a> {
    let rows = rows.iter().map(|r| Row::new(r.iter().map(String::as_str)));
    Table::new(rows, widths.map(Constraint::Length))
        .header(Row::new(head).style(Style::default().add_modifier(Modifier::BOLD)))
        .block(Block::default().borders(Borders::ALL).title(title))
}

fn draw(frame: &mut ratatui::Frame, view: &View, url: &str, error: Option<&str>) {
    let [top, load, nodes, lower] = Layout::vertical([Constraint::Length(2), Constraint::Length(3), Constraint::Min(6), Constraint::Length(10)]).areas(frame.area());
    let status = error.map_or_else(|| view.header.clone(), |e| format!("{url}: {e}"));
    frame.render_widget(Paragraph::new(vec![Line::from(format!("baton top: {url}   (q quits)")).style(Style::default().add_modifier(Modifier::BOLD)), Line::from(status)]), top);
    let tiles: Vec<String> = view.load.iter().map(|(k, v)| format!("{k} {v}")).collect();
    frame.render_widget(Paragraph::new(tiles.join("   ")).block(Block::default().borders(Borders::ALL).title("throughput and load")), load);
    frame.render_widget(table("nodes", ["node", "state", "replica", "role", "layers", "busy", "µs/layer·tok", "device", "link"], &view.nodes, [14, 9, 8, 6, 9, 6, 13, 22, 10]), nodes);
    let [lat, reps] = Layout::horizontal([Constraint::Percentage(55), Constraint::Percentage(45)]).areas(lower);
    frame.render_widget(table("latency (cluster, merged)", ["", "count", "p50", "p90", "p99", "p99.9", "max"], &view.latency, [14, 8, 9, 9, 9, 9, 9]), lat);
    frame.render_widget(table("replicas", ["head", "run", "wait", "KV", "TTFT p50", "TTFT p99", "ITL p50"], &view.replicas, [12, 4, 5, 7, 9, 9, 9]), reps);
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let url = format!("{}/v1/cluster/stats", args.url.trim_end_matches('/'));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let client = reqwest::Client::new();
    let fetch = || -> Result<Value, String> {
        runtime.block_on(async {
            let r = client.get(&url).timeout(Duration::from_secs(3)).send().await.map_err(|e| e.to_string())?;
            if !r.status().is_success() {
                return Err(format!("HTTP {}", r.status()));
            }
            let body = r.bytes().await.map_err(|e| e.to_string())?;
            serde_json::from_slice::<Value>(&body).map_err(|e| e.to_string())
        })
    };
    let mut terminal = ratatui::init();
    let result = (|| -> anyhow::Result<()> {
        let interval = Duration::from_millis(args.interval_ms.max(100));
        let (mut view, mut error) = (View::default(), None::<String>);
        let mut next = Instant::now();
        loop {
            if Instant::now() >= next {
                match fetch() {
                    Ok(s) => {
                        view = View::of(&s);
                        error = None;
                    }
                    Err(e) => error = Some(e),
                }
                next = Instant::now() + interval;
            }
            terminal.draw(|f| draw(f, &view, &args.url, error.as_deref()))?;
            if event::poll(next.saturating_duration_since(Instant::now()))? {
                if let Event::Key(k) = event::read()? {
                    let ctrl_c = k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                    if k.kind == KeyEventKind::Press && (matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c) {
                        return Ok(());
                    }
                }
            }
        }
    })();
    ratatui::restore();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_view_shows_nodes_rates_and_merged_percentiles() {
        let s = json!({
            "seen_from": "node-b",
            "nodes": [
                {"name": "node-a", "state": "Ready", "replica": 0, "head": true, "serving": {"first": 0, "end": 10, "epoch": 1}, "busy_permille": 420, "us_per_layer_token": 12.5, "device": "cpu (2 threads)"},
                {"name": "node-b", "state": "Draining", "replica": 0, "head": false, "serving": null, "busy_permille": 0, "us_per_layer_token": null},
            ],
            "replicas": [{"head": "node-a", "running": 3, "waiting": 1, "kv_cache_usage": 0.25, "histograms": {"time_to_first_token_seconds": {"p50": 0.0123, "p99": 1.5}}}],
            "cluster": {"running": 3, "waiting": 1, "kv_cache_usage": 0.25, "preemptions": 0, "histograms": {"time_to_first_token_seconds": {"count": 40, "p50": 0.0123, "p90": 0.02, "p99": 1.5, "p99_9": 1.5, "max": 1.6}}},
            "rates": {"output_tokens_per_s": 512.26, "prompt_tokens_per_s": null},
            "plans": {"node-a": {"epoch": 3, "nodes": [{"name": "node-b", "link_ms": 0.456}]}},
            "unreachable_heads": ["node-x"],
        });
        let v = View::of(&s);
        assert_eq!(v.header, "2 nodes, 1 replica(s); node-a epoch 3; seen from node-b; UNREACHABLE: node-x");
        assert_eq!(v.load[0], ("out tok/s".to_string(), "512.3".to_string()));
        assert_eq!(v.load[1].1, "-", "no rate yet");
        assert_eq!(v.nodes[0], ["node-a", "ready", "0", "head", "0..10", "42%", "12.50", "cpu (2 threads)", "-"].map(String::from));
        assert_eq!(v.nodes[1][1..5], ["draining", "0", "stage", "-"].map(String::from));
        assert_eq!(v.nodes[1][8], "0.46 ms");
        assert_eq!(v.latency[0], ["TTFT", "40", "12.3 ms", "20.0 ms", "1.50 s", "1.50 s", "1.60 s"].map(String::from));
        assert_eq!(v.latency[1][1], "0", "no ITL samples");
        assert_eq!(v.replicas[0][..5], ["node-a", "3", "1", "25.0%", "12.3 ms"].map(String::from));
    }
}
