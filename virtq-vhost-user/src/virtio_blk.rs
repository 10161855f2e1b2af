//! The virtio-blk vocabulary (VIRTIO 1.3, section 5.2), defined once for the driver
//! (`blk`) and the device (`backend::blk`).

/// Bytes in a virtio-blk sector, whatever the device's block size.
pub const SECTOR: u64 = 512;

/// Length of the device id returned by `GET_ID`.
pub const ID_BYTES: usize = 20;

/// Bytes of a request header: `type: u32, reserved: u32, sector: u64`.
pub const HEADER_BYTES: usize = 16;

/// virtio-blk feature bits (VIRTIO 1.3, 5.2.3).
pub mod feature {
    /// Maximum size of any single segment is in `size_max`.
    pub const SIZE_MAX: u64 = 1 << 1;
    /// Maximum number of segments in a request is in `seg_max`.
    pub const SEG_MAX: u64 = 1 << 2;
    /// Disk-style geometry specified in `geometry`.
    pub const GEOMETRY: u64 = 1 << 4;
    /// The device is read-only.
    pub const RO: u64 = 1 << 5;
    /// Block size of the disk is in `blk_size`.
    pub const BLK_SIZE: u64 = 1 << 6;
    /// Cache flush command support.
    pub const FLUSH: u64 = 1 << 9;
    /// The device exports information on optimal I/O alignment.
    pub const TOPOLOGY: u64 = 1 << 10;
    /// The device can toggle its cache between writeback and writethrough.
    pub const CONFIG_WCE: u64 = 1 << 11;
    /// The device supports more than one virtqueue (`num_queues`).
    pub const MQ: u64 = 1 << 12;
    /// The device can support discard.
    pub const DISCARD: u64 = 1 << 13;
    /// The device can support write zeroes.
    pub const WRITE_ZEROES: u64 = 1 << 14;
    /// The device supports providing storage lifetime information.
    pub const LIFETIME: u64 = 1 << 15;
    /// The device supports secure erase.
    pub const SECURE_ERASE: u64 = 1 << 16;

    /// Names of the bits above, for display.
    pub const NAMES: [(u64, &str); 13] = [
        (SIZE_MAX, "SIZE_MAX"),
        (SEG_MAX, "SEG_MAX"),
        (GEOMETRY, "GEOMETRY"),
        (RO, "RO"),
        (BLK_SIZE, "BLK_SIZE"),
        (FLUSH, "FLUSH"),
        (TOPOLOGY, "TOPOLOGY"),
        (CONFIG_WCE, "CONFIG_WCE"),
        (MQ, "MQ"),
        (DISCARD, "DISCARD"),
        (WRITE_ZEROES, "WRITE_ZEROES"),
        (LIFETIME, "LIFETIME"),
        (SECURE_ERASE, "SECURE_ERASE"),
    ];
}

/// Request types (`VIRTIO_BLK_T_*`).
pub mod req {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Flush.
    pub const FLUSH: u32 = 4;
    /// Device id.
    pub const GET_ID: u32 = 8;
    /// Discard.
    pub const DISCARD: u32 = 11;
    /// Write zeroes.
    pub const WRITE_ZEROES: u32 = 13;
}

/// Status values (`VIRTIO_BLK_S_*`).
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// Device or driver error.
    pub const IOERR: u8 = 1;
    /// Request unsupported.
    pub const UNSUPP: u8 = 2;
}

/// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`.
pub const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;
