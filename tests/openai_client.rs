//! The official `openai` Python client against a real `baton serve` process
//! (scripts/openai_client_check.py). The interpreter comes from `BATON_TEST_PYTHON`, which
//! scripts/test.sh sets after installing the client; without it the test fails and says how
//! to run it.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn the_official_openai_python_client_works() {
    let python = std::env::var("BATON_TEST_PYTHON").unwrap_or_else(|_| {
        panic!("BATON_TEST_PYTHON is not set: run the tests with scripts/test.sh, which installs the openai client into a virtualenv")
    });
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let model = std::env::temp_dir().join(format!("baton-openai-test-{}", std::process::id()));
    let bin = env!("CARGO_BIN_EXE_baton");
    assert!(Command::new(bin).args(["gen-model", "--preset", "tiny", "--out", model.to_str().unwrap()]).status().unwrap().success());
    let mut server = Command::new(bin)
        .args(["serve", "--model", model.to_str().unwrap(), "--listen", "127.0.0.1:0", "--threads", "2"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(server.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    std::thread::spawn(move || for _ in stderr.lines() {});
    let addr = line.split("http://").nth(1).and_then(|s| s.split_whitespace().next()).unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    }
    // Ready: the script's first call would get 503 while the model loads, so wait for /health.
    loop {
        let out = Command::new(&python)
            .args(["-c", &format!("import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://{addr}/health').status == 200 else 1)")])
            .stderr(Stdio::null())
            .status()
            .unwrap();
        if out.success() {
            break;
        }
        assert!(Instant::now() < deadline, "server never became ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = Command::new(&python)
        .arg(root.join("scripts/openai_client_check.py"))
        .arg(format!("http://{addr}/v1"))
        .output()
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        out.status.success(),
        "openai client check failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
