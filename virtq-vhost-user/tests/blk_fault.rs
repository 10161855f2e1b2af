//! Faults: the daemon killed in the middle of a benchmark, and a daemon that stops
//! answering. Every request in flight returns an error, nothing hangs (each wait is
//! bounded), nothing panics, and a new connection to a restarted daemon works.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::{qsd, Backing, Daemon, Rng};
use virtq_vhost_user::blk::{BlkDevice, BlkError, BlkOptions, BlkQueue, Request, RequestError};
use virtq_vhost_user::WaitMode;

#[derive(Debug, Default)]
struct Outcome {
    submitted: u64,
    ok: u64,
    failed: u64,
    refused: u64,
    last_error: Option<RequestError>,
}

/// Random 4 KiB reads and writes at `depth` until the queue gives up on the device.
fn bench_until_failure(mut q: BlkQueue, depth: usize, seed: u64, progress: Arc<AtomicU64>) -> Outcome {
    let mut rng = Rng::new(seed);
    let mut out = Outcome::default();
    let mut comps = Vec::new();
    let sectors = q.info().config.capacity - 8;
    let mut spare: Vec<_> = (0..depth).map(|_| q.alloc(4096).unwrap()).collect();
    loop {
        while q.in_flight() < depth && q.failure().is_none() {
            let buf = spare.pop().unwrap_or_else(|| q.alloc(4096).unwrap());
            let sector = rng.below(sectors) & !7;
            let req = if rng.below(2) == 0 {
                Request::read(sector, vec![buf], 0)
            } else {
                Request::write(sector, vec![buf], 0)
            };
            match q.submit(req) {
                Ok(()) => out.submitted += 1,
                Err(e) => {
                    assert!(matches!(e.error, BlkError::Request(_)), "refused with {e}");
                    out.refused += 1;
                    break;
                }
            }
        }
        if q.in_flight() == 0 && q.failure().is_some() {
            break;
        }
        match q.wait(1, &mut comps, Some(Duration::from_secs(20))) {
            Ok(_) => {}
            Err(e) => panic!("wait failed instead of failing the requests: {e}"),
        }
        for c in comps.drain(..) {
            match c.result {
                Ok(()) => {
                    out.ok += 1;
                    progress.fetch_add(1, Ordering::Relaxed);
                    spare.extend(c.bufs);
                }
                Err(e) => {
                    assert!(c.bufs.is_empty(), "an abandoned request's buffers must not come back");
                    out.failed += 1;
                    out.last_error = Some(e);
                }
            }
        }
    }
    // A failed queue refuses new work with the same error, at once.
    let buf = q.alloc(512).unwrap();
    let e = q.submit(Request::read(0, vec![buf], 0)).unwrap_err();
    assert!(matches!(e.error, BlkError::Request(_)), "{e}");
    out
}

fn kill_mid_bench(wait_modes: &[WaitMode]) {
    let bin = qsd("kill_mid_bench");
    let dir = tempfile::tempdir().unwrap();
    let backing = Backing::File { path: dir.path().join("disk.raw"), size: 64 << 20 };
    let mut daemon = Daemon::start(&bin, dir.path(), backing, wait_modes.len() as u16);
    let opts =
        BlkOptions { queues: wait_modes.len() as u16, request_timeout: Duration::from_secs(10), ..Default::default() };
    let mut dev = BlkDevice::connect(&daemon.socket, &opts).unwrap();
    let progress = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::channel();
    for (i, (mut q, mode)) in dev.take_queues().into_iter().zip(wait_modes.iter().copied()).enumerate() {
        q.set_wait_mode(mode);
        let (tx, progress) = (tx.clone(), progress.clone());
        std::thread::spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                bench_until_failure(q, 32, i as u64, progress)
            }));
            let _ = tx.send((i, mode, r.map_err(|_| "worker panicked")));
        });
    }
    drop(tx);
    // Let the benchmark run, then kill the daemon with requests in flight.
    let start = Instant::now();
    while progress.load(Ordering::Relaxed) < 2000 {
        assert!(start.elapsed() < Duration::from_secs(20), "the benchmark makes no progress");
        std::thread::sleep(Duration::from_millis(10));
    }
    daemon.kill();
    let killed = Instant::now();
    for _ in wait_modes {
        let (i, mode, r) = rx.recv_timeout(Duration::from_secs(15)).expect("a worker hangs after the daemon died");
        let out = r.unwrap();
        eprintln!("queue {i} ({mode:?}): {out:?}, done {:?} after the kill", killed.elapsed());
        assert!(out.ok > 0);
        assert_eq!(out.submitted, out.ok + out.failed, "every submitted request completed exactly once");
        assert!(out.failed > 0, "requests were in flight at the kill");
        assert_eq!(out.last_error, Some(RequestError::Disconnected));
    }
    assert!(!dev.connection().is_connected());
    drop(dev);

    // A restarted daemon takes a new connection.
    daemon.restart();
    let mut dev = BlkDevice::connect(&daemon.socket, &opts).unwrap();
    let mut q = dev.take_queues().remove(0);
    let data: Vec<u8> = (0..65536u32).map(|i| (i * 7) as u8).collect();
    q.write_at(1 << 20, &data).unwrap();
    let mut back = vec![0u8; data.len()];
    q.read_at(1 << 20, &mut back).unwrap();
    assert_eq!(back, data);
}

#[test]
#[cfg_attr(not(peer = "qsd"), ignore = "needs qemu-storage-daemon (scripts/test.sh installs it)")]
fn kill_daemon_mid_bench_sleeping_and_polling_queues() {
    kill_mid_bench(&[WaitMode::Sleep, WaitMode::Poll]);
}

#[test]
#[cfg_attr(not(peer = "qsd"), ignore = "needs qemu-storage-daemon (scripts/test.sh installs it)")]
fn kill_daemon_mid_bench_four_sleeping_queues() {
    kill_mid_bench(&[WaitMode::Sleep, WaitMode::Sleep, WaitMode::Hybrid(Duration::from_micros(20)), WaitMode::Sleep]);
}

#[test]
#[cfg_attr(not(peer = "qsd"), ignore = "needs qemu-storage-daemon (scripts/test.sh installs it)")]
fn stalled_daemon_times_requests_out() {
    let bin = qsd("stalled_daemon_times_requests_out");
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&bin, dir.path(), Backing::Null { size: 1 << 20 }, 1);
    let timeout = Duration::from_millis(800);
    let opts = BlkOptions { request_timeout: timeout, ..Default::default() };
    let mut dev = BlkDevice::connect(&daemon.socket, &opts).unwrap();
    let mut q = dev.take_queues().remove(0);
    q.read_at(0, &mut [0u8; 512]).unwrap();

    let pid = daemon.pid().unwrap() as libc::pid_t;
    // SAFETY: signals a child process of ours by PID; no memory is involved.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    for i in 0..8 {
        let buf = q.alloc(4096).unwrap();
        q.submit(Request::read(i * 8, vec![buf], i)).unwrap();
    }
    let start = Instant::now();
    let mut comps = Vec::new();
    q.wait(8, &mut comps, Some(Duration::from_secs(10))).unwrap();
    let took = start.elapsed();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert!(took >= timeout && took < timeout * 4, "gave up after {took:?}");
    assert_eq!(comps.len(), 8);
    for c in &comps {
        assert_eq!(c.result, Err(RequestError::TimedOut(timeout)));
    }
    let e = q.read_at(0, &mut [0u8; 512]).unwrap_err();
    assert!(e.to_string().contains("gave up"), "{e}");
}
