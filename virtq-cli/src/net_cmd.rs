//! `virtq net`: a userspace virtio-net driver over vhost-user (virtq-vhost-user's `net`),
//! for a back end such as DPDK's `net_vhost` (testpmd).
//!
//! ```text
//! virtq net --socket PATH info                             features, MAC, MTU, link, queue pairs
//! virtq net --socket PATH tx --secs 5 --size 64 --burst 32 send frames
//! virtq net --socket PATH rx --secs 5                      receive frames
//! virtq net --socket PATH loop --frames 1000000            send, receive back, verify each
//! virtq net --socket PATH bench --direction tx --size 64   one measurement cell (warm-up, Mpps)
//! ```
//!
//! Every layout can be chosen: `--split` or `--packed` (default: packed if offered),
//! `--no-in-order`, and each feature can be left out with its `--no-...` flag or
//! `--disable NAME`.

use std::io::{self, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use virtq_vhost_user::net::traffic::{self, LoopOptions, LoopReport};
use virtq_vhost_user::net::wire::feature;
use virtq_vhost_user::net::{NetDevice, NetError, NetInfo, NetOptions, QueuePair, DRIVER_FEATURES};
use virtq_vhost_user::virtq::Features;

use crate::affinity;

/// Smallest and largest frame the traffic commands send.
const MIN_SIZE: usize = 60;
const MAX_SIZE: usize = 9000;

/// Arguments of `virtq net`.
#[derive(Debug, Args)]
pub struct NetArgs {
    /// The vhost-user-net socket (e.g. DPDK's `net_vhost0,iface=PATH`).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,

    /// Queue pairs to use (more than one needs MQ and CTRL_VQ); 0: all the device has.
    #[arg(long, value_name = "N", default_value_t = 1)]
    queues: u16,

    /// Use the split ring (do not negotiate VIRTIO_F_RING_PACKED).
    #[arg(long, conflicts_with = "packed")]
    split: bool,

    /// Use the packed ring (the device must offer VIRTIO_F_RING_PACKED). By default the
    /// packed ring is used when offered.
    #[arg(long)]
    packed: bool,

    /// Do not negotiate VIRTIO_F_IN_ORDER.
    #[arg(long)]
    no_in_order: bool,

    /// Do not negotiate VIRTIO_NET_F_MRG_RXBUF (each frame then fits one receive buffer).
    #[arg(long)]
    no_mrg_rxbuf: bool,

    /// Do not negotiate VIRTIO_RING_F_EVENT_IDX.
    #[arg(long)]
    no_event_idx: bool,

    /// Do not negotiate VIRTIO_RING_F_INDIRECT_DESC.
    #[arg(long)]
    no_indirect: bool,

    /// Do not negotiate VIRTIO_NET_F_MQ (one queue pair).
    #[arg(long)]
    no_mq: bool,

    /// Do not negotiate VIRTIO_NET_F_CTRL_VQ (and so not MQ).
    #[arg(long)]
    no_ctrl_vq: bool,

    /// Do not negotiate VIRTIO_NET_F_MTU.
    #[arg(long)]
    no_mtu: bool,

    /// Do not negotiate VIRTIO_NET_F_MAC.
    #[arg(long)]
    no_mac: bool,

    /// Do not negotiate VIRTIO_NET_F_STATUS.
    #[arg(long)]
    no_status: bool,

    /// Leave out features by name, comma-separated (MRG_RXBUF, MQ, EVENT_IDX, RING_PACKED, ...).
    #[arg(long, value_name = "NAME,..", value_delimiter = ',')]
    disable: Vec<String>,

    /// Ring entries per queue (a power of two).
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = parse_queue_size)]
    queue_size: u16,

    /// The MTU when the frontend owns the config space (the device gives none)
    /// [default: 1500, or what the largest frame sent needs].
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u16).range(68..))]
    mtu: Option<u16>,

    /// The MAC address when the device has none (aa:bb:cc:dd:ee:ff) [default: random].
    #[arg(long, value_name = "MAC", value_parser = parse_mac)]
    mac: Option<[u8; 6]>,

    /// Seconds allowed for each vhost-user control message.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    timeout: f64,

    /// Pin the queue pairs' threads to these CPUs (pair i on the i-th, round robin).
    #[arg(long, value_name = "CPU,..", value_delimiter = ',')]
    cpus: Vec<usize>,

    #[command(subcommand)]
    command: NetCommand,
}

#[derive(Debug, Subcommand)]
enum NetCommand {
    /// Show the negotiated features, MAC, MTU, link status and queue pairs.
    Info {
        /// Print JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Send frames for a while.
    Tx(TrafficArgs),
    /// Receive frames for a while.
    Rx(TrafficArgs),
    /// Send frames with a sequence number and a checksum, receive them back through a
    /// forwarding device (testpmd's io or macswap), and verify each one: none corrupted,
    /// none duplicated, order kept per queue. Drops are counted and reported.
    Loop(LoopArgs),
    /// One cell of the comparison with DPDK's virtio-user (scripts/net-vs-dpdk.sh): a
    /// warm-up, then transmit (the device in rxonly) or receive (the device in txonly)
    /// for a measured time; reports Mpps.
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
struct TrafficArgs {
    /// Seconds to run.
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Bytes per frame sent (60 to 9000).
    #[arg(long, default_value_t = 64, value_parser = parse_frame_size)]
    size: usize,
    /// Frames per burst.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=1024))]
    burst: u16,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// No progress line.
    #[arg(long)]
    no_progress: bool,
}

#[derive(Debug, Args)]
struct LoopArgs {
    /// Frames to send per queue pair.
    #[arg(long, default_value_t = 1_000_000)]
    frames: u64,
    /// Stop after this many seconds even if not all frames were sent.
    #[arg(long)]
    secs: Option<f64>,
    /// Every frame this size (60 to 9000) instead of random sizes.
    #[arg(long, value_parser = parse_frame_size, conflicts_with_all = ["min_size", "max_size"])]
    size: Option<usize>,
    /// Smallest random frame size.
    #[arg(long, default_value_t = MIN_SIZE, value_parser = parse_frame_size)]
    min_size: usize,
    /// Largest random frame size [default: 9000 with MRG_RXBUF, else 1514].
    #[arg(long, value_parser = parse_frame_size)]
    max_size: Option<usize>,
    /// Frames per transmit burst.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=1024))]
    burst: u16,
    /// Frames in flight at most per pair [default: what the receive ring holds at the
    /// largest size, at most 128].
    #[arg(long)]
    window: Option<usize>,
    /// Seed of the frame sizes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// No progress line.
    #[arg(long)]
    no_progress: bool,
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// What to measure: transmit (the device receives, e.g. testpmd rxonly) or receive
    /// (the device sends, e.g. testpmd txonly).
    #[arg(long, value_enum)]
    direction: Direction,
    /// Bytes per frame sent (60 to 9000).
    #[arg(long, default_value_t = 64, value_parser = parse_frame_size)]
    size: usize,
    /// Frames per burst.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=1024))]
    burst: u16,
    /// Measured seconds, after the warm-up.
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Seconds of warm-up.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Direction {
    Tx,
    Rx,
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(n) if n >= 2 && n.is_power_of_two() && n <= 32768 => Ok(n),
        _ => Err(format!("{s:?} is not a power of two from 2 to 32768")),
    }
}

fn parse_frame_size(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (MIN_SIZE..=MAX_SIZE).contains(&n) => Ok(n),
        _ => Err(format!("{s:?} is not a frame size from {MIN_SIZE} to {MAX_SIZE}")),
    }
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!("{s:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"));
    }
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).map_err(|_| format!("{s:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"))?;
    }
    Ok(mac)
}

/// An error for the user.
struct Failure(String);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Self(e.to_string())
    }
}

/// Runs `virtq net`.
pub fn run(args: NetArgs) -> ExitCode {
    match run_inner(&args) {
        Ok(code) => code,
        Err(Failure(msg)) => {
            eprintln!("virtq net: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run_inner(args: &NetArgs) -> Result<ExitCode, Failure> {
    match &args.command {
        NetCommand::Info { json } => info(args, *json),
        NetCommand::Tx(t) => traffic_cmd(args, t, Direction::Tx),
        NetCommand::Rx(t) => traffic_cmd(args, t, Direction::Rx),
        NetCommand::Loop(l) => loop_cmd(args, l),
        NetCommand::Bench(b) => bench(args, b),
    }
}

impl NetArgs {
    /// The options for a run whose largest frame sent is `largest` bytes.
    fn options(&self, largest: usize) -> Result<NetOptions, Failure> {
        let mut disabled = 0u64;
        for name in &self.disable {
            let bit = match name.trim().to_ascii_uppercase().as_str() {
                "RING_PACKED" | "VIRTIO_F_RING_PACKED" => Features::RING_PACKED.bits(),
                "IN_ORDER" | "VIRTIO_F_IN_ORDER" => Features::IN_ORDER.bits(),
                "EVENT_IDX" | "VIRTIO_RING_F_EVENT_IDX" => Features::EVENT_IDX.bits(),
                "INDIRECT_DESC" | "VIRTIO_RING_F_INDIRECT_DESC" => Features::INDIRECT_DESC.bits(),
                n => feature::by_name(n).ok_or_else(|| Failure(format!("unknown feature {name:?}")))?,
            };
            disabled |= bit;
        }
        let flag = |on: bool, bit: u64| if on { bit } else { 0 };
        disabled |= flag(self.no_mrg_rxbuf, feature::MRG_RXBUF)
            | flag(self.no_mq, feature::MQ)
            | flag(self.no_ctrl_vq, feature::CTRL_VQ)
            | flag(self.no_mtu, feature::MTU)
            | flag(self.no_mac, feature::MAC)
            | flag(self.no_status, feature::STATUS)
            | flag(self.split, Features::RING_PACKED.bits())
            | flag(self.no_in_order, Features::IN_ORDER.bits())
            | flag(self.no_event_idx, Features::EVENT_IDX.bits())
            | flag(self.no_indirect, Features::INDIRECT_DESC.bits());
        if self.packed && disabled & Features::RING_PACKED.bits() != 0 {
            return Err(Failure("--packed and a disabled RING_PACKED contradict each other".into()));
        }
        let needed_mtu = largest.saturating_sub(virtq_vhost_user::net::driver::L2_OVERHEAD).max(1500);
        let mtu = self.mtu.unwrap_or(needed_mtu.min(u16::MAX as usize) as u16);
        Ok(NetOptions {
            queue_pairs: self.queues,
            queue_size: self.queue_size,
            features: DRIVER_FEATURES & !disabled,
            packed: disabled & Features::RING_PACKED.bits() == 0,
            in_order: disabled & Features::IN_ORDER.bits() == 0,
            event_idx: disabled & Features::EVENT_IDX.bits() == 0,
            indirect_desc: disabled & Features::INDIRECT_DESC.bits() == 0,
            required_features: if self.packed { Features::RING_PACKED.bits() } else { 0 },
            mac: self.mac,
            mtu,
            max_tx_frame: Some(largest),
            control_timeout: Duration::from_secs_f64(self.timeout.max(0.001)),
            ..Default::default()
        })
    }

    fn connect(&self, largest: usize) -> Result<(NetDevice, Vec<QueuePair>), Failure> {
        let opts = self.options(largest)?;
        let mut dev = NetDevice::connect(&self.socket, &opts)
            .map_err(|e| Failure(format!("connecting to {}: {e}", self.socket.display())))?;
        let pairs = dev.take_queue_pairs();
        Ok((dev, pairs))
    }
}

fn mac_string(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn layout_name(f: Features) -> &'static str {
    match (f.contains(Features::RING_PACKED), f.contains(Features::IN_ORDER)) {
        (false, false) => "split",
        (false, true) => "split in-order",
        (true, false) => "packed",
        (true, true) => "packed in-order",
    }
}

#[derive(Serialize)]
struct InfoJson {
    socket: String,
    layout: &'static str,
    mac: String,
    mac_from_device: bool,
    mtu: Option<u16>,
    link_up: bool,
    status_from_device: bool,
    max_queue_pairs: u16,
    queue_pairs: u16,
    queue_size: u16,
    rx_buffer_bytes: u32,
    config_from_device: bool,
    net_features: Vec<&'static str>,
    ring_features: String,
    features_bits: String,
}

fn info_json(args: &NetArgs, dev: &NetDevice) -> InfoJson {
    let i: &NetInfo = dev.info();
    let ring = Features::from_bits(i.features.bits() & (((1 << 42) - 1) & !((1 << 28) - 1)));
    InfoJson {
        socket: args.socket.display().to_string(),
        layout: layout_name(i.features),
        mac: mac_string(i.mac),
        mac_from_device: i.config_from_device && i.has(feature::MAC),
        mtu: i.mtu,
        link_up: dev.link_up(),
        status_from_device: i.config_from_device && i.has(feature::STATUS),
        max_queue_pairs: i.max_queue_pairs,
        queue_pairs: i.queue_pairs,
        queue_size: i.queue_size,
        rx_buffer_bytes: i.rx_buf_len,
        config_from_device: i.config_from_device,
        net_features: i.feature_names(),
        ring_features: format!("{ring:?}"),
        features_bits: format!("{:#x}", i.features.bits()),
    }
}

fn info(args: &NetArgs, json: bool) -> Result<ExitCode, Failure> {
    let (dev, _pairs) = args.connect(1514)?;
    let out = info_json(args, &dev);
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    let source = |from_device: bool| if from_device { "device" } else { "frontend" };
    println!("socket              {}", out.socket);
    println!("layout              {}", out.layout);
    println!("MAC                 {} (from the {})", out.mac, source(out.mac_from_device));
    println!("MTU                 {}", out.mtu.map_or("- (not negotiated)".to_string(), |m| m.to_string()));
    println!(
        "link                {} (from the {})",
        if out.link_up { "up" } else { "down" },
        source(out.status_from_device)
    );
    println!("queue pairs         {} of {} (ring size {})", out.queue_pairs, out.max_queue_pairs, out.queue_size);
    println!("receive buffers     {} bytes", out.rx_buffer_bytes);
    println!("config space        from the {}", source(out.config_from_device));
    println!("net features        {}", out.net_features.join(" "));
    println!("ring features       {} ({})", out.ring_features, out.features_bits);
    Ok(ExitCode::SUCCESS)
}

fn progress_line(hidden: bool) -> ProgressBar {
    if hidden || !io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}") {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

/// A frame like testpmd's txonly sends: Ethernet, IPv4, UDP headers (42 bytes), then the
/// sequence number; the rest of the slot is left as it was.
fn write_udp_frame(slot: &mut [u8], template: &[u8; 42], seq: u64, len: usize) -> usize {
    slot[..42].copy_from_slice(template);
    slot[42..50].copy_from_slice(&seq.to_le_bytes());
    len
}

fn udp_template(src: [u8; 6], len: usize) -> [u8; 42] {
    let mut t = [0u8; 42];
    t[0..6].fill(0xff);
    t[6..12].copy_from_slice(&src);
    t[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (len - 14) as u16;
    t[14] = 0x45;
    t[16..18].copy_from_slice(&ip_len.to_be_bytes());
    t[22] = 64;
    t[23] = 17;
    // 198.18.0.1 -> 198.18.0.2 (the benchmarking range, RFC 2544).
    t[26..30].copy_from_slice(&[198, 18, 0, 1]);
    t[30..34].copy_from_slice(&[198, 18, 0, 2]);
    let mut sum = 0u32;
    for w in t[14..34].chunks(2) {
        sum += u16::from_be_bytes([w[0], w[1]]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    t[24..26].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    t[34..36].copy_from_slice(&9u16.to_be_bytes());
    t[36..38].copy_from_slice(&9u16.to_be_bytes());
    t[38..40].copy_from_slice(&(ip_len - 20).to_be_bytes());
    t
}

/// What one pair's thread did in `tx`, `rx` or `bench`.
#[derive(Default)]
struct PairCount {
    frames: u64,
    bytes: u64,
    error: Option<String>,
}

/// What `tx`, `rx` and `bench` run.
#[derive(Clone, Copy)]
struct TrafficPlan {
    direction: Direction,
    size: usize,
    burst: u16,
    warmup: f64,
    secs: f64,
    json: bool,
    hide_progress: bool,
}

/// Sends or receives on `pair` until `end`, counting from `count_from`.
fn pump(
    pair: &mut QueuePair,
    plan: TrafficPlan,
    count_from: Instant,
    end: Instant,
    progress: &AtomicU64,
    src: [u8; 6],
) -> PairCount {
    let TrafficPlan { direction, size, .. } = plan;
    let burst = plan.burst as usize;
    let mut c = PairCount::default();
    let template = udp_template(src, size);
    let mut seq = 0u64;
    let mut counting = false;
    let mut spins = 0u32;
    // Turns of the loop since something moved, and when the socket was last asked.
    let mut idle_spins = 0u32;
    let mut socket_checked = Instant::now();
    // Frames since the last update of `progress`: a locked add on every turn of the loop
    // would be a full barrier there, and it cost half the receive rate.
    let mut unreported = 0u64;
    loop {
        let r = match direction {
            Direction::Tx => pair.tx.send_with(burst, |i, slot| write_udp_frame(slot, &template, seq + i as u64, size)),
            Direction::Rx => {
                let mut bytes = 0u64;
                let r = pair.rx.recv(burst, |f| bytes += f.len() as u64);
                if counting {
                    c.bytes += bytes;
                }
                r
            }
        };
        match r {
            Ok(n) => {
                seq += n as u64;
                if counting {
                    c.frames += n as u64;
                    if direction == Direction::Tx {
                        c.bytes += (n * size) as u64;
                    }
                }
                unreported += n as u64;
                if n > 0 {
                    idle_spins = 0;
                } else {
                    idle_spins = idle_spins.saturating_add(1);
                    if direction == Direction::Rx {
                        // Nothing to receive: keep the transmit queue drained too.
                        pair.tx.reclaim();
                    }
                }
            }
            Err(e) => {
                c.error = Some(e.to_string());
                return c;
            }
        }
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(64) {
            progress.fetch_add(std::mem::take(&mut unreported), Ordering::Relaxed);
            let now = Instant::now();
            if now >= end {
                return c;
            }
            if !counting && now >= count_from {
                counting = true;
            }
            // A back end that went away shows only through the socket: asked when nothing
            // moves, at most every 10 ms.
            if idle_spins >= 64 && now.duration_since(socket_checked) >= Duration::from_millis(10) {
                socket_checked = now;
                if !pair.rx.is_connected() {
                    c.error = Some(NetError::from(virtq_vhost_user::net::QueueError::Disconnected).to_string());
                    return c;
                }
            }
        }
    }
}

#[derive(Serialize)]
struct TrafficJson {
    socket: String,
    direction: Direction,
    layout: &'static str,
    queue_pairs: u16,
    size: usize,
    burst: u16,
    seconds: f64,
    frames: u64,
    bytes: u64,
    mpps: f64,
    gbps: f64,
    error: Option<String>,
}

/// Runs `direction` on every pair (a thread each) with a warm-up, and prints the result.
fn run_traffic(args: &NetArgs, plan: TrafficPlan) -> Result<ExitCode, Failure> {
    let TrafficPlan { direction, size, burst, warmup, secs, json, hide_progress } = plan;
    let (dev, pairs) = args.connect(size)?;
    let mac = dev.info().mac;
    let layout = layout_name(dev.info().features);
    let queue_pairs = dev.info().queue_pairs;
    let start = Instant::now();
    let count_from = start + Duration::from_secs_f64(warmup);
    let end = count_from + Duration::from_secs_f64(secs);
    let progress = Arc::new(AtomicU64::new(0));
    eprintln!(
        "virtq net: {layout}, {queue_pairs} queue pair(s), {} {size}-byte frames in bursts of {burst}",
        if direction == Direction::Tx { "sending" } else { "receiving" }
    );
    let workers: Vec<_> = pairs
        .into_iter()
        .map(|mut pair| {
            let progress = progress.clone();
            let cpus = args.cpus.clone();
            std::thread::spawn(move || {
                if !cpus.is_empty() {
                    let cpu = cpus[pair.rx.pair() as usize % cpus.len()];
                    let _ = affinity::pin_current_thread(cpu);
                }
                let c = pump(&mut pair, plan, count_from, end, &progress, mac);
                (c, pair)
            })
        })
        .collect();
    let bar = progress_line(json || hide_progress);
    let (mut last, mut last_t) = (0u64, Instant::now());
    while workers.iter().any(|w| !w.is_finished()) {
        std::thread::sleep(Duration::from_millis(100));
        let now = Instant::now();
        let n = progress.load(Ordering::Relaxed);
        let rate = (n - last) as f64 / now.duration_since(last_t).as_secs_f64();
        (last, last_t) = (n, now);
        let phase = if now < count_from { "warm-up" } else { "measuring" };
        bar.set_message(format!(
            "{phase}: {:.3} Mpps, {:.2} Gb/s, {n} frames",
            rate / 1e6,
            rate * size as f64 * 8.0 / 1e9
        ));
    }
    bar.finish_and_clear();
    let mut total = PairCount::default();
    let mut done = Vec::new();
    for w in workers {
        let (c, pair) = w.join().map_err(|_| Failure("a queue thread panicked".into()))?;
        total.frames += c.frames;
        total.bytes += c.bytes;
        total.error = total.error.or(c.error);
        done.push(pair);
    }
    stop_all(done);
    let measured = Instant::now().min(end).saturating_duration_since(count_from).as_secs_f64().max(1e-9);
    let out = TrafficJson {
        socket: args.socket.display().to_string(),
        direction,
        layout,
        queue_pairs,
        size,
        burst,
        seconds: measured,
        frames: total.frames,
        bytes: total.bytes,
        mpps: total.frames as f64 / measured / 1e6,
        gbps: total.bytes as f64 * 8.0 / measured / 1e9,
        error: total.error.clone(),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "{} {} {}-byte frames on {} pair(s), {layout}: {:.3} Mpps, {:.2} Gb/s ({} frames in {:.2} s)",
            if direction == Direction::Tx { "sent" } else { "received" },
            out.frames,
            size,
            queue_pairs,
            out.mpps,
            out.gbps,
            out.frames,
            measured
        );
    }
    if let Some(e) = total.error {
        eprintln!("virtq net: stopped early: {e}");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn traffic_cmd(args: &NetArgs, t: &TrafficArgs, direction: Direction) -> Result<ExitCode, Failure> {
    let plan = TrafficPlan {
        direction,
        size: t.size,
        burst: t.burst,
        warmup: 0.0,
        secs: t.secs,
        json: t.json,
        hide_progress: t.no_progress,
    };
    run_traffic(args, plan)
}

fn bench(args: &NetArgs, b: &BenchArgs) -> Result<ExitCode, Failure> {
    let plan = TrafficPlan {
        direction: b.direction,
        size: b.size,
        burst: b.burst,
        warmup: b.warmup,
        secs: b.secs,
        json: b.json,
        hide_progress: true,
    };
    run_traffic(args, plan)
}

/// Stops every queue once all pairs are done: a back end may take the stop of any ring
/// (`GET_VRING_BASE`) as the whole device stopping, as DPDK's vhost library does.
fn stop_all(pairs: Vec<QueuePair>) {
    for mut p in pairs {
        let _ = p.rx.stop();
        let _ = p.tx.stop();
    }
}

#[derive(Serialize)]
struct LoopPairJson {
    pair: u16,
    sent: u64,
    received: u64,
    dropped: u64,
    corrupted: u64,
    duplicated: u64,
    out_of_order: u64,
    foreign: u64,
    multi_buffer: u64,
    largest: usize,
    seconds: f64,
    error: Option<String>,
}

#[derive(Serialize)]
struct LoopJson {
    socket: String,
    layout: &'static str,
    mergeable: bool,
    min_size: usize,
    max_size: usize,
    clean: bool,
    pairs: Vec<LoopPairJson>,
}

fn loop_cmd(args: &NetArgs, l: &LoopArgs) -> Result<ExitCode, Failure> {
    let mergeable_possible = !args.no_mrg_rxbuf && !args.disable.iter().any(|d| d.eq_ignore_ascii_case("MRG_RXBUF"));
    let (min_size, max_size) = match l.size {
        Some(s) => (s, s),
        None => (l.min_size, l.max_size.unwrap_or(if mergeable_possible { MAX_SIZE } else { 1514 })),
    };
    if min_size > max_size {
        return Err(Failure(format!("--min-size {min_size} is above --max-size {max_size}")));
    }
    let (dev, pairs) = args.connect(max_size)?;
    let info = dev.info().clone();
    let rx_buf = info.rx_buf_len as usize - virtq_vhost_user::net::NetHdr::SIZE;
    let bufs_per_frame = (max_size + virtq_vhost_user::net::NetHdr::SIZE).div_ceil(info.rx_buf_len as usize);
    if !info.mergeable() && max_size > rx_buf {
        return Err(Failure(format!(
            "frames of up to {max_size} bytes do not fit the {rx_buf}-byte receive buffers without MRG_RXBUF"
        )));
    }
    let window =
        l.window.unwrap_or((info.queue_size as usize / bufs_per_frame.max(1)).clamp(1, 128)).max(l.burst as usize);
    let opts = LoopOptions {
        frames: l.frames,
        duration: l.secs.map(Duration::from_secs_f64),
        min_size,
        max_size,
        burst: l.burst as usize,
        window,
        seed: l.seed,
        ..Default::default()
    };
    let layout = layout_name(info.features);
    eprintln!(
        "virtq net loop: {layout}, {} queue pair(s), frames of {min_size} to {max_size} bytes, {} per pair, window {window}",
        info.queue_pairs, l.frames
    );
    let progress = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = pairs
        .into_iter()
        .map(|mut pair| {
            let (progress, stop, opts) = (progress.clone(), stop.clone(), opts.clone());
            let cpus = args.cpus.clone();
            let mac = info.mac;
            std::thread::spawn(move || {
                if !cpus.is_empty() {
                    let _ = affinity::pin_current_thread(cpus[pair.rx.pair() as usize % cpus.len()]);
                }
                let (report, result) = traffic::run_loop(&mut pair, mac, &opts, &progress, &stop);
                (report, result.err().map(|e| e.to_string()), pair)
            })
        })
        .collect();
    let total = l.frames * info.queue_pairs as u64;
    let bar = progress_line(l.json || l.no_progress);
    let (mut last, mut last_t) = (0u64, Instant::now());
    while workers.iter().any(|w| !w.is_finished()) {
        std::thread::sleep(Duration::from_millis(100));
        let now = Instant::now();
        let n = progress.load(Ordering::Relaxed);
        let rate = (n - last) as f64 / now.duration_since(last_t).as_secs_f64();
        (last, last_t) = (n, now);
        bar.set_message(format!("{n}/{total} frames back, {:.3} Mpps", rate / 1e6));
    }
    bar.finish_and_clear();
    let mut reports: Vec<(LoopReport, Option<String>)> = Vec::new();
    let mut done = Vec::new();
    for w in workers {
        let (report, error, pair) = w.join().map_err(|_| Failure("a queue thread panicked".into()))?;
        reports.push((report, error));
        done.push(pair);
    }
    stop_all(done);
    let clean = reports.iter().all(|(r, e)| r.clean() && e.is_none());
    let out = LoopJson {
        socket: args.socket.display().to_string(),
        layout,
        mergeable: info.mergeable(),
        min_size,
        max_size,
        clean,
        pairs: reports
            .iter()
            .map(|(r, e)| LoopPairJson {
                pair: r.pair,
                sent: r.sent,
                received: r.received,
                dropped: r.dropped,
                corrupted: r.corrupted,
                duplicated: r.duplicated,
                out_of_order: r.out_of_order,
                foreign: r.foreign,
                multi_buffer: r.multi_buffer,
                largest: r.largest,
                seconds: r.elapsed.as_secs_f64(),
                error: e.clone(),
            })
            .collect(),
    };
    if l.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for p in &out.pairs {
            println!(
                "pair {}: sent {}, received {}, dropped {}, corrupted {}, duplicated {}, out of order {}, foreign {} \
                 ({} spanned several buffers, largest {} bytes, {:.2} s){}",
                p.pair,
                p.sent,
                p.received,
                p.dropped,
                p.corrupted,
                p.duplicated,
                p.out_of_order,
                p.foreign,
                p.multi_buffer,
                p.largest,
                p.seconds,
                p.error.as_ref().map_or(String::new(), |e| format!("; error: {e}"))
            );
        }
        println!("{}", if clean { "loop OK" } else { "loop FAILED" });
    }
    Ok(if clean { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_and_sizes() {
        assert_eq!(parse_mac("02:00:00:aa:bb:0c"), Ok([2, 0, 0, 0xaa, 0xbb, 0x0c]));
        assert!(parse_mac("02:00:00:aa:bb").is_err());
        assert!(parse_mac("02:00:00:aa:bb:zz").is_err());
        assert_eq!(parse_frame_size("60"), Ok(60));
        assert!(parse_frame_size("59").is_err());
        assert!(parse_frame_size("9001").is_err());
    }

    #[test]
    fn udp_template_checksum_is_valid() {
        let t = udp_template([2, 0, 0, 0, 0, 1], 64);
        let mut sum = 0u32;
        for w in t[14..34].chunks(2) {
            sum += u16::from_be_bytes([w[0], w[1]]) as u32;
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(sum, 0xffff);
        assert_eq!(u16::from_be_bytes([t[16], t[17]]), 50);
    }
}
