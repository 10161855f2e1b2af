//! A hostile device against the split in-order driver: a batch that reaches past the
//! published used index. Found while reviewing the driver for the fuzz targets; the
//! target's properties (exactly-once tokens, bounded lengths) still hold, which is why
//! the fuzzer cannot see it.

use virtq::testing::TestMemory;
use virtq::{Features, QueueConfig, Virtqueue};

/// With `IN_ORDER`, one used entry may name the last buffer of a batch: the driver then
/// returns every buffer up to it. Here the device names the third buffer but publishes
/// `used.idx = 1` (one entry, which can only cover one buffer, since an in-order device
/// advances `used.idx` once per buffer of a batch). The driver returns all three, so
/// its `last_used_idx` (3) runs past its cached used index (1). `used_ready`
/// (`virtq/src/split/driver.rs`) then takes `last_used_idx != used_idx_cache` to mean
/// "entries are cached and published" and stops reading `used.idx` at all: every later
/// `get_buf` reads the used slot at `last_used_idx`, never published, without the fence
/// that orders it after an index load, and without the `UsedIndexRanAhead` check. A
/// stale entry naming a buffer in flight is returned as used.
///
/// Tokens still come back once each and lengths stay within the writable part (the
/// entry is validated), so this is a validation gap rather than memory or token safety:
/// the module promises that `used.idx` is validated and that a bad value latches the
/// queue broken. Fix: reject a batch that covers more buffers than the published index
/// does (`UsedIndexRanAhead`), or make the fast path `used_idx_cache - last_used_idx`
/// positive as an `i16`.
#[test]
fn in_order_batch_beyond_the_used_index_is_not_trusted() {
    let mem = TestMemory::new(1 << 16);
    let f = Features::VERSION_1 | Features::IN_ORDER;
    let mut q = Virtqueue::<u64, _, _>::new(QueueConfig::new(0, 4, f), &mem, ()).unwrap();
    for t in 0..3 {
        q.add_inbuf(&[mem.alloc_sg(8)], t).unwrap();
    }
    let used = q.used_addr();
    let elem = |slot: u64| used + 4 + 8 * slot;
    // One used entry, naming head 2 (the third buffer), and used.idx = 1.
    mem.write_u32(elem(0), 2);
    mem.write_u32(elem(0) + 4, 8);
    mem.write_u16(used + 2, 1);
    let returned: Vec<u64> = (0..3).filter_map(|_| q.get_buf()).map(|u| u.token).collect();
    if q.is_broken() {
        // A fixed driver may reject the batch outright: that is fine too.
        return;
    }
    // A fourth buffer, and a stale entry naming it in slot 3: never published, used.idx
    // is still 1.
    q.add_inbuf(&[mem.alloc_sg(8)], 3).unwrap();
    mem.write_u32(elem(3), 3);
    mem.write_u32(elem(3) + 4, 5);
    assert_eq!(mem.read_u16(used + 2), 1);
    let got = q.get_buf().map(|u| (u.token, u.len));
    assert_eq!(got, None, "buffer 3 was never published as used (returned before: {returned:?})");
}
