//! Helpers shared by the unit tests of several modules.

use std::path::Path;

/// Set in a child process of this test binary, to the roots the child should find.
pub const CHILD_EXPECTS: &str = "MQTT_CONNECTOR_TEST_CHILD_EXPECTS";

/// Runs test `name` of this binary in a child process with `SSL_CERT_FILE` set to `file` and
/// [`CHILD_EXPECTS`] to `expects` (the environment is the whole process's: setting it here
/// would race the other tests). Panics with the child's output if it failed.
pub fn run_in_child(name: &str, file: &Path, expects: &str) {
    let output = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", name, "--test-threads", "1", "--nocapture"])
        .env("SSL_CERT_FILE", file)
        .env_remove("SSL_CERT_DIR")
        .env(CHILD_EXPECTS, expects)
        .output()
        .expect("run the test binary");
    let text = String::from_utf8_lossy(&[output.stdout, output.stderr].concat()).into_owned();
    assert!(output.status.success(), "child expecting {expects}: {text}");
    assert!(text.contains("1 passed"), "the child ran no test: {text}");
}
