//! Runs a `scripts/guest/` harness (QEMU with a Linux guest against our back ends) for the
//! guest tests: builds the `virtq` binary the harness starts, and bounds the run.

#![allow(dead_code)]

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

pub fn on_path(name: &str) -> bool {
    if name.contains('/') {
        return Path::new(name).is_file();
    }
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
}

/// Builds the `virtq` binary (its `serve-*` commands are the back ends) with the profile of
/// this test and returns its path.
pub fn build_virtq() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(repo_root()).args([
        "build",
        "-p",
        "virtq-cli",
        "--bin",
        "virtq",
        "--message-format=json-render-diagnostics",
    ]);
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    let out = cmd.stderr(Stdio::inherit()).output().expect("run cargo build");
    assert!(out.status.success(), "cargo build -p virtq-cli failed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in
        stdout.lines().filter(|l| l.contains("\"reason\":\"compiler-artifact\"") && l.contains("\"name\":\"virtq\""))
    {
        if let Some(rest) = line.split("\"executable\":\"").nth(1) {
            if let Some(path) = rest.split('"').next() {
                return PathBuf::from(path);
            }
        }
    }
    panic!("cargo did not report the virtq executable");
}

/// Runs `bash scripts/guest/<script> --virtq <virtq>` in a process group of its own and
/// returns its exit status and standard output (also printed). Past `limit`, the group
/// gets SIGTERM (so that the script's trap cleans up), then SIGKILL, and the test fails.
pub fn run_harness(script: &str, virtq: &Path, limit: Duration) -> (ExitStatus, String) {
    let mut child = Command::new("bash")
        .arg(repo_root().join("scripts/guest").join(script))
        .arg("--virtq")
        .arg(virtq)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > limit {
            // SAFETY: kill(2) on the process group we created; no memory involved.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGTERM) };
            std::thread::sleep(Duration::from_secs(5));
            // SAFETY: as above.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            panic!("{script} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = reader.join().unwrap();
    println!("{out}");
    println!("{script}: {status} after {:.1}s", start.elapsed().as_secs_f64());
    (status, out)
}
