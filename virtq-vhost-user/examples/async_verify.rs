//! 64 tokio tasks read a disk exported by qemu-storage-daemon and verify every block, each
//! request awaited on its own: a virtio-blk reader written directly on virtq's async
//! completions ([`AsyncVhostQueue`] and the tokio reactor, [`drive`]).
//!
//! ```sh
//! cargo run --release -p virtq-vhost-user --example async_verify -- [--size 64M] [--tasks 64] [--queue-size 128]
//! ```
//!
//! It writes a disk image whose every 8-byte word is a function of its offset, exports it
//! with qemu-storage-daemon (vhost-user-blk, in a temporary folder), and has the tasks
//! read it in 4 KiB blocks, task `t` taking blocks `t`, `t + tasks`, ... The ring is
//! smaller than the number of tasks by default, so some reads wait for ring space.
//!
//! A virtio-blk read (VIRTIO 1.3, 5.2.6) is one chain: a 16-byte header the device reads
//! (type `IN`, the sector), then the data and a status byte that it writes. Each read owns
//! its guest memory (a control block and the data buffer) by value: the future hands it
//! back with the completion, and if the future is dropped first the queue keeps it until
//! the device is done with it.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtq_vhost_user::blk::{CONFIG_SIZE, DRIVER_FEATURES};
use virtq_vhost_user::reactor::{drive, AsyncVhostQueue};
use virtq_vhost_user::virtio_blk::{req, status, SECTOR};
use virtq_vhost_user::virtq::Sg;
use virtq_vhost_user::{ConnectOptions, Connection, DmaBuffer, MemoryConfig};

const BLOCK: usize = 4096;

/// The disk's contents: each little-endian u64 word holds a function of its offset.
fn word_at(offset: u64) -> u64 {
    offset.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x0123_4567_89ab_cdef
}

/// What a read owns while it is in flight: the request's control block (header at 0,
/// status byte at 16) and the data buffer, both in guest memory.
struct Read {
    ctl: DmaBuffer,
    data: DmaBuffer,
}

/// Reads the block at `offset` and checks every word; returns the first wrong offset.
async fn read_and_verify(queue: &AsyncVhostQueue<Read>, offset: u64) -> Result<(), String> {
    let mem = queue.with_queue(|q| q.memory().clone());
    let (Some(mut ctl), Some(data)) = (mem.alloc(64), mem.alloc(BLOCK)) else {
        return Err("guest memory is full".into());
    };
    ctl[0..4].copy_from_slice(&req::IN.to_le_bytes());
    ctl[4..8].fill(0);
    ctl[8..16].copy_from_slice(&(offset / SECTOR).to_le_bytes());
    ctl[16] = 0xff;
    let header = [Sg::new(ctl.gpa(), 16)];
    let writable = [data.sg(), Sg::new(ctl.gpa() + 16, 1)];
    let (out, ins) = ([&header[..]], [&writable[..]]);
    // The buffers move into the queue here and come back with the completion.
    let used = queue.submit_premapped(&out, &ins, Read { ctl, data }).await.map_err(|e| e.to_string())?;
    let Read { ctl, data } = used.token;
    if ctl[16] != status::OK {
        return Err(format!("block at {offset}: status {:#x}", ctl[16]));
    }
    match data.chunks(8).enumerate().find(|(i, w)| *w != word_at(offset + 8 * *i as u64).to_le_bytes()) {
        Some((i, _)) => Err(format!("byte {} differs", offset + 8 * i as u64)),
        None => Ok(()),
    }
}

fn write_image(path: &Path, bytes: u64) -> std::io::Result<()> {
    let f = std::fs::File::create(path)?;
    for start in (0..bytes).step_by(1 << 20) {
        let end = (start + (1 << 20)).min(bytes);
        let words: Vec<u8> = (start..end).step_by(8).flat_map(|o| word_at(o).to_le_bytes()).collect();
        f.write_all_at(&words, start)?;
    }
    Ok(())
}

/// qemu-storage-daemon exporting `image`; killed on drop.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_daemon(image: &Path, socket: &Path) -> Daemon {
    let child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!("driver=file,node-name=file0,filename={},aio=threads", image.display()))
        .args(["--blockdev", "driver=raw,node-name=disk,file=file0", "--export"])
        .arg(format!("type=vhost-user-blk,id=exp0,node-name=disk,addr.type=unix,addr.path={}", socket.display()))
        .stdin(Stdio::null())
        .spawn()
        .expect("start qemu-storage-daemon (apt-get install qemu-utils)");
    let started = Instant::now();
    while !socket.exists() {
        assert!(started.elapsed() < Duration::from_secs(10), "qemu-storage-daemon did not listen within 10 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    Daemon(child)
}

fn parse_size(s: &str) -> u64 {
    let (num, mult) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1 << 10),
        Some('m' | 'M') => (&s[..s.len() - 1], 1 << 20),
        Some('g' | 'G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().expect("a size such as 64M") * mult
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let bytes = arg("--size").map_or(64 << 20, |s| parse_size(&s)) / BLOCK as u64 * BLOCK as u64;
    let tasks: u64 = arg("--tasks").map_or(64, |s| s.parse().expect("--tasks N"));
    let queue_size: u16 = arg("--queue-size").map_or(32, |s| s.parse().expect("--queue-size N"));

    let dir = std::env::temp_dir().join(format!("async_verify.{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (image, socket) = (dir.join("disk.raw"), dir.join("blk.sock"));
    write_image(&image, bytes)?;
    let daemon = start_daemon(&image, &socket);

    let conn = Connection::connect(
        &socket,
        &ConnectOptions {
            driver_features: DRIVER_FEATURES,
            config_size: CONFIG_SIZE,
            memory: MemoryConfig { size: 16 << 20, regions: 1 },
            ..Default::default()
        },
    )?;
    let queue = Arc::new(AsyncVhostQueue::new(conn.create_queue::<u16>(0, queue_size, 8)?)?);
    // The reactor: a task that runs the interrupt path whenever the daemon signals.
    let reactor = tokio::spawn(drive(queue.clone()));

    let started = Instant::now();
    let blocks = bytes / BLOCK as u64;
    let workers: Vec<_> = (0..tasks)
        .map(|t| {
            let queue = queue.clone();
            tokio::spawn(async move {
                let mut block = t;
                while block < blocks {
                    read_and_verify(&queue, block * BLOCK as u64).await?;
                    block += tasks;
                }
                Ok::<_, String>(())
            })
        })
        .collect();
    let mut failed = 0;
    for w in workers {
        if let Err(e) = w.await? {
            eprintln!("{e}");
            failed += 1;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    reactor.abort();
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
    if failed > 0 {
        return Err(format!("{failed} of {tasks} tasks found errors").into());
    }
    println!(
        "verified {} MiB in {blocks} blocks of 4 KiB with {tasks} tasks on a ring of {queue_size}: {secs:.2} s, {:.0} reads/s",
        bytes >> 20,
        blocks as f64 / secs
    );
    Ok(())
}
