//! `virtq blk`: a userspace virtio-blk driver over vhost-user (virtq-vhost-user's `blk`),
//! for a back end such as qemu-storage-daemon's vhost-user-blk export.
//!
//! ```text
//! virtq blk --socket PATH info                      config space, features, device id
//! virtq blk --socket PATH --split --no-in-order ... force the split ring, no in-order
//! virtq blk --socket PATH read --offset 0 --length 4k [--output FILE]
//! virtq blk --socket PATH write --offset 0 (--input FILE | --pattern 0xaa --length 4k)
//! virtq blk --socket PATH verify --length 16M       write random data, read it back, compare
//! virtq blk --socket PATH bench --rw randread --bs 4k --iodepth 32 --queues 1 --duration 10s
//! ```

use std::io::{self, IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use virtq_vhost_user::blk::{
    AsyncBlkQueue, BlkDevice, BlkError, BlkInfo, BlkOptions, BlkQueue, Request, RequestError, SECTOR_SIZE,
};
use virtq_vhost_user::reactor;
use virtq_vhost_user::{DmaBuffer, MemoryConfig, WaitMode};

/// Arguments of `virtq blk`.
#[derive(Debug, Args)]
pub struct BlkArgs {
    /// The vhost-user-blk socket (e.g. qemu-storage-daemon's `addr.path`).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,

    /// Ring entries per queue (a power of two).
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = parse_queue_size)]
    queue_size: u16,

    /// Do not negotiate VIRTIO_RING_F_EVENT_IDX.
    #[arg(long)]
    no_event_idx: bool,

    /// Do not negotiate VIRTIO_RING_F_INDIRECT_DESC.
    #[arg(long)]
    no_indirect: bool,

    /// Use the split ring even if the device offers VIRTIO_F_RING_PACKED (by default the
    /// packed ring is negotiated when offered).
    #[arg(long)]
    split: bool,

    /// Do not negotiate VIRTIO_F_IN_ORDER (by default it is, when offered).
    #[arg(long)]
    no_in_order: bool,

    /// Time allowed for each vhost-user control message and, times 6, for requests
    /// in flight without progress (`info`'s GET_ID: once) (e.g. 5s, 500ms).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    timeout: Duration,

    #[command(subcommand)]
    command: BlkCommand,
}

#[derive(Debug, Subcommand)]
enum BlkCommand {
    /// Show the device: capacity, block size, queues, limits, features, id.
    Info {
        /// Print JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Read bytes from the device to a file, or as a hex dump to stdout.
    Read {
        /// Byte offset (a multiple of 512; suffixes k, M, G).
        #[arg(long, default_value = "0", value_parser = parse_size)]
        offset: u64,
        /// Bytes to read (a multiple of 512).
        #[arg(long, default_value = "512", value_parser = parse_size)]
        length: u64,
        /// Write the bytes here instead of dumping them.
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Write bytes to the device from a file (or stdin: `-`) or a repeated byte.
    Write {
        /// Byte offset (a multiple of 512; suffixes k, M, G).
        #[arg(long, default_value = "0", value_parser = parse_size)]
        offset: u64,
        /// Read the data from this file (`-`: stdin); padded with zeroes to 512 bytes.
        #[arg(long, short, value_name = "FILE", conflicts_with = "pattern")]
        input: Option<PathBuf>,
        /// Write this byte repeated (`--length` bytes).
        #[arg(long, value_name = "BYTE", value_parser = parse_byte)]
        pattern: Option<u8>,
        /// Bytes to write with --pattern (a multiple of 512).
        #[arg(long, value_parser = parse_size)]
        length: Option<u64>,
        /// Flush the device's write cache afterwards.
        #[arg(long)]
        flush: bool,
    },
    /// Write pseudo-random data over a range, read it back and compare (destroys the data).
    Verify {
        /// Byte offset (a multiple of 512).
        #[arg(long, default_value = "0", value_parser = parse_size)]
        offset: u64,
        /// Bytes to verify [default: the whole device].
        #[arg(long, value_parser = parse_size)]
        length: Option<u64>,
        /// Request size (a multiple of 512).
        #[arg(long, default_value = "64k", value_parser = parse_size)]
        bs: u64,
        /// Requests in flight.
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
        iodepth: u16,
        /// Seed of the data.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Measure IOPS, bandwidth and latency.
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// Access pattern.
    #[arg(long, value_enum, default_value_t = Pattern::Random)]
    pattern: Pattern,
    /// Request size (a multiple of 512; suffixes k, M).
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    bs: u64,
    /// Percentage of reads; the rest are writes (writes destroy data).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u8).range(0..=100))]
    read_pct: u8,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=1024))]
    iodepth: u16,
    /// Queues, one thread each.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    queues: u16,
    /// Measured time (e.g. 10s, 500ms).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Warm-up before measuring.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,
    /// Bytes of the device to use, from offset 0 [default: all of it].
    #[arg(long, value_parser = parse_size)]
    range: Option<u64>,
    /// How to wait for completions.
    #[arg(long, value_enum, default_value_t = WaitArg::Sleep)]
    wait: WaitArg,
    /// Await each request on its own: one tokio task per request in flight, and a reactor
    /// task that waits as `--wait` says (sleeps on the call eventfd, or busy-polls).
    #[arg(long = "async")]
    r#async: bool,
    /// Print the results as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Pattern {
    /// Uniformly random offsets.
    #[value(alias = "rand")]
    Random,
    /// Each queue streams through its own part of the range.
    #[value(alias = "seq")]
    Sequential,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum WaitArg {
    /// Sleep on the call eventfd.
    Sleep,
    /// Busy-poll the used ring (one CPU per queue).
    Poll,
    /// Poll for 50 µs, then sleep.
    Hybrid,
}

impl WaitArg {
    fn mode(self) -> WaitMode {
        match self {
            Self::Sleep => WaitMode::Sleep,
            Self::Poll => WaitMode::Poll,
            Self::Hybrid => WaitMode::Hybrid(Duration::from_micros(50)),
        }
    }
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(n) if n >= 2 && n.is_power_of_two() && n <= 32768 => Ok(n),
        _ => Err(format!("{s:?} is not a power of two from 2 to 32768")),
    }
}

/// `4096`, `4k`, `64K`, `1M`, `2G`, `0x1000`.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if let Some(hex) = t.strip_prefix("0x") {
        return u64::from_str_radix(hex, 16).map_err(|e| format!("{s:?}: {e}"));
    }
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_lowercase() {
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                _ => return Err(format!("{s:?}: unknown suffix {c:?} (use k, M, G, T)")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a size (e.g. 4096, 4k, 1M)"))
}

/// `10s`, `500ms`, `2m`, `1.5s`, or plain seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, unit) = match t.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => (&t[..i], &t[i..]),
        None => (t, "s"),
    };
    let v: f64 = num.parse().map_err(|_| format!("{s:?} is not a duration (e.g. 10s, 500ms)"))?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "us" | "µs" => v / 1e6,
        "s" => v,
        "m" | "min" => v * 60.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use us, ms, s, m)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{s:?} is not a valid duration"))
}

fn parse_byte(s: &str) -> Result<u8, String> {
    let t = s.trim();
    let r = match t.strip_prefix("0x") {
        Some(hex) => u8::from_str_radix(hex, 16),
        None => t.parse::<u8>(),
    };
    r.map_err(|_| format!("{s:?} is not a byte (0 to 255 or 0x00 to 0xff)"))
}

/// An error for the user: what failed, and the error.
struct Failure(String);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Self(e.to_string())
    }
}

fn fail(msg: impl Into<String>) -> Failure {
    Failure(msg.into())
}

/// Runs `virtq blk`.
pub fn run(args: BlkArgs) -> ExitCode {
    match run_inner(args) {
        Ok(code) => code,
        Err(Failure(msg)) => {
            eprintln!("virtq blk: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn options(args: &BlkArgs, queues: u16, memory: usize) -> BlkOptions {
    BlkOptions {
        queues,
        queue_size: args.queue_size,
        event_idx: !args.no_event_idx,
        indirect_desc: !args.no_indirect,
        ring_packed: !args.split,
        in_order: !args.no_in_order,
        memory: MemoryConfig { size: memory.max(16 << 20), regions: 1 },
        control_timeout: args.timeout,
        request_timeout: args.timeout * 6,
        ..Default::default()
    }
}

fn connect(args: &BlkArgs, queues: u16, memory: usize) -> Result<(BlkDevice, Vec<BlkQueue>), Failure> {
    let mut dev = BlkDevice::connect(&args.socket, &options(args, queues, memory))
        .map_err(|e| fail(format!("connecting to {}: {e}", args.socket.display())))?;
    let queues = dev.take_queues();
    Ok((dev, queues))
}

fn check_range(info: &BlkInfo, offset: u64, length: u64) -> Result<(), Failure> {
    if !offset.is_multiple_of(SECTOR_SIZE) || !length.is_multiple_of(SECTOR_SIZE) {
        return Err(fail(format!("offset {offset} and length {length} must be multiples of {SECTOR_SIZE}")));
    }
    let cap = info.capacity_bytes();
    if offset.checked_add(length).is_none_or(|end| end > cap) {
        return Err(fail(format!(
            "bytes {offset}..{} are beyond the device's {cap} bytes",
            offset.saturating_add(length)
        )));
    }
    Ok(())
}

fn run_inner(args: BlkArgs) -> Result<ExitCode, Failure> {
    match &args.command {
        BlkCommand::Info { json } => info(&args, *json),
        BlkCommand::Read { offset, length, output } => read(&args, *offset, *length, output.as_ref()),
        BlkCommand::Write { offset, input, pattern, length, flush } => {
            write(&args, *offset, input.as_ref(), *pattern, *length, *flush)
        }
        BlkCommand::Verify { offset, length, bs, iodepth, seed } => {
            verify(&args, *offset, *length, *bs, *iodepth as usize, *seed)
        }
        BlkCommand::Bench(b) => bench(&args, b),
    }
}

#[derive(Serialize)]
struct InfoJson {
    socket: String,
    id: Option<String>,
    capacity_sectors: u64,
    capacity_bytes: u64,
    block_size: u32,
    read_only: bool,
    device_queues: u16,
    queue_size: u16,
    /// What the device offers (`SEG_MAX`).
    seg_max: Option<u32>,
    /// Segments per request this driver uses (seg_max, capped).
    max_segments: u32,
    size_max: Option<u32>,
    writeback: Option<u8>,
    max_discard_sectors: Option<u32>,
    max_discard_seg: Option<u32>,
    discard_sector_alignment: Option<u32>,
    max_write_zeroes_sectors: Option<u32>,
    max_write_zeroes_seg: Option<u32>,
    write_zeroes_may_unmap: Option<bool>,
    blk_features: Vec<&'static str>,
    ring_features: String,
    features_bits: String,
}

fn info(args: &BlkArgs, json: bool) -> Result<ExitCode, Failure> {
    use virtq_vhost_user::blk::feature as f;
    // GET_ID is the one request here: it gets `--timeout`, not the I/O commands' longer one.
    let opts = BlkOptions { request_timeout: args.timeout, ..options(args, 1, 0) };
    let mut dev = BlkDevice::connect(&args.socket, &opts)
        .map_err(|e| fail(format!("connecting to {}: {e}", args.socket.display())))?;
    let mut queues = dev.take_queues();
    let i = dev.info();
    let c = &i.config;
    // A device may refuse GET_ID (UNSUPP or IOERR: it answered); one that does not answer,
    // or answers out of protocol, fails the command.
    let id = match queues[0].get_id() {
        Ok(id) => Some(id),
        Err(BlkError::Request(RequestError::Unsupported | RequestError::IoError)) => None,
        Err(e) => return Err(fail(format!("GET_ID: {e}"))),
    };
    let opt = |bit: u64, v| i.has(bit).then_some(v);
    let ring = virtq_vhost_user::virtq::Features::from_bits(i.features.bits() & (((1 << 42) - 1) & !((1 << 28) - 1)));
    let out = InfoJson {
        socket: args.socket.display().to_string(),
        id,
        capacity_sectors: c.capacity,
        capacity_bytes: i.capacity_bytes(),
        block_size: i.block_size(),
        read_only: i.read_only(),
        device_queues: i.device_queues,
        queue_size: i.queue_size,
        seg_max: opt(f::SEG_MAX, c.seg_max),
        max_segments: i.max_segments(),
        size_max: opt(f::SIZE_MAX, c.size_max),
        writeback: i.has(f::CONFIG_WCE).then_some(c.writeback),
        max_discard_sectors: opt(f::DISCARD, c.max_discard_sectors),
        max_discard_seg: opt(f::DISCARD, c.max_discard_seg),
        discard_sector_alignment: opt(f::DISCARD, c.discard_sector_alignment),
        max_write_zeroes_sectors: opt(f::WRITE_ZEROES, c.max_write_zeroes_sectors),
        max_write_zeroes_seg: opt(f::WRITE_ZEROES, c.max_write_zeroes_seg),
        write_zeroes_may_unmap: i.has(f::WRITE_ZEROES).then_some(c.write_zeroes_may_unmap),
        blk_features: i.feature_names(),
        ring_features: format!("{ring:?}"),
        features_bits: format!("{:#x}", i.features.bits()),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    let show = |v: Option<u32>| v.map_or("-".to_string(), |v| v.to_string());
    println!("socket              {}", out.socket);
    println!("id                  {}", out.id.as_deref().unwrap_or("-"));
    println!("capacity            {} sectors ({})", out.capacity_sectors, human_bytes(out.capacity_bytes));
    println!("block size          {}", out.block_size);
    println!("read-only           {}", out.read_only);
    println!("queues              {} (ring size {})", out.device_queues, out.queue_size);
    println!(
        "segments            seg_max {}, {} used per request, size_max {}",
        show(out.seg_max),
        out.max_segments,
        show(out.size_max)
    );
    println!("writeback           {}", out.writeback.map_or("-".to_string(), |w| w.to_string()));
    println!(
        "discard             max {} sectors, {} segments, alignment {}",
        show(out.max_discard_sectors),
        show(out.max_discard_seg),
        show(out.discard_sector_alignment)
    );
    println!(
        "write zeroes        max {} sectors, {} segments, may unmap {}",
        show(out.max_write_zeroes_sectors),
        show(out.max_write_zeroes_seg),
        out.write_zeroes_may_unmap.map_or("-".to_string(), |b| b.to_string())
    );
    println!("blk features        {}", out.blk_features.join(" "));
    println!("ring features       {} ({})", out.ring_features, out.features_bits);
    Ok(ExitCode::SUCCESS)
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn read(args: &BlkArgs, offset: u64, length: u64, output: Option<&PathBuf>) -> Result<ExitCode, Failure> {
    let (dev, mut queues) = connect(args, 1, 0)?;
    check_range(dev.info(), offset, length)?;
    let mut buf = vec![0u8; length as usize];
    queues[0].read_at(offset, &mut buf)?;
    match output {
        Some(p) if p.as_os_str() != "-" => {
            std::fs::write(p, &buf).map_err(|e| fail(format!("writing {}: {e}", p.display())))?
        }
        Some(_) => io::stdout().write_all(&buf)?,
        None => hexdump(offset, &buf)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `xxd`-style dump; runs of identical lines collapse into `*`.
fn hexdump(base: u64, buf: &[u8]) -> io::Result<()> {
    let mut out = io::BufWriter::new(io::stdout().lock());
    let mut prev: Option<&[u8]> = None;
    let mut starred = false;
    for (i, line) in buf.chunks(16).enumerate() {
        if prev == Some(line) {
            if !starred {
                writeln!(out, "*")?;
                starred = true;
            }
            continue;
        }
        starred = false;
        prev = Some(line);
        write!(out, "{:08x}: ", base + i as u64 * 16)?;
        for (j, b) in line.iter().enumerate() {
            write!(out, "{b:02x}{}", if j % 2 == 1 { " " } else { "" })?;
        }
        let text: String =
            line.iter().map(|&b| if b.is_ascii_graphic() || b == b' ' { b as char } else { '.' }).collect();
        writeln!(out, " {text}")?;
    }
    if starred {
        writeln!(out, "{:08x}", base + buf.len() as u64)?;
    }
    out.flush()
}

fn write(
    args: &BlkArgs,
    offset: u64,
    input: Option<&PathBuf>,
    pattern: Option<u8>,
    length: Option<u64>,
    flush: bool,
) -> Result<ExitCode, Failure> {
    let mut data = match (input, pattern) {
        (Some(p), _) if p.as_os_str() == "-" => {
            let mut v = Vec::new();
            io::stdin().read_to_end(&mut v)?;
            v
        }
        (Some(p), _) => std::fs::read(p).map_err(|e| fail(format!("reading {}: {e}", p.display())))?,
        (None, Some(b)) => {
            let len = length.ok_or_else(|| fail("--pattern needs --length"))?;
            vec![b; len as usize]
        }
        (None, None) => return Err(fail("say what to write: --input FILE or --pattern BYTE --length N")),
    };
    if let (Some(len), Some(_)) = (length, input) {
        data.resize(len as usize, 0);
    }
    let padded = data.len().next_multiple_of(SECTOR_SIZE as usize).max(SECTOR_SIZE as usize);
    data.resize(padded, 0);
    let (dev, mut queues) = connect(args, 1, 0)?;
    check_range(dev.info(), offset, data.len() as u64)?;
    let q = &mut queues[0];
    q.write_at(offset, &data)?;
    if flush {
        q.flush()?;
    }
    eprintln!("wrote {} bytes at offset {offset}{}", data.len(), if flush { ", flushed" } else { "" });
    Ok(ExitCode::SUCCESS)
}

/// xorshift64*: fast, reproducible by seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

/// The verify data at byte `pos` of the device: a function of seed and position, so any
/// block can be checked on its own.
fn fill_verify(buf: &mut [u8], seed: u64, pos: u64) {
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        let at = pos + i as u64 * 8;
        let mut r = Rng::new(seed ^ at.wrapping_mul(0xff51_afd7_ed55_8ccd));
        let v = r.next_u64().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

fn verify(
    args: &BlkArgs,
    offset: u64,
    length: Option<u64>,
    bs: u64,
    depth: usize,
    seed: u64,
) -> Result<ExitCode, Failure> {
    if bs == 0 || !bs.is_multiple_of(SECTOR_SIZE) {
        return Err(fail(format!("--bs {bs} must be a positive multiple of {SECTOR_SIZE}")));
    }
    let (dev, mut queues) = connect(args, 1, depth * bs as usize * 2 + (8 << 20))?;
    let length = length.unwrap_or(dev.info().capacity_bytes().saturating_sub(offset));
    check_range(dev.info(), offset, length)?;
    let q = &mut queues[0];
    let blocks = length.div_ceil(bs);
    let block_len = |b: u64| (length - b * bs).min(bs) as usize;
    let bar = progress_bar(blocks * 2, false, "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}");
    let start = Instant::now();

    // Pass 1 writes every block, pass 2 reads each back and compares.
    let mut mismatches = 0u64;
    let mut first_bad: Option<u64> = None;
    for write_pass in [true, false] {
        bar.set_message(if write_pass { "writing" } else { "reading" });
        let mut spare: Vec<DmaBuffer> = (0..depth).map(|_| q.alloc(bs as usize)).collect::<Result<_, _>>()?;
        let mut next = 0u64;
        let mut comps = Vec::new();
        loop {
            while next < blocks && q.in_flight() < depth {
                let mut buf = spare.pop().ok_or_else(|| fail("internal: no spare buffer"))?;
                buf.set_len(block_len(next));
                let pos = offset + next * bs;
                let req = if write_pass {
                    fill_verify(&mut buf, seed, pos);
                    Request::write(pos / SECTOR_SIZE, vec![buf], next)
                } else {
                    Request::read(pos / SECTOR_SIZE, vec![buf], next)
                };
                q.submit(req)?;
                next += 1;
            }
            if q.in_flight() == 0 {
                break;
            }
            q.wait(1, &mut comps, None)?;
            for c in comps.drain(..) {
                c.result
                    .map_err(|e| fail(format!("block {} at byte {}: {e}", c.user_data, offset + c.user_data * bs)))?;
                let mut buf = c.bufs.into_iter().next().ok_or_else(|| fail("internal: buffer not returned"))?;
                if !write_pass {
                    let pos = offset + c.user_data * bs;
                    let mut want = vec![0u8; buf.len()];
                    fill_verify(&mut want, seed, pos);
                    if want[..] != buf[..] {
                        let i = (0..want.len()).find(|&i| want[i] != buf[i]).unwrap_or(0);
                        mismatches += 1;
                        first_bad = Some(first_bad.map_or(pos + i as u64, |f| f.min(pos + i as u64)));
                    }
                }
                let cap = buf.capacity();
                buf.set_len(cap.min(bs as usize));
                spare.push(buf);
                bar.inc(1);
            }
        }
        if write_pass {
            q.flush()?;
        }
    }
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    if mismatches > 0 {
        eprintln!(
            "verify FAILED: {mismatches} of {blocks} blocks differ; first difference at byte {}",
            first_bad.unwrap_or(0)
        );
        return Ok(ExitCode::FAILURE);
    }
    println!(
        "verify OK: {} ({blocks} blocks of {bs} bytes) written and read back in {secs:.2} s ({:.1} MB/s)",
        human_bytes(length),
        2.0 * length as f64 / secs / 1e6
    );
    Ok(ExitCode::SUCCESS)
}

fn progress_bar(len: u64, hidden: bool, template: &str) -> ProgressBar {
    if hidden || !io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

/// What one queue's thread measured.
#[derive(Default)]
struct QueueResult {
    ops: u64,
    bytes: u64,
    reads: u64,
    writes: u64,
    errors: u64,
    first_error: Option<String>,
    latencies_ns: Vec<u32>,
}

impl QueueResult {
    /// Adds another queue's (or task's) figures to these.
    fn add(&mut self, r: QueueResult) {
        self.ops += r.ops;
        self.bytes += r.bytes;
        self.reads += r.reads;
        self.writes += r.writes;
        self.errors += r.errors;
        self.first_error = self.first_error.take().or(r.first_error);
        self.latencies_ns.extend(r.latencies_ns);
    }
}

#[derive(Serialize)]
struct LatencyJson {
    mean: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

#[derive(Serialize)]
struct BenchJson {
    socket: String,
    pattern: Pattern,
    block_size: u64,
    read_pct: u8,
    iodepth: u16,
    queues: u16,
    wait: WaitArg,
    /// `--async`: requests awaited by tokio tasks (their reactor waits as `wait` says).
    #[serde(rename = "async")]
    r#async: bool,
    event_idx: bool,
    indirect_desc: bool,
    ring_packed: bool,
    in_order: bool,
    duration_s: f64,
    ops: u64,
    reads: u64,
    writes: u64,
    errors: u64,
    iops: f64,
    mb_per_s: f64,
    latency_us: LatencyJson,
}

struct BenchPlan {
    pattern: Pattern,
    /// How the `--async` reactor waits.
    wait: WaitMode,
    bs: u64,
    read_pct: u8,
    depth: usize,
    range_blocks: u64,
    queues: u64,
    warmup_end: Instant,
    end: Instant,
}

fn bench(args: &BlkArgs, b: &BenchArgs) -> Result<ExitCode, Failure> {
    if b.bs == 0 || !b.bs.is_multiple_of(SECTOR_SIZE) {
        return Err(fail(format!("--bs {} must be a positive multiple of {SECTOR_SIZE}", b.bs)));
    }
    let memory = b.queues as usize * b.iodepth as usize * b.bs as usize + (16 << 20);
    let opts = BlkOptions { wait: b.wait.mode(), ..options(args, b.queues, memory) };
    let connected = if b.r#async {
        BlkDevice::connect_async(&args.socket, &opts)
    } else {
        BlkDevice::connect(&args.socket, &opts).map(|dev| (dev, Vec::new()))
    };
    let (mut dev, async_queues) =
        connected.map_err(|e| fail(format!("connecting to {}: {e}", args.socket.display())))?;
    let info = dev.info().clone();
    let range = b.range.unwrap_or(info.capacity_bytes()).min(info.capacity_bytes());
    let range_blocks = range / b.bs;
    if range_blocks < b.queues as u64 {
        return Err(fail(format!("the range of {range} bytes holds fewer than one {}-byte block per queue", b.bs)));
    }
    if b.read_pct < 100 && info.read_only() {
        return Err(fail("the device is read-only: use --read-pct 100"));
    }
    let start = Instant::now();
    let plan = Arc::new(BenchPlan {
        pattern: b.pattern,
        wait: b.wait.mode(),
        bs: b.bs,
        read_pct: b.read_pct,
        depth: b.iodepth as usize,
        range_blocks,
        queues: b.queues as u64,
        warmup_end: start + b.warmup,
        end: start + b.warmup + b.duration,
    });
    let progress = Arc::new(AtomicU64::new(0));
    let abort = Arc::new(AtomicBool::new(false));
    let mut workers: Vec<_> = dev
        .take_queues()
        .into_iter()
        .map(|q| {
            let (plan, progress, abort) = (plan.clone(), progress.clone(), abort.clone());
            std::thread::spawn(move || bench_queue(q, &plan, &progress, &abort))
        })
        .collect();
    workers.extend(async_queues.into_iter().map(|q| {
        let (plan, progress, abort) = (plan.clone(), progress.clone(), abort.clone());
        std::thread::spawn(move || bench_queue_async(q, plan, progress, abort))
    }));

    let total_ms = (b.warmup + b.duration).as_millis() as u64;
    let bar = progress_bar(total_ms, b.json || b.no_progress, "{spinner} [{elapsed_precise}] {wide_bar} {msg}");
    let (mut last_ops, mut last_t) = (0u64, Instant::now());
    while workers.iter().any(|w| !w.is_finished()) {
        std::thread::sleep(Duration::from_millis(100));
        let now = Instant::now();
        let ops = progress.load(Ordering::Relaxed);
        let rate = (ops - last_ops) as f64 / now.duration_since(last_t).as_secs_f64();
        (last_ops, last_t) = (ops, now);
        bar.set_position((now - start).as_millis().min(total_ms as u128) as u64);
        let phase = if now < plan.warmup_end { "warm-up" } else { "measuring" };
        bar.set_message(format!("{phase}: {:.0} IOPS, {:.1} MB/s", rate, rate * b.bs as f64 / 1e6));
    }
    bar.finish_and_clear();
    let mut total = QueueResult::default();
    for w in workers {
        total.add(w.join().map_err(|_| fail("a benchmark thread panicked"))??);
    }
    // A run that stopped early (a failed request) measured only until then.
    let measured_end = Instant::now().min(plan.end);
    let secs = measured_end.saturating_duration_since(plan.warmup_end).as_secs_f64().max(1e-6);
    let lat = latency_summary(&mut total.latencies_ns);
    let result = BenchJson {
        socket: args.socket.display().to_string(),
        pattern: b.pattern,
        block_size: b.bs,
        read_pct: b.read_pct,
        iodepth: b.iodepth,
        queues: b.queues,
        wait: b.wait,
        r#async: b.r#async,
        event_idx: info.features.contains(virtq_vhost_user::virtq::Features::EVENT_IDX),
        indirect_desc: info.features.contains(virtq_vhost_user::virtq::Features::INDIRECT_DESC),
        ring_packed: info.features.contains(virtq_vhost_user::virtq::Features::RING_PACKED),
        in_order: info.features.contains(virtq_vhost_user::virtq::Features::IN_ORDER),
        duration_s: secs,
        ops: total.ops,
        reads: total.reads,
        writes: total.writes,
        errors: total.errors,
        iops: total.ops as f64 / secs,
        mb_per_s: total.bytes as f64 / secs / 1e6,
        latency_us: lat,
    };
    if b.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        println!(
            "{} {} reads {}% bs {} iodepth {} queues {} {}wait {:?} ({:.1} s, {} ring{}, event_idx {}, indirect {})",
            args.socket.display(),
            match b.pattern {
                Pattern::Random => "random",
                Pattern::Sequential => "sequential",
            },
            b.read_pct,
            b.bs,
            b.iodepth,
            b.queues,
            if b.r#async { "async, " } else { "" },
            b.wait,
            secs,
            if result.ring_packed { "packed" } else { "split" },
            if result.in_order { " in order" } else { "" },
            result.event_idx,
            result.indirect_desc
        );
        println!("  IOPS       {:.0}", result.iops);
        println!("  bandwidth  {:.1} MB/s", result.mb_per_s);
        println!(
            "  latency    mean {:.1} µs, p50 {:.1} µs, p99 {:.1} µs, p99.9 {:.1} µs, max {:.1} µs",
            result.latency_us.mean,
            result.latency_us.p50,
            result.latency_us.p99,
            result.latency_us.p999,
            result.latency_us.max
        );
        if total.errors > 0 {
            println!("  errors     {}", total.errors);
        }
    }
    if let Some(e) = total.first_error {
        eprintln!("virtq blk: {} requests failed; first: {e}", total.errors);
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn latency_summary(ns: &mut [u32]) -> LatencyJson {
    if ns.is_empty() {
        return LatencyJson { mean: 0.0, p50: 0.0, p99: 0.0, p999: 0.0, max: 0.0 };
    }
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() as f64 * q).ceil() as usize).clamp(1, ns.len()) - 1] as f64 / 1000.0;
    LatencyJson {
        mean: ns.iter().map(|&v| v as f64).sum::<f64>() / ns.len() as f64 / 1000.0,
        p50: at(0.50),
        p99: at(0.99),
        p999: at(0.999),
        max: *ns.last().unwrap_or(&0) as f64 / 1000.0,
    }
}

fn bench_queue(
    mut q: BlkQueue,
    plan: &BenchPlan,
    progress: &AtomicU64,
    abort: &AtomicBool,
) -> Result<QueueResult, BlkError> {
    let qi = q.index() as u64;
    let mut rng = Rng::new(0x6a09_e667_f3bc_c908 ^ qi);
    let mut r = QueueResult::default();
    // Sequential: each queue streams through its own part of the range.
    let share = plan.range_blocks / plan.queues;
    let mut cursor = qi * share;
    let mut spare = Vec::with_capacity(plan.depth);
    for _ in 0..plan.depth {
        let mut b = q.alloc(plan.bs as usize)?;
        let mut x = rng.next_u64();
        for chunk in b.chunks_mut(8) {
            x = x.rotate_left(7) ^ 0x9e37_79b9;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        spare.push(b);
    }
    let mut started = vec![Instant::now(); plan.depth];
    let mut free_ids: Vec<u64> = (0..plan.depth as u64).collect();
    let mut comps = Vec::with_capacity(plan.depth);
    let mut measuring = false;
    loop {
        let now = Instant::now();
        let stop = now >= plan.end || abort.load(Ordering::Relaxed);
        if !measuring && now >= plan.warmup_end {
            measuring = true;
        }
        if !stop {
            while let (Some(buf), Some(id)) = (spare.pop(), free_ids.pop()) {
                let block = match plan.pattern {
                    Pattern::Random => rng.below(plan.range_blocks),
                    Pattern::Sequential => {
                        let b = cursor;
                        cursor += 1;
                        if cursor >= (qi + 1) * share {
                            cursor = qi * share;
                        }
                        b
                    }
                };
                let sector = block * plan.bs / SECTOR_SIZE;
                let is_read = plan.read_pct == 100 || (rng.below(100) as u8) < plan.read_pct;
                let req =
                    if is_read { Request::read(sector, vec![buf], id) } else { Request::write(sector, vec![buf], id) };
                started[id as usize] = Instant::now();
                if let Err(e) = q.submit(req) {
                    abort.store(true, Ordering::Relaxed);
                    return Err(e.error);
                }
            }
        }
        if q.in_flight() == 0 {
            break;
        }
        q.wait(1, &mut comps, None)?;
        let done = Instant::now();
        for c in comps.drain(..) {
            let id = c.user_data;
            let counted = measuring && started[id as usize] >= plan.warmup_end && done <= plan.end;
            match c.result {
                Ok(()) => {
                    if counted {
                        r.ops += 1;
                        r.bytes += plan.bs;
                        if c.op == virtq_vhost_user::blk::Op::Read {
                            r.reads += 1;
                        } else {
                            r.writes += 1;
                        }
                        let ns = done.duration_since(started[id as usize]).as_nanos();
                        r.latencies_ns.push(ns.min(u32::MAX as u128) as u32);
                    }
                }
                Err(e) => {
                    r.errors += 1;
                    r.first_error.get_or_insert_with(|| e.to_string());
                    abort.store(true, Ordering::Relaxed);
                }
            }
            progress.fetch_add(1, Ordering::Relaxed);
            spare.extend(c.bufs);
            free_ids.push(id);
        }
        if spare.len() < free_ids.len() {
            // Buffers of abandoned requests do not come back; stop submitting.
            abort.store(true, Ordering::Relaxed);
        }
    }
    Ok(r)
}

/// `--async`: a single-threaded tokio runtime per queue, with the queue's reactor and one
/// task per request in flight, each submitting its next request when its last completes.
fn bench_queue_async(
    q: AsyncBlkQueue,
    plan: Arc<BenchPlan>,
    progress: Arc<AtomicU64>,
    abort: Arc<AtomicBool>,
) -> Result<QueueResult, BlkError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| BlkError::Transport(virtq_vhost_user::Error::EventFd(e)))?;
    rt.block_on(async {
        let reactor = tokio::spawn(reactor::drive_with(q.queue().clone(), plan.wait));
        let qi = q.queue().with_queue(|q| q.index()) as u64;
        let share = plan.range_blocks / plan.queues;
        let cursor = Arc::new(AtomicU64::new(qi * share));
        let mut tasks = Vec::with_capacity(plan.depth);
        for t in 0..plan.depth as u64 {
            let (q, plan, progress, abort, cursor) =
                (q.clone(), plan.clone(), progress.clone(), abort.clone(), cursor.clone());
            let mut buf = q.alloc(plan.bs as usize)?;
            let mut rng = Rng::new(0x6a09_e667_f3bc_c908 ^ qi ^ (t << 16));
            for chunk in buf.chunks_mut(8) {
                chunk.copy_from_slice(&rng.next_u64().to_le_bytes()[..chunk.len()]);
            }
            tasks.push(tokio::spawn(async move {
                let mut r = QueueResult::default();
                let mut buf = Some(buf);
                while let Some(b) = buf.take() {
                    if Instant::now() >= plan.end || abort.load(Ordering::Relaxed) {
                        break;
                    }
                    let block = match plan.pattern {
                        Pattern::Random => rng.below(plan.range_blocks),
                        Pattern::Sequential => {
                            let c = cursor.fetch_add(1, Ordering::Relaxed);
                            qi * share + (c - qi * share) % share
                        }
                    };
                    let sector = block * plan.bs / SECTOR_SIZE;
                    let is_read = plan.read_pct == 100 || (rng.below(100) as u8) < plan.read_pct;
                    let started = Instant::now();
                    let done = if is_read { q.read(sector, b).await } else { q.write(sector, b).await };
                    let now = Instant::now();
                    match done {
                        Ok(b) => {
                            if started >= plan.warmup_end && now <= plan.end {
                                r.ops += 1;
                                r.bytes += plan.bs;
                                *if is_read { &mut r.reads } else { &mut r.writes } += 1;
                                let ns = now.duration_since(started).as_nanos();
                                r.latencies_ns.push(ns.min(u32::MAX as u128) as u32);
                            }
                            buf = Some(b);
                        }
                        Err(e) => {
                            r.errors += 1;
                            r.first_error.get_or_insert_with(|| e.to_string());
                            abort.store(true, Ordering::Relaxed);
                        }
                    }
                    progress.fetch_add(1, Ordering::Relaxed);
                }
                r
            }));
        }
        let mut total = QueueResult::default();
        for t in tasks {
            total.add(t.await.map_err(|e| BlkError::InvalidRequest(format!("a benchmark task failed: {e}")))?);
        }
        reactor.abort();
        Ok(total)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("0x200"), Ok(512));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("4q").is_err());
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_byte("0xaa"), Ok(0xaa));
        assert!(parse_queue_size("100").is_err());
    }

    #[test]
    fn percentiles() {
        let mut v: Vec<u32> = (1..=1000).map(|i| i * 1000).collect();
        let l = latency_summary(&mut v);
        assert_eq!((l.p50, l.p99, l.p999, l.max), (500.0, 990.0, 999.0, 1000.0));
    }
}
