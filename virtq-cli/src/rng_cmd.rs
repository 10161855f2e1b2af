//! `virtq rng`: reads entropy from a vhost-user-rng device (`virtq serve-rng`, QEMU's
//! `vhost-device-rng`, ...) with virtq's virtio-rng driver.
//!
//! ```sh
//! virtq rng --socket /tmp/rng.sock --bytes 32                 # hex on stdout
//! virtq rng --socket /tmp/rng.sock --bytes 1M --output key.bin
//! virtq rng --socket /tmp/rng.sock --bytes 1M --layout split --output -   # raw on stdout
//! ```

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use virtq::LayoutKind;
use virtq_vhost_user::rng::{RngDriver, RngOptions};

/// Options of `virtq rng`.
#[derive(clap::Args, Debug, Clone)]
pub struct RngArgs {
    /// The vhost-user-rng back end's socket.
    #[arg(long)]
    pub socket: PathBuf,
    /// How many bytes to read (suffixes K, M: 1024, 1024²).
    #[arg(long, value_parser = parse_count)]
    pub bytes: usize,
    /// Where the bytes go, raw: a file, or `-` for standard output. Without it they are
    /// printed in hex.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Ring layout to negotiate (the device must offer it) [default: packed in-order if
    /// offered, else what is].
    #[arg(long, value_parser = crate::layout::layout_parser())]
    pub layout: Option<LayoutKind>,
    /// Bytes asked for in each request.
    #[arg(long, default_value_t = 4096, value_parser = parse_count)]
    pub request_bytes: usize,
}

fn parse_count(s: &str) -> Result<usize, String> {
    let (digits, mult) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1 << 10),
        Some('m' | 'M') => (&s[..s.len() - 1], 1 << 20),
        _ => (s, 1),
    };
    digits
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s} is not a count (digits, optionally followed by K or M)"))
}

/// Runs `virtq rng`.
pub fn run(args: RngArgs) -> ExitCode {
    let mut opts = RngOptions { buffer_size: args.request_bytes.max(1), ..Default::default() };
    if let Some(layout) = args.layout {
        opts.required_features = layout.features().bits();
        opts.ring_packed = layout.is_packed();
        opts.in_order = layout.is_in_order();
    }
    let mut rng = match RngDriver::connect(&args.socket, &opts) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("virtq rng: {e}");
            return ExitCode::from(2);
        }
    };
    let start = Instant::now();
    let mut bytes = vec![0u8; args.bytes];
    if let Err(e) = rng.read(&mut bytes) {
        eprintln!("virtq rng: {e}");
        return ExitCode::FAILURE;
    }
    let elapsed = start.elapsed();
    let (_, requests) = rng.received();
    eprintln!(
        "virtq rng: {} bytes in {requests} requests, {:.1} ms ({} ring)",
        args.bytes,
        elapsed.as_secs_f64() * 1e3,
        LayoutKind::from_features(rng.features()).name()
    );
    let written = match &args.output {
        Some(p) if p.as_os_str() == "-" => std::io::stdout().lock().write_all(&bytes),
        Some(p) => std::fs::write(p, &bytes),
        None => {
            let mut out = std::io::stdout().lock();
            bytes
                .chunks(32)
                .try_for_each(|line| {
                    line.iter().try_for_each(|b| write!(out, "{b:02x}"))?;
                    writeln!(out)
                })
                .and_then(|()| out.flush())
        }
    };
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("virtq rng: cannot write the bytes: {e}");
            ExitCode::FAILURE
        }
    }
}
