//! `virtq`: command-line tools for the virtq crate.
//!
//! `virtq bench` measures the split ring in-process: the driver ([`virtq::SplitDriver`])
//! and the device ([`virtq::SplitDevice`]) run on two threads sharing one ring, pinned to
//! two CPUs when there are two. It needs nothing outside the process.

mod affinity;
mod bench;
mod device_side;
mod driver_side;
mod notify;
mod report;

use std::io::{self, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::bench::{Mode, Settings};

#[derive(Debug, Parser)]
#[command(name = "virtq", version, about = "Virtio virtqueue tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Benchmark the split ring in-process: driver and device on two threads, one ring.
    ///
    /// For each mode and batch size, streams buffers with the ring kept full and reports
    /// throughput and notifications per buffer; for each mode, measures request/response
    /// latency with one buffer outstanding. Every run checks that each buffer came back
    /// exactly once; a side that makes no progress for 5 s aborts the run.
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// Short run for smoke tests: 150 ms per cell unless --duration-ms says otherwise.
    #[arg(long)]
    quick: bool,

    /// Print the results as JSON on stdout instead of a table.
    #[arg(long)]
    json: bool,

    /// Measured time per cell in milliseconds, after a warm-up of a fifth of it (at most
    /// 200 ms) [default: 1000, or 150 with --quick].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=600_000))]
    duration_ms: Option<u64>,

    /// Buffers added per kick in the throughput runs, comma-separated.
    #[arg(
        long,
        value_name = "N,..",
        value_delimiter = ',',
        default_value = "1,8,32,128",
        value_parser = clap::value_parser!(u16).range(1..)
    )]
    batch: Vec<u16>,

    /// How the two sides wait for work: busy-poll, sleep until notified, or both.
    #[arg(long, value_enum, default_value_t = ModeArg::Both)]
    mode: ModeArg,

    /// Ring size in entries (a power of two, at most 32768).
    #[arg(long, value_name = "ENTRIES", default_value_t = 256, value_parser = parse_ring_size)]
    size: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ModeArg {
    Poll,
    Sleep,
    Both,
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
    fn settings(&self) -> Result<Settings, String> {
        if let Some(&b) = self.batch.iter().find(|&&b| b > self.size) {
            return Err(format!("a batch of {b} does not fit in a ring of {} entries", self.size));
        }
        let default_ms = if self.quick { 150 } else { 1000 };
        let duration = Duration::from_millis(self.duration_ms.unwrap_or(default_ms));
        let modes = match self.mode {
            ModeArg::Poll => vec![Mode::Poll],
            ModeArg::Sleep => vec![Mode::Sleep],
            ModeArg::Both => vec![Mode::Poll, Mode::Sleep],
        };
        Ok(Settings {
            ring_size: self.size,
            batches: self.batch.clone(),
            modes,
            duration,
            warmup: (duration / 5).min(Duration::from_millis(200)),
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
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
    let settings = args.settings()?;
    let report = bench::run(&settings)?;
    let mut out = io::stdout().lock();
    let written = if args.json { report.write_json(&mut out) } else { report.write_table(&mut out) };
    written.and_then(|()| out.flush()).map_err(|e| format!("cannot write the results: {e}"))
}
