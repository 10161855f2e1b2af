//! The baseline cycle of `scripts/instructions.sh`: rcore's `virtio-drivers` as the driver
//! and rust-vmm's `virtio-queue` as the device (`virtq_bench_support::baseline`), one
//! buffer's round trip at a time.
//!
//! `cargo run --release -p virtq --example cycle_baseline -- <cycles> <segments> [indirect] [no-notify]`
//!
//! `indirect` negotiates `VIRTIO_F_INDIRECT_DESC` on both sides; `no-notify` leaves out the
//! device's `needs_notification`, so that the cycle does exactly the work of `cycle.rs`,
//! whose device publishes without deciding on an interrupt.

use virtq_bench_support::baseline::{Pair, SEG_LEN};

fn main() {
    let usage = "usage: cycle_baseline <cycles> <segments> [indirect] [no-notify]";
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: u64 = args.first().expect(usage).parse().expect(usage);
    let segments: usize = args.get(1).expect(usage).parse().expect(usage);
    let flags = &args[2..];
    assert!(flags.iter().all(|f| f == "indirect" || f == "no-notify"), "{usage}");
    let indirect = flags.iter().any(|f| f == "indirect");
    let notify_check = !flags.iter().any(|f| f == "no-notify");
    let mut pair = Pair::new(segments, indirect, notify_check);
    let expected = (segments * SEG_LEN) as u32;
    for _ in 0..n {
        assert_eq!(pair.cycle(), expected);
    }
}
