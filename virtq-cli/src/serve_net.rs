//! `virtq serve-net`: a vhost-user-net back end (virtio-net, VIRTIO 1.3, 5.1) on the
//! back-end framework, forwarding frames to a TAP device or looping them back to the
//! driver.
//!
//! ```sh
//! virtq serve-net --socket /tmp/net.sock --tap vq0           # needs CAP_NET_ADMIN
//! qemu-system-x86_64 ... -object memory-backend-memfd,id=mem0,size=512M,share=on \
//!   -machine memory-backend=mem0 -chardev socket,id=n0,path=/tmp/net.sock \
//!   -netdev vhost-user,id=net0,chardev=n0 -device virtio-net-pci,netdev=net0[,packed=on]
//!
//! virtq serve-net --socket /tmp/net.sock --loopback --poll-us 100   # a benchmark peer
//! dpdk-testpmd --no-huge -m 1024 --no-pci --file-prefix=drv \
//!   --vdev net_virtio_user0,path=/tmp/net.sock,queues=1 -- -i
//! ```

use std::process::ExitCode;
use std::sync::Arc;

use virtq_vhost_user::net::device::MAX_PAIRS;
use virtq_vhost_user::net::{NetBackend, NetBackendOptions, NetPeer};

use crate::serve::{serve, ServeArgs};

/// Options of `virtq serve-net`.
#[derive(clap::Args, Debug, Clone)]
#[group(id = "peer", required = true, multiple = false, args = ["tap", "loopback"])]
pub struct ServeNetArgs {
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Forward frames to and from this TAP device (created if missing; with --queues > 1
    /// it must be a multi_queue TAP). Checksum and segmentation offloads pass through.
    #[arg(long, value_name = "NAME")]
    pub tap: Option<String>,
    /// Return every frame the driver transmits on its receive queue (a benchmark peer).
    #[arg(long)]
    pub loopback: bool,
    /// Queue pairs offered (MQ).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=MAX_PAIRS as i64))]
    pub queues: u16,
    /// MAC address in the config space.
    #[arg(long, default_value = "52:54:00:12:34:56", value_parser = parse_mac)]
    pub mac: [u8; 6],
    /// Largest MTU offered to the driver (MTU feature).
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u16).range(68..))]
    pub mtu: u16,
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!("{s} is not a MAC address (six hex bytes separated by ':')"));
    }
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).map_err(|_| format!("{s} is not a MAC address"))?;
    }
    Ok(mac)
}

/// Runs `virtq serve-net`.
pub fn run(args: ServeNetArgs) -> ExitCode {
    let peer = match &args.tap {
        Some(name) => NetPeer::Tap(name.clone()),
        None => NetPeer::Loopback,
    };
    let opts = NetBackendOptions { pairs: args.queues, mac: args.mac, mtu: args.mtu, peer: peer.clone() };
    let device = match NetBackend::new(opts) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("virtq serve-net: {e}");
            return ExitCode::from(2);
        }
    };
    eprintln!(
        "virtq serve-net: {} queue pair{}, {} on {}",
        args.queues,
        if args.queues == 1 { "" } else { "s" },
        match &peer {
            NetPeer::Tap(name) => format!("TAP {name}"),
            NetPeer::Loopback => "loopback".to_string(),
        },
        args.serve.socket.display()
    );
    serve("serve-net", Arc::new(device), &args.serve)
}
