//! Async completions over vhost-user: virtio-blk reads awaited one future each, many in
//! flight, with the reactor thread (any executor) and with tokio (`reactor::drive`).
//!
//! - Every layout, against this crate's own back end: hundreds of reads on a small ring
//!   (most wait for space), each verified against the image.
//! - tokio, against qemu-storage-daemon: 64 tasks read and verify a file-backed disk.
//! - A back end that stops answering, then dies: every pending future fails, none hangs,
//!   with either reactor.
//!
//! The qemu-storage-daemon tests are marked ignored where build.rs finds no daemon.

// Both helper modules include the shared `util` files.
#![allow(clippy::duplicate_mod)]

mod backend_util;
mod common;

use std::future::Future;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backend_util::{TestServer, LAYOUTS};
use common::{qsd, Backing, Daemon, Rng};
use virtq_vhost_user::backend::blk::BlkBackendOptions;
use virtq_vhost_user::blk::{CONFIG_SIZE, DRIVER_FEATURES};
use virtq_vhost_user::reactor::{drive, AsyncVhostQueue, Reactor};
use virtq_vhost_user::virtio_blk::{req, SECTOR};
use virtq_vhost_user::virtq::{AddErrorKind, Sg};
use virtq_vhost_user::{ConnectOptions, Connection, DmaBuffer, MemoryConfig};

const BLOCK: usize = 4096;

/// The image's bytes: each little-endian u64 word holds a function of its offset.
fn word_at(offset: u64) -> u64 {
    offset.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5a5a_a5a5
}

fn write_image(path: &Path, bytes: u64) {
    let f = std::fs::File::create(path).expect("image");
    for start in (0..bytes).step_by(1 << 20) {
        let end = (start + (1 << 20)).min(bytes);
        let words: Vec<u8> = (start..end).step_by(8).flat_map(|o| word_at(o).to_le_bytes()).collect();
        f.write_all_at(&words, start).expect("write image");
    }
}

fn check_block(data: &[u8], offset: u64) -> Result<(), String> {
    for (i, w) in data.chunks(8).enumerate() {
        let at = offset + 8 * i as u64;
        if w != word_at(at).to_le_bytes() {
            return Err(format!("byte {at} differs"));
        }
    }
    Ok(())
}

/// A virtio-blk read in flight: its control block (header at 0, status at 16) and data.
struct Read {
    ctl: DmaBuffer,
    data: DmaBuffer,
}

/// Reads `BLOCK` bytes at `offset` and checks them against the image.
async fn read_and_check(queue: &AsyncVhostQueue<Read>, offset: u64) -> Result<(), String> {
    let mem = queue.with_queue(|q| q.memory().clone());
    let mut ctl = mem.alloc(64).ok_or("guest memory full")?;
    ctl[..4].copy_from_slice(&req::IN.to_le_bytes());
    ctl[4..8].fill(0);
    ctl[8..16].copy_from_slice(&(offset / SECTOR).to_le_bytes());
    ctl[16] = 0xff;
    let data = mem.alloc(BLOCK).ok_or("guest memory full")?;
    let header = [Sg::new(ctl.gpa(), 16)];
    let ins = [data.sg(), Sg::new(ctl.gpa() + 16, 1)];
    let (out, ins) = ([&header[..]], [&ins[..]]);
    let used = queue.submit_premapped(&out, &ins, Read { ctl, data }).await.map_err(|e| e.to_string())?;
    let Read { ctl, data } = used.token;
    if ctl[16] != 0 {
        return Err(format!("status {}", ctl[16]));
    }
    check_block(&data, offset)
}

/// A raw connection to a virtio-blk back end, and its first queue made async.
fn connect(socket: &Path, ring_features: u64, size: u16) -> (Connection, Arc<AsyncVhostQueue<Read>>) {
    let opts = ConnectOptions {
        driver_features: DRIVER_FEATURES,
        required_features: ring_features,
        config_size: CONFIG_SIZE,
        memory: MemoryConfig { size: 16 << 20, regions: 1 },
        ..Default::default()
    };
    let conn = Connection::connect(socket, &opts).expect("connect");
    let queue = conn.create_queue::<u16>(0, size, 8).expect("queue");
    (conn, Arc::new(AsyncVhostQueue::new(queue).expect("an empty queue")))
}

/// Polls `fut` to completion on this thread, parking between wakes, for at most `limit`.
fn block_on<F: Future>(fut: F, limit: Duration) -> F::Output {
    futures::executor::block_on(async {
        let deadline = futures_timer(limit);
        futures::pin_mut!(fut, deadline);
        match futures::future::select(fut, deadline).await {
            futures::future::Either::Left((out, _)) => out,
            futures::future::Either::Right(_) => panic!("not done within {limit:?}: a future hangs"),
        }
    })
}

/// A future that completes after `d` (a thread that sleeps, then wakes it).
fn futures_timer(d: Duration) -> impl Future<Output = ()> {
    let (tx, rx) = futures::channel::oneshot::channel::<()>();
    std::thread::spawn(move || {
        std::thread::sleep(d);
        let _ = tx.send(());
    });
    async move {
        let _ = rx.await;
    }
}

#[test]
fn every_layout_completes_hundreds_of_awaited_reads_with_the_reactor_thread() {
    for layout in LAYOUTS {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.raw");
        write_image(&image, 8 << 20);
        let server = TestServer::start_on(dir, image, BlkBackendOptions::default());
        let (_conn, queue) = connect(&server.socket, layout.features().bits(), 16);
        assert_eq!(queue.with_queue(|q| q.vq().layout()).name(), layout.name(), "the layout negotiated");
        let reactor = Reactor::spawn([queue.clone()]).expect("reactor");
        let mut rng = Rng::new(7);
        let offsets: Vec<u64> = (0..300).map(|_| rng.below((8 << 20) / BLOCK as u64) * BLOCK as u64).collect();
        let results = block_on(
            futures::future::join_all(offsets.iter().map(|&o| read_and_check(&queue, o))),
            Duration::from_secs(60),
        );
        for (o, r) in offsets.iter().zip(results) {
            r.unwrap_or_else(|e| panic!("{}: read at {o}: {e}", layout.name()));
        }
        assert_eq!(queue.in_flight(), 0);
        drop(reactor);
        drop(queue);
        server.stop();
    }
}

#[test]
#[cfg_attr(not(peer = "qsd"), ignore = "needs qemu-storage-daemon (scripts/test.sh installs it)")]
fn tokio_tasks_read_and_verify_a_qemu_storage_daemon_disk() {
    let bin = qsd("tokio_tasks_read_and_verify_a_qemu_storage_daemon_disk");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    let bytes = 16u64 << 20;
    write_image(&image, bytes);
    let _daemon = Daemon::start(&bin, dir.path(), Backing::File { path: image, size: bytes }, 1);
    let (_conn, queue) = connect(&dir.path().join("blk.sock"), 0, 64);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_io().enable_time().build().unwrap();
    rt.block_on(async {
        let reactor = tokio::spawn(drive(queue.clone()));
        let tasks: Vec<_> = (0..64u64)
            .map(|t| {
                let queue = queue.clone();
                tokio::spawn(async move {
                    // Each task reads its own blocks, interleaved with the others'.
                    for i in 0..32 {
                        let block = (t + 64 * i) % (bytes / BLOCK as u64);
                        read_and_check(&queue, block * BLOCK as u64).await?;
                    }
                    Ok::<_, String>(())
                })
            })
            .collect();
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .expect("a task hangs")
                .expect("task")
                .expect("read and verify");
        }
        reactor.abort();
    });
}

/// A stopped daemon (SIGSTOP) leaves reads pending; killing it then must fail them all.
fn hang_up_with_reads_pending(use_tokio: bool) {
    let test = "a_back_end_that_dies_fails_every_pending_future";
    let bin = qsd(test);
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(&bin, dir.path(), Backing::Null { size: 64 << 20 }, 1);
    let (_conn, queue) = connect(&daemon.socket, 0, 16);
    let pid = daemon.pid().expect("running") as libc::pid_t;
    // SAFETY: signals the daemon this test started, by PID.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let check = |results: Vec<Result<(), String>>| {
        assert_eq!(results.len(), 40);
        for r in results {
            let e = r.expect_err("no read can complete: the daemon is stopped, then dead");
            assert_eq!(e, AddErrorKind::Broken.to_string());
        }
    };
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        daemon.kill();
    });
    let started = Instant::now();
    if use_tokio {
        let rt = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build().unwrap();
        rt.block_on(async {
            tokio::spawn(drive(queue.clone()));
            let reads = futures::future::join_all((0..40u64).map(|i| read_and_check(&queue, i * BLOCK as u64)));
            check(tokio::time::timeout(Duration::from_secs(30), reads).await.expect("a future hangs"));
        });
    } else {
        let _reactor = Reactor::spawn([queue.clone()]).expect("reactor");
        check(block_on(
            futures::future::join_all((0..40u64).map(|i| read_and_check(&queue, i * BLOCK as u64))),
            Duration::from_secs(30),
        ));
    }
    assert!(started.elapsed() < Duration::from_secs(30));
    killer.join().unwrap();
    assert!(queue.is_broken());
    // The daemon is gone: the ring's buffers are safe to take back.
    let reclaimed = queue.reclaim(|_| {}, drop);
    assert_eq!(reclaimed, 16, "a full ring of reads was in flight");
}

#[test]
#[cfg_attr(not(peer = "qsd"), ignore = "needs qemu-storage-daemon (scripts/test.sh installs it)")]
fn a_back_end_that_dies_fails_every_pending_future_with_the_reactor_thread() {
    hang_up_with_reads_pending(false);
}

#[test]
#[cfg_attr(not(peer = "qsd"), ignore = "needs qemu-storage-daemon (scripts/test.sh installs it)")]
fn a_back_end_that_dies_fails_every_pending_future_with_tokio() {
    hang_up_with_reads_pending(true);
}
