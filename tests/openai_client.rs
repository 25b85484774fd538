//! The official `openai` Python client against a real `baton serve` process
//! (scripts/openai_client_check.py). The interpreter comes from `BATON_TEST_PYTHON`, which
//! scripts/test.sh sets after installing the client; without it the test fails and says how
//! to run it.

use std::process::Command;

#[path = "support/mod.rs"]
mod support;

#[test]
fn the_official_openai_python_client_works() {
    let python = std::env::var("BATON_TEST_PYTHON").unwrap_or_else(|_| {
        panic!("BATON_TEST_PYTHON is not set: run the tests with scripts/test.sh, which installs the openai client into a virtualenv")
    });
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let server = support::start("openai", &["--no-quic"]);
    let out = Command::new(&python)
        .arg(root.join("scripts/openai_client_check.py"))
        .arg(format!("http://{}/v1", server.addr))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openai client check failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
