//! `virtq`: command-line tools for the virtq crate.
//!
//! `virtq bench` measures the four ring layouts in-process: the driver (a `DriverQueue`
//! with its layout fixed at compile time) and the device (`SplitDevice` or
//! `PackedDevice`) run on two threads sharing one ring, pinned to two CPUs when there are
//! two. `virtq bench --ringtest` runs the protocol of Linux's `tools/virtio/ringtest`
//! instead. Neither needs anything outside the process.

mod affinity;
mod bench;
mod blk_cmd;
mod device_side;
mod driver_side;
mod layout;
mod net_cmd;
mod notify;
mod pingpong;
mod plot;
mod report;
mod ringtest;
mod rng_cmd;
mod serve;
mod serve_blk;
mod serve_net;
mod serve_rng;
mod stats;

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::bench::{Mode, Settings};
use virtq::LayoutKind;

#[derive(Debug, Parser)]
#[command(name = "virtq", version, about = "Virtio virtqueue tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Benchmark the ring layouts in-process: driver and device on two threads, one ring.
    ///
    /// For each layout (split, split in-order, packed, packed in-order), mode and batch
    /// size, streams buffers with the ring kept full and reports throughput and
    /// notifications per buffer; for each layout and mode, measures request/response
    /// latency with one buffer outstanding, next to the machine's cache-line round trip.
    /// Every run checks that each buffer came back exactly once; a side that makes no
    /// progress for 5 s aborts the run (exit status 3).
    ///
    /// With --ringtest, runs the protocol of Linux's tools/virtio/ringtest instead.
    Bench(BenchArgs),
    /// Drive a vhost-user-blk device (e.g. qemu-storage-daemon): info, read, write, verify, bench.
    Blk(blk_cmd::BlkArgs),
    /// Serve a raw image as a vhost-user-blk back end (for QEMU and its Linux guest).
    ServeBlk(serve_blk::ServeBlkArgs),
    /// Drive a vhost-user-net device (e.g. DPDK's net_vhost): info, tx, rx, loop, bench.
    Net(net_cmd::NetArgs),
    /// Serve a vhost-user-net back end: frames to a TAP device, or looped back.
    ServeNet(serve_net::ServeNetArgs),
    /// Serve a vhost-user-rng back end filled from /dev/urandom (for QEMU and its guest).
    ServeRng(serve_rng::ServeRngArgs),
    /// Read entropy from a vhost-user-rng device with virtq's virtio-rng driver.
    Rng(rng_cmd::RngArgs),
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// Short run for smoke tests (under 10 s): 100 ms per cell unless --duration-ms says
    /// otherwise; with --ringtest, 1,000,000 buffers per run unless --run-cycles says
    /// otherwise.
    #[arg(long)]
    quick: bool,

    /// Print the results as JSON on stdout instead of a table.
    #[arg(long)]
    json: bool,

    /// Layouts to measure, comma-separated [default: all four].
    #[arg(long, value_name = "LAYOUT,..", value_delimiter = ',', value_parser = layout::layout_parser())]
    layout: Vec<LayoutKind>,

    /// Measured time per cell in milliseconds, after a warm-up of a fifth of it (at most
    /// 200 ms) [default: 750, or 100 with --quick].
    #[arg(
        long,
        value_name = "N",
        conflicts_with = "ringtest",
        value_parser = clap::value_parser!(u64).range(1..=600_000)
    )]
    duration_ms: Option<u64>,

    /// Buffers added per kick in the throughput runs, comma-separated.
    #[arg(
        long,
        value_name = "N,..",
        value_delimiter = ',',
        default_value = "1,8,32,128",
        conflicts_with = "ringtest",
        value_parser = clap::value_parser!(u16).range(1..)
    )]
    batch: Vec<u16>,

    /// How the two sides wait for work: busy-poll, sleep until notified, or both.
    #[arg(long, value_enum, default_value_t = ModeArg::Both, conflicts_with = "ringtest")]
    mode: ModeArg,

    /// Ring size in entries (a power of two, at most 32768).
    #[arg(long, value_name = "ENTRIES", default_value_t = 256, value_parser = parse_ring_size)]
    size: u16,

    /// Buffers the driver takes turns with, a power of two from the ring size to 2^20
    /// [default: the ring size]. With as many as the ring has entries, buffer n always
    /// goes back into the descriptor it came from, and a split driver, finding its
    /// descriptors and avail entries holding the values already, skips those stores;
    /// twice as many give each descriptor a new address every lap, as a driver refilling
    /// its ring from a larger pool would.
    #[arg(long, value_name = "N", conflicts_with = "ringtest", value_parser = parse_buffers)]
    buffers: Option<u32>,

    /// Also draw throughput against batch size (a panel per mode, a line per layout) into
    /// this SVG file.
    #[arg(long, value_name = "FILE.svg", conflicts_with = "ringtest")]
    plot: Option<PathBuf>,

    /// Run the protocol of Linux's tools/virtio/ringtest (batch 1, both sides polling, no
    /// notifications) on each layout, in alternating rounds, and report buffers/s and
    /// ns per buffer (median over rounds).
    #[arg(long)]
    ringtest: bool,

    /// Buffers per ringtest run [default: 10000000, or 1000000 with --quick].
    #[arg(
        long,
        value_name = "N",
        requires = "ringtest",
        value_parser = clap::value_parser!(u64).range(1..=1_000_000_000_000)
    )]
    run_cycles: Option<u64>,

    /// Ringtest: busy-wait with the CPU's spin hint (`pause`), as ringtest's --relax. By
    /// default a busy wait just re-reads the ring, as ringtest's does.
    #[arg(long, requires = "ringtest")]
    relax: bool,

    /// Ringtest rounds: every layout runs once per round, in turn; the report gives each
    /// layout's median over rounds.
    #[arg(long, value_name = "N", default_value_t = 3, requires = "ringtest", value_parser = clap::value_parser!(u32).range(1..=1000))]
    rounds: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ModeArg {
    Poll,
    Sleep,
    Both,
}

fn parse_buffers(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|_| format!("`{s}` is not a number from 1 to 2^20"))?;
    if n.is_power_of_two() && n <= 1 << 20 {
        Ok(n)
    } else {
        Err(format!("{n} is not a power of two from 1 to 2^20"))
    }
}

fn parse_ring_size(s: &str) -> Result<u16, String> {
    let n: u16 = s.parse().map_err(|_| format!("`{s}` is not a number from 1 to 32768"))?;
    if n.is_power_of_two() && n <= 32768 {
        Ok(n)
    } else {
        Err(format!("{n} is not a power of two from 1 to 32768"))
    }
}

impl BenchArgs {
    /// The layouts asked for, each once, in the order given; all four by default.
    fn layouts(&self) -> Vec<LayoutKind> {
        let mut layouts = Vec::new();
        for &l in if self.layout.is_empty() { &LayoutKind::ALL[..] } else { &self.layout[..] } {
            if !layouts.contains(&l) {
                layouts.push(l);
            }
        }
        layouts
    }

    fn settings(&self) -> Result<Settings, String> {
        if let Some(&b) = self.batch.iter().find(|&&b| b > self.size) {
            return Err(format!("a batch of {b} does not fit in a ring of {} entries", self.size));
        }
        let buffers = self.buffers.unwrap_or(u32::from(self.size));
        if buffers < u32::from(self.size) {
            return Err(format!("{buffers} buffers cannot keep a ring of {} entries full", self.size));
        }
        let default_ms = if self.quick { 100 } else { 750 };
        let duration = Duration::from_millis(self.duration_ms.unwrap_or(default_ms));
        let modes = match self.mode {
            ModeArg::Poll => vec![Mode::Poll],
            ModeArg::Sleep => vec![Mode::Sleep],
            ModeArg::Both => vec![Mode::Poll, Mode::Sleep],
        };
        Ok(Settings {
            ring_size: self.size,
            buffers,
            layouts: self.layouts(),
            batches: self.batch.clone(),
            modes,
            duration,
            warmup: (duration / 5).min(Duration::from_millis(200)),
            pingpong: self.pingpong(),
        })
    }

    fn ringtest_settings(&self) -> ringtest::Settings {
        let default_cycles = if self.quick { 1_000_000 } else { 10_000_000 };
        ringtest::Settings {
            ring_size: self.size,
            run_cycles: self.run_cycles.unwrap_or(default_cycles),
            rounds: self.rounds,
            layouts: self.layouts(),
            pingpong: self.pingpong(),
            relax: self.relax,
        }
    }

    /// Measured time of one cache-line ping-pong.
    fn pingpong(&self) -> Duration {
        Duration::from_millis(if self.quick { 20 } else { 100 })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Blk(args) => blk_cmd::run(args),
        Command::ServeBlk(args) => serve_blk::run(args),
        Command::Net(args) => net_cmd::run(args),
        Command::ServeNet(args) => serve_net::run(args),
        Command::ServeRng(args) => serve_rng::run(args),
        Command::Rng(args) => rng_cmd::run(args),
        Command::Bench(args) => match bench_command(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn bench_command(args: &BenchArgs) -> Result<(), String> {
    let mut out = io::stdout().lock();
    let written = if args.ringtest {
        let report = ringtest::run(&args.ringtest_settings())?;
        if args.json {
            report.write_json(&mut out)
        } else {
            report.write_table(&mut out)
        }
    } else {
        let report = bench::run(&args.settings()?)?;
        if let Some(path) = &args.plot {
            std::fs::write(path, plot::throughput_svg(&report))
                .map_err(|e| format!("cannot write the plot to {}: {e}", path.display()))?;
            eprintln!("plot written to {}", path.display());
        }
        if args.json {
            report.write_json(&mut out)
        } else {
            report.write_table(&mut out)
        }
    };
    written.and_then(|()| out.flush()).map_err(|e| format!("cannot write the results: {e}"))
}
