//! What the `serve-*` commands share: where they listen, how many frontends they serve,
//! and the loop that serves them.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use virtq_vhost_user::backend::{Device, Server, ServerOptions, RING_FEATURES};
use virtq_vhost_user::virtq::Features;

/// Options of every `virtq serve-*` command.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Unix socket to listen on (replaced if it exists).
    #[arg(long)]
    pub socket: PathBuf,
    /// Serve a single frontend connection, then exit.
    #[arg(long)]
    pub once: bool,
    /// Most frontends served at once; one more is closed at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_connections: u32,
    /// Keep polling the rings this many microseconds after the last request before
    /// sleeping on the kick eventfds (0: sleep at once). Saves a kick and a wake-up per
    /// burst under load, at the price of a busy CPU.
    #[arg(long, value_name = "US", default_value_t = 0)]
    pub poll_us: u64,
    /// Do not offer VIRTIO_F_RING_PACKED: frontends that take whatever the back end
    /// offers (QEMU's vhost-user-rng-pci) then use split rings.
    #[arg(long)]
    pub no_packed: bool,
    /// Do not offer VIRTIO_F_IN_ORDER.
    #[arg(long)]
    pub no_in_order: bool,
}

/// Listens on `args.socket` and serves `device` until killed (or, with `--once`, one
/// frontend). `cmd` names the command in messages.
pub fn serve(cmd: &str, device: Arc<dyn Device>, args: &ServeArgs) -> ExitCode {
    let mut ring_features = Features::from_bits(RING_FEATURES);
    if args.no_packed {
        ring_features = ring_features.difference(Features::RING_PACKED);
    }
    if args.no_in_order {
        ring_features = ring_features.difference(Features::IN_ORDER);
    }
    let limits = ServerOptions {
        max_connections: args.max_connections as usize,
        poll: Duration::from_micros(args.poll_us),
        ring_features,
        ..Default::default()
    };
    let mut server = match Server::bind_with(&args.socket, device, limits) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("virtq {cmd}: cannot listen on {}: {e}", args.socket.display());
            return ExitCode::from(2);
        }
    };
    let r = if args.once { server.serve_one().map(|_| ()) } else { server.run() };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("virtq {cmd}: {e}");
            ExitCode::FAILURE
        }
    }
}
