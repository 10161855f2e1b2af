//! Data integrity against qemu-storage-daemon on a file-backed raw image: random reads,
//! writes and write-zeroes of random sizes and offsets, several segments each, many in
//! flight per queue, checked against an in-memory model of the disk and, at the end,
//! against the image file itself.
//!
//! Always on: every combination of 1 or 4 queues, indirect descriptors on or off, event
//! idx on or off, 10,000 operations each (about 2 s per combination in a debug build).
//! Longer, in release: `virtq-vhost-user/scripts/integrity-long.sh` (200,000 operations per
//! combination; `INTEGRITY_OPS=N` for another count).

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{qsd, Backing, Daemon, Rng};
use virtq_vhost_user::blk::{BlkDevice, BlkOptions, BlkQueue, Op, Request, SECTOR_SIZE};
use virtq_vhost_user::{DmaBuffer, WaitMode};

const DISK: u64 = 64 << 20;
/// Requests in flight per queue.
const DEPTH: usize = 16;
/// Largest request: 128 sectors (64 KiB).
const MAX_SECTORS: u64 = 128;

fn ops_per_run() -> usize {
    std::env::var("INTEGRITY_OPS").ok().and_then(|s| s.parse().ok()).unwrap_or(10_000)
}

struct Pending {
    op: Op,
    sector: u64,
    sectors: u64,
}

/// Splits `len` bytes into 1 to 4 buffers at random byte boundaries.
fn split_buffers(q: &BlkQueue, rng: &mut Rng, len: usize) -> Vec<DmaBuffer> {
    let parts = 1 + rng.below(4.min(len as u64)) as usize;
    let mut cuts: Vec<usize> = (1..parts).map(|_| 1 + rng.below(len as u64 - 1) as usize).collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut bufs = Vec::with_capacity(parts);
    let mut start = 0;
    for end in cuts.into_iter().chain([len]) {
        bufs.push(q.alloc(end - start).expect("guest memory"));
        start = end;
    }
    bufs
}

/// One queue's share of the disk: `[base, base + sectors)`. Returns the model of that range.
fn exercise(mut q: BlkQueue, base: u64, sectors: u64, ops: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut model = vec![0u8; (sectors * SECTOR_SIZE) as usize];
    let mut pending: HashMap<u64, Pending> = HashMap::new();
    let mut comps = Vec::new();
    let (mut issued, mut done, mut reads_checked) = (0usize, 0usize, 0usize);
    while done < ops {
        while issued < ops && pending.len() < DEPTH {
            let roll = rng.below(100);
            let id = issued as u64;
            let req = if roll < 3 {
                pending.insert(id, Pending { op: Op::Flush, sector: 0, sectors: 0 });
                Request::flush(id)
            } else {
                // A range that overlaps no request in flight, so the model is exact.
                let n = 1 + rng.below(MAX_SECTORS);
                let Some(at) = (0..16).map(|_| rng.below(sectors - n + 1)).find(|&s| {
                    pending.values().all(|p| p.sectors == 0 || s + n <= p.sector || p.sector + p.sectors <= s)
                }) else {
                    break;
                };
                let len = (n * SECTOR_SIZE) as usize;
                if roll < 8 {
                    let unmap = rng.below(2) == 0;
                    pending.insert(id, Pending { op: Op::WriteZeroes { unmap }, sector: at, sectors: n });
                    Request::write_zeroes(base + at, n as u32, unmap, id)
                } else if roll < 54 {
                    let mut bufs = split_buffers(&q, &mut rng, len);
                    for b in &mut bufs {
                        rng.fill(b);
                    }
                    pending.insert(id, Pending { op: Op::Write, sector: at, sectors: n });
                    Request::write(base + at, bufs, id)
                } else {
                    let mut bufs = split_buffers(&q, &mut rng, len);
                    for b in &mut bufs {
                        b.fill(0x5a);
                    }
                    pending.insert(id, Pending { op: Op::Read, sector: at, sectors: n });
                    Request::read(base + at, bufs, id)
                }
            };
            q.submit(req).unwrap_or_else(|e| panic!("submit {id}: {e}"));
            issued += 1;
        }
        q.wait(1, &mut comps, Some(Duration::from_secs(20))).expect("wait for completions");
        for c in comps.drain(..) {
            c.result.unwrap_or_else(|e| panic!("request {} ({:?}) failed: {e}", c.user_data, c.op));
            let p = pending.remove(&c.user_data).expect("completion for a request in flight");
            assert_eq!(p.op, c.op);
            let range = (p.sector * SECTOR_SIZE) as usize..((p.sector + p.sectors) * SECTOR_SIZE) as usize;
            match p.op {
                Op::Write => {
                    let mut at = range.start;
                    for b in &c.bufs {
                        model[at..at + b.len()].copy_from_slice(b);
                        at += b.len();
                    }
                    assert_eq!(at, range.end);
                }
                Op::WriteZeroes { .. } => model[range].fill(0),
                Op::Read => {
                    let mut at = range.start;
                    for b in &c.bufs {
                        if model[at..at + b.len()] != b[..] {
                            let i = (0..b.len()).find(|&i| model[at + i] != b[i]).unwrap_or(0);
                            panic!(
                                "queue {}: read of sectors {}+{} differs from the model at disk byte {} (got {:#x}, want {:#x})",
                                q.index(),
                                base + p.sector,
                                p.sectors,
                                base * SECTOR_SIZE + (at + i) as u64,
                                b[i],
                                model[at + i]
                            );
                        }
                        at += b.len();
                    }
                    reads_checked += 1;
                }
                _ => {}
            }
            done += 1;
        }
    }
    assert!(reads_checked > ops / 3, "only {reads_checked} reads checked");
    // Everything read back through the device once more.
    let mut all = vec![0u8; model.len()];
    q.read_at(base * SECTOR_SIZE, &mut all).expect("final read");
    assert!(all == model, "queue {}: final read-back differs from the model", q.index());
    q.close(Duration::from_secs(5)).expect("close");
    model
}

fn integrity(queues: u16, indirect: bool, event_idx: bool, wait: WaitMode) {
    let name = format!("integrity q{queues} indirect={indirect} event_idx={event_idx} {wait:?}");
    let bin = qsd(&name);
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.raw");
    let daemon = Daemon::start(&bin, dir.path(), Backing::File { path: image.clone(), size: DISK }, 4);
    let opts = BlkOptions { queues, indirect_desc: indirect, event_idx, wait, ..Default::default() };
    let mut dev = BlkDevice::connect(&daemon.socket, &opts).expect("connect");
    let f = dev.info().features;
    assert_eq!(f.contains(virtq::Features::INDIRECT_DESC), indirect);
    assert_eq!(f.contains(virtq::Features::EVENT_IDX), event_idx);
    let capacity = dev.info().config.capacity;
    assert_eq!(capacity, DISK / SECTOR_SIZE);
    let share = capacity / queues as u64;
    let ops = ops_per_run();
    let start = Instant::now();
    let workers: Vec<_> = dev
        .take_queues()
        .into_iter()
        .enumerate()
        .map(|(i, q)| {
            let seed = 0x5eed + i as u64 * 7919 + queues as u64 * 13 + indirect as u64 * 2 + event_idx as u64;
            std::thread::spawn(move || exercise(q, i as u64 * share, share, ops.div_ceil(queues as usize), seed))
        })
        .collect();
    let models: Vec<Vec<u8>> = workers.into_iter().map(|w| w.join().expect("worker panicked")).collect();
    eprintln!("{name}: {ops} operations in {:.2?}", start.elapsed());
    drop(dev);
    drop(daemon);
    // The image file itself holds what the model says.
    let file = std::fs::read(&image).expect("read image");
    for (i, m) in models.iter().enumerate() {
        let at = (i as u64 * share * SECTOR_SIZE) as usize;
        assert!(file[at..at + m.len()] == m[..], "image file differs from the model in queue {i}'s range");
    }
}

#[test]
#[cfg_attr(not(peer = "qsd"), ignore = "needs qemu-storage-daemon (scripts/test.sh installs it)")]
fn integrity_1_queue_indirect_event_idx() {
    integrity(1, true, true, WaitMode::Sleep);
}

#[test]
#[cfg_attr(not(peer = "qsd"), ignore = "needs qemu-storage-daemon (scripts/test.sh installs it)")]
fn integrity_1_queue_direct_no_event_idx() {
    integrity(1, false, false, WaitMode::Sleep);
}

#[test]
#[cfg_attr(not(peer = "qsd"), ignore = "needs qemu-storage-daemon (scripts/test.sh installs it)")]
fn integrity_1_queue_indirect_no_event_idx_polling() {
    integrity(1, true, false, WaitMode::Poll);
}

#[test]
#[cfg_attr(not(peer = "qsd"), ignore = "needs qemu-storage-daemon (scripts/test.sh installs it)")]
fn integrity_1_queue_direct_event_idx_hybrid() {
    integrity(1, false, true, WaitMode::Hybrid(Duration::from_micros(50)));
}

#[test]
#[cfg_attr(not(peer = "qsd"), ignore = "needs qemu-storage-daemon (scripts/test.sh installs it)")]
fn integrity_4_queues_indirect_event_idx() {
    integrity(4, true, true, WaitMode::Sleep);
}

#[test]
#[cfg_attr(not(peer = "qsd"), ignore = "needs qemu-storage-daemon (scripts/test.sh installs it)")]
fn integrity_4_queues_direct_no_event_idx() {
    integrity(4, false, false, WaitMode::Sleep);
}

#[test]
#[cfg_attr(not(peer = "qsd"), ignore = "needs qemu-storage-daemon (scripts/test.sh installs it)")]
fn integrity_4_queues_indirect_no_event_idx() {
    integrity(4, true, false, WaitMode::Sleep);
}

#[test]
#[cfg_attr(not(peer = "qsd"), ignore = "needs qemu-storage-daemon (scripts/test.sh installs it)")]
fn integrity_4_queues_direct_event_idx() {
    integrity(4, false, true, WaitMode::Sleep);
}
