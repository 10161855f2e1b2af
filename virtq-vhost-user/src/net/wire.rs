//! The virtio-net vocabulary (VIRTIO 1.3, section 5.1), defined once for a driver and a
//! device: feature bits, the packet header `virtio_net_hdr_v1`, the config space, and the
//! control queue's commands and acknowledgements.
//!
//! Nothing here knows which side it is on: [`NetHdr::parse`] and [`NetHdr::to_bytes`]
//! serve a driver reading a received header as well as a device reading a transmitted one,
//! and [`NetHdr::check_frame`] tells either side whether a header claims more than the
//! frame it came with.

/// virtio-net feature bits (VIRTIO 1.3, 5.1.3), as masks of the 64-bit feature word.
pub mod feature {
    /// The device handles packets with a partial checksum (checksum offload to the device).
    pub const CSUM: u64 = 1 << 0;
    /// The driver handles packets with a partial checksum.
    pub const GUEST_CSUM: u64 = 1 << 1;
    /// Offloads can be reconfigured through the control queue.
    pub const CTRL_GUEST_OFFLOADS: u64 = 1 << 2;
    /// The device reports its maximum MTU in `mtu`.
    pub const MTU: u64 = 1 << 3;
    /// The device has a MAC address in `mac`.
    pub const MAC: u64 = 1 << 5;
    /// The driver can receive TSOv4.
    pub const GUEST_TSO4: u64 = 1 << 7;
    /// The driver can receive TSOv6.
    pub const GUEST_TSO6: u64 = 1 << 8;
    /// The driver can receive TSO with ECN.
    pub const GUEST_ECN: u64 = 1 << 9;
    /// The driver can receive UFO.
    pub const GUEST_UFO: u64 = 1 << 10;
    /// The device can receive TSOv4.
    pub const HOST_TSO4: u64 = 1 << 11;
    /// The device can receive TSOv6.
    pub const HOST_TSO6: u64 = 1 << 12;
    /// The device can receive TSO with ECN.
    pub const HOST_ECN: u64 = 1 << 13;
    /// The device can receive UFO.
    pub const HOST_UFO: u64 = 1 << 14;
    /// The driver can merge receive buffers: one packet may span several (`num_buffers`).
    pub const MRG_RXBUF: u64 = 1 << 15;
    /// The config space has a link `status`.
    pub const STATUS: u64 = 1 << 16;
    /// There is a control virtqueue.
    pub const CTRL_VQ: u64 = 1 << 17;
    /// The control queue takes receive-mode commands.
    pub const CTRL_RX: u64 = 1 << 18;
    /// The control queue takes VLAN filter commands.
    pub const CTRL_VLAN: u64 = 1 << 19;
    /// The control queue takes the extra receive-mode commands.
    pub const CTRL_RX_EXTRA: u64 = 1 << 20;
    /// The driver can send gratuitous packets on request.
    pub const GUEST_ANNOUNCE: u64 = 1 << 21;
    /// Several transmit/receive queue pairs, with steering.
    pub const MQ: u64 = 1 << 22;
    /// The MAC address can be set through the control queue.
    pub const CTRL_MAC_ADDR: u64 = 1 << 23;
    /// Per-virtqueue notification coalescing.
    pub const VQ_NOTF_COAL: u64 = 1 << 52;
    /// Notification coalescing.
    pub const NOTF_COAL: u64 = 1 << 53;
    /// The driver can receive USO for IPv4.
    pub const GUEST_USO4: u64 = 1 << 54;
    /// The driver can receive USO for IPv6.
    pub const GUEST_USO6: u64 = 1 << 55;
    /// The device can receive USO.
    pub const HOST_USO: u64 = 1 << 56;
    /// The device reports a hash of each received packet.
    pub const HASH_REPORT: u64 = 1 << 57;
    /// The driver gives the exact header length in `hdr_len`.
    pub const GUEST_HDRLEN: u64 = 1 << 59;
    /// Receive-side scaling.
    pub const RSS: u64 = 1 << 60;
    /// Extended receive-segment-coalescing information.
    pub const RSC_EXT: u64 = 1 << 61;
    /// The device may act as a standby for a primary device with the same MAC.
    pub const STANDBY: u64 = 1 << 62;
    /// The config space has `speed` and `duplex`.
    pub const SPEED_DUPLEX: u64 = 1 << 63;

    /// Names of the bits above, for display.
    pub const NAMES: [(u64, &str); 33] = [
        (CSUM, "CSUM"),
        (GUEST_CSUM, "GUEST_CSUM"),
        (CTRL_GUEST_OFFLOADS, "CTRL_GUEST_OFFLOADS"),
        (MTU, "MTU"),
        (MAC, "MAC"),
        (GUEST_TSO4, "GUEST_TSO4"),
        (GUEST_TSO6, "GUEST_TSO6"),
        (GUEST_ECN, "GUEST_ECN"),
        (GUEST_UFO, "GUEST_UFO"),
        (HOST_TSO4, "HOST_TSO4"),
        (HOST_TSO6, "HOST_TSO6"),
        (HOST_ECN, "HOST_ECN"),
        (HOST_UFO, "HOST_UFO"),
        (MRG_RXBUF, "MRG_RXBUF"),
        (STATUS, "STATUS"),
        (CTRL_VQ, "CTRL_VQ"),
        (CTRL_RX, "CTRL_RX"),
        (CTRL_VLAN, "CTRL_VLAN"),
        (CTRL_RX_EXTRA, "CTRL_RX_EXTRA"),
        (GUEST_ANNOUNCE, "GUEST_ANNOUNCE"),
        (MQ, "MQ"),
        (CTRL_MAC_ADDR, "CTRL_MAC_ADDR"),
        (VQ_NOTF_COAL, "VQ_NOTF_COAL"),
        (NOTF_COAL, "NOTF_COAL"),
        (GUEST_USO4, "GUEST_USO4"),
        (GUEST_USO6, "GUEST_USO6"),
        (HOST_USO, "HOST_USO"),
        (HASH_REPORT, "HASH_REPORT"),
        (GUEST_HDRLEN, "GUEST_HDRLEN"),
        (RSS, "RSS"),
        (RSC_EXT, "RSC_EXT"),
        (STANDBY, "STANDBY"),
        (SPEED_DUPLEX, "SPEED_DUPLEX"),
    ];

    /// The bit named `name` in [`NAMES`] (case-insensitive, with or without the
    /// `VIRTIO_NET_F_` prefix).
    pub fn by_name(name: &str) -> Option<u64> {
        let n = name.trim().to_ascii_uppercase();
        let n = n.strip_prefix("VIRTIO_NET_F_").unwrap_or(&n);
        NAMES.iter().find(|(_, s)| *s == n).map(|(bit, _)| *bit)
    }
}

/// `struct virtio_net_hdr_v1` (VIRTIO 1.3, 5.1.6): the header in front of every packet,
/// in both directions.
///
/// ```text
/// offset  0  u8    flags         NEEDS_CSUM 1, DATA_VALID 2, RSC_INFO 4
///         1  u8    gso_type      NONE 0, TCPV4 1, UDP 3, TCPV6 4, UDP_L4 5, | ECN 0x80
///         2  le16  hdr_len
///         4  le16  gso_size
///         6  le16  csum_start
///         8  le16  csum_offset
///        10  le16  num_buffers   buffers this received packet spans (MRG_RXBUF)
/// ```
///
/// With `VERSION_1` the header is always these 12 bytes, with or without `MRG_RXBUF`.
#[doc(alias = "virtio_net_hdr_mrg_rxbuf")]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetHdr {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`.
    pub gso_type: u8,
    /// Bytes of headers before the payload to segment (GSO).
    pub hdr_len: u16,
    /// Bytes of payload per segment (GSO).
    pub gso_size: u16,
    /// Where checksumming starts (`NEEDS_CSUM`).
    pub csum_start: u16,
    /// Where, from `csum_start`, the checksum goes (`NEEDS_CSUM`).
    pub csum_offset: u16,
    /// Buffers the packet spans (received packets, `MRG_RXBUF`); 0 on transmit.
    pub num_buffers: u16,
}

/// Header flags (`VIRTIO_NET_HDR_F_*`).
pub mod hdr_flags {
    /// The checksum from `csum_start` is partial: the receiver completes it.
    pub const NEEDS_CSUM: u8 = 1;
    /// The checksum has been validated (received packets, `GUEST_CSUM`).
    pub const DATA_VALID: u8 = 2;
    /// `csum_start`/`csum_offset` carry coalescing counts (`RSC_EXT`).
    pub const RSC_INFO: u8 = 4;
}

/// GSO types (`VIRTIO_NET_HDR_GSO_*`).
pub mod gso {
    /// Not a GSO packet.
    pub const NONE: u8 = 0;
    /// TCP over IPv4.
    pub const TCPV4: u8 = 1;
    /// UDP fragmentation offload.
    pub const UDP: u8 = 3;
    /// TCP over IPv6.
    pub const TCPV6: u8 = 4;
    /// UDP segmentation offload.
    pub const UDP_L4: u8 = 5;
    /// ECN bit, or-ed into the type.
    pub const ECN: u8 = 0x80;
}

/// What a header claims beyond the frame it came with (see [`NetHdr::check_frame`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// `NEEDS_CSUM` with the checksum field (`csum_start + csum_offset`, 2 bytes) past the
    /// end of the frame.
    #[error("the header's checksum field at {csum_start} + {csum_offset} lies beyond the {frame_len}-byte frame")]
    ChecksumBeyondFrame {
        /// `csum_start`.
        csum_start: u16,
        /// `csum_offset`.
        csum_offset: u16,
        /// Bytes of frame that arrived.
        frame_len: usize,
    },
    /// A GSO header longer than the frame.
    #[error("the header claims {hdr_len} bytes of protocol headers, the frame has {frame_len}")]
    HeadersBeyondFrame {
        /// `hdr_len`.
        hdr_len: u16,
        /// Bytes of frame that arrived.
        frame_len: usize,
    },
}

impl NetHdr {
    /// Bytes of the header on the wire.
    pub const SIZE: usize = 12;

    /// Reads a header from its 12 little-endian bytes.
    pub fn parse(b: &[u8; Self::SIZE]) -> Self {
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            num_buffers: u16_at(10),
        }
    }

    /// The 12 little-endian bytes of the header.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }

    /// Whether the header asks for a checksum to be completed (`NEEDS_CSUM`).
    pub fn needs_csum(&self) -> bool {
        self.flags & hdr_flags::NEEDS_CSUM != 0
    }

    /// Whether the packet is a GSO packet (`gso_type` other than `NONE`, ECN aside).
    pub fn is_gso(&self) -> bool {
        self.gso_type & !gso::ECN != gso::NONE
    }

    /// Checks that whatever the header points at lies inside a frame of `frame_len` bytes:
    /// the checksum field of a `NEEDS_CSUM` packet, the protocol headers of a GSO packet.
    /// A header that fails claims more than arrived; reading by it would read past the
    /// frame.
    pub fn check_frame(&self, frame_len: usize) -> Result<(), HeaderError> {
        if self.needs_csum() {
            let end = self.csum_start as usize + self.csum_offset as usize + 2;
            if end > frame_len {
                return Err(HeaderError::ChecksumBeyondFrame {
                    csum_start: self.csum_start,
                    csum_offset: self.csum_offset,
                    frame_len,
                });
            }
        }
        if self.is_gso() && self.hdr_len as usize > frame_len {
            return Err(HeaderError::HeadersBeyondFrame { hdr_len: self.hdr_len, frame_len });
        }
        Ok(())
    }
}

/// Link status bits of the config space's `status` (`VIRTIO_NET_S_*`).
pub mod status {
    /// The link is up.
    pub const LINK_UP: u16 = 1;
    /// The device asks the driver to send gratuitous packets (`GUEST_ANNOUNCE`).
    pub const ANNOUNCE: u16 = 2;
}

/// Bytes of `struct virtio_net_config` through `supported_hash_types`.
pub const CONFIG_SIZE: usize = 24;

/// `struct virtio_net_config` (VIRTIO 1.3, 5.1.4). Each field is valid only with its
/// feature: `mac` (`MAC`), `status` (`STATUS`), `max_virtqueue_pairs` (`MQ`), `mtu`
/// (`MTU`), `speed` and `duplex` (`SPEED_DUPLEX`), the RSS fields (`RSS`,
/// `HASH_REPORT`).
///
/// ```text
/// offset  0  u8[6] mac       6  le16 status       8  le16 max_virtqueue_pairs
///        10  le16  mtu      12  le32 speed       16  u8   duplex
///        17  u8    rss_max_key_size             18  le16 rss_max_indirection_table_length
///        20  le32  supported_hash_types
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetConfig {
    /// The device's MAC address.
    pub mac: [u8; 6],
    /// `VIRTIO_NET_S_*`.
    pub status: u16,
    /// Queue pairs the device has.
    pub max_virtqueue_pairs: u16,
    /// Largest MTU the driver should use.
    pub mtu: u16,
    /// Link speed in Mb/s (`u32::MAX`: unknown).
    pub speed: u32,
    /// 1 full duplex, 0 half, 0xff unknown.
    pub duplex: u8,
    /// Longest RSS key.
    pub rss_max_key_size: u8,
    /// Longest RSS indirection table.
    pub rss_max_indirection_table_length: u16,
    /// `VIRTIO_NET_RSS_HASH_TYPE_*` bits.
    pub supported_hash_types: u32,
}

impl NetConfig {
    /// Parses the little-endian config space; bytes missing at the end read as zero.
    pub fn parse(bytes: &[u8]) -> Self {
        let mut b = [0u8; CONFIG_SIZE];
        let n = bytes.len().min(CONFIG_SIZE);
        b[..n].copy_from_slice(&bytes[..n]);
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&b[0..6]);
        Self {
            mac,
            status: u16_at(6),
            max_virtqueue_pairs: u16_at(8),
            mtu: u16_at(10),
            speed: u32_at(12),
            duplex: b[16],
            rss_max_key_size: b[17],
            rss_max_indirection_table_length: u16_at(18),
            supported_hash_types: u32_at(20),
        }
    }

    /// The little-endian config space.
    pub fn to_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut b = [0u8; CONFIG_SIZE];
        b[0..6].copy_from_slice(&self.mac);
        b[6..8].copy_from_slice(&self.status.to_le_bytes());
        b[8..10].copy_from_slice(&self.max_virtqueue_pairs.to_le_bytes());
        b[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        b[12..16].copy_from_slice(&self.speed.to_le_bytes());
        b[16] = self.duplex;
        b[17] = self.rss_max_key_size;
        b[18..20].copy_from_slice(&self.rss_max_indirection_table_length.to_le_bytes());
        b[20..24].copy_from_slice(&self.supported_hash_types.to_le_bytes());
        b
    }
}

/// The virtqueue index of queue pair `pair`'s receive queue (receiveq1 is 0).
pub const fn rx_queue_index(pair: u16) -> u16 {
    2 * pair
}

/// The virtqueue index of queue pair `pair`'s transmit queue (transmitq1 is 1).
pub const fn tx_queue_index(pair: u16) -> u16 {
    2 * pair + 1
}

/// The control queue's index: after every queue pair with `MQ`, else 2 (5.1.2).
pub const fn ctrl_queue_index(max_virtqueue_pairs: u16, mq: bool) -> u16 {
    if mq {
        2 * max_virtqueue_pairs
    } else {
        2
    }
}

/// Smallest and largest `virtqueue_pairs` of `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`.
pub const VQ_PAIRS_MIN: u16 = 1;
/// See [`VQ_PAIRS_MIN`].
pub const VQ_PAIRS_MAX: u16 = 0x8000;

/// Control-queue classes and commands (`VIRTIO_NET_CTRL_*`, 5.1.6.5).
pub mod ctrl {
    /// Receive-mode class.
    pub const CLASS_RX: u8 = 0;
    /// Promiscuous mode (`u8` on/off).
    pub const RX_PROMISC: u8 = 0;
    /// All-multicast mode (`u8` on/off).
    pub const RX_ALLMULTI: u8 = 1;
    /// MAC class.
    pub const CLASS_MAC: u8 = 1;
    /// Set the MAC address (`u8[6]`).
    pub const MAC_ADDR_SET: u8 = 1;
    /// Announce class.
    pub const CLASS_ANNOUNCE: u8 = 3;
    /// Acknowledge an announce request (no data).
    pub const ANNOUNCE_ACK: u8 = 0;
    /// Multiqueue class.
    pub const CLASS_MQ: u8 = 4;
    /// Number of queue pairs to use (`le16`).
    pub const MQ_VQ_PAIRS_SET: u8 = 0;
    /// Guest-offloads class.
    pub const CLASS_GUEST_OFFLOADS: u8 = 5;
    /// Set the offloads (`le64` of feature bits).
    pub const GUEST_OFFLOADS_SET: u8 = 0;

    /// The command succeeded.
    pub const ACK_OK: u8 = 0;
    /// The command failed.
    pub const ACK_ERR: u8 = 1;
}

/// A control-queue command (`struct virtio_net_ctrl`: class, command, data; the device
/// writes a one-byte ack after the data).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtrlCommand {
    /// `VIRTIO_NET_CTRL_RX_PROMISC`.
    Promisc(bool),
    /// `VIRTIO_NET_CTRL_RX_ALLMULTI`.
    AllMulti(bool),
    /// `VIRTIO_NET_CTRL_MAC_ADDR_SET`.
    MacAddrSet([u8; 6]),
    /// `VIRTIO_NET_CTRL_ANNOUNCE_ACK`.
    AnnounceAck,
    /// `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`: use this many queue pairs.
    VqPairsSet(u16),
    /// `VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET`.
    GuestOffloadsSet(u64),
}

/// Longest command data of [`CtrlCommand`] (the offloads word).
pub const CTRL_DATA_MAX: usize = 8;

/// A control command that cannot be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CtrlDecodeError {
    /// Fewer than two bytes: no class and command.
    #[error("a control command needs a class and a command byte")]
    Truncated,
    /// A class and command this vocabulary does not know.
    #[error("unknown control command: class {class}, command {command}")]
    Unknown {
        /// The class byte.
        class: u8,
        /// The command byte.
        command: u8,
    },
    /// The data is not as long as the command needs.
    #[error("control command class {class}, command {command} needs {want} bytes of data, got {got}")]
    BadLength {
        /// The class byte.
        class: u8,
        /// The command byte.
        command: u8,
        /// Bytes the command needs.
        want: usize,
        /// Bytes that came.
        got: usize,
    },
}

impl CtrlCommand {
    /// The class and command bytes.
    pub fn class_command(&self) -> (u8, u8) {
        match self {
            Self::Promisc(_) => (ctrl::CLASS_RX, ctrl::RX_PROMISC),
            Self::AllMulti(_) => (ctrl::CLASS_RX, ctrl::RX_ALLMULTI),
            Self::MacAddrSet(_) => (ctrl::CLASS_MAC, ctrl::MAC_ADDR_SET),
            Self::AnnounceAck => (ctrl::CLASS_ANNOUNCE, ctrl::ANNOUNCE_ACK),
            Self::VqPairsSet(_) => (ctrl::CLASS_MQ, ctrl::MQ_VQ_PAIRS_SET),
            Self::GuestOffloadsSet(_) => (ctrl::CLASS_GUEST_OFFLOADS, ctrl::GUEST_OFFLOADS_SET),
        }
    }

    /// Writes the device-readable part (class, command, data) into `out`; returns its
    /// length. `out` needs `2 + CTRL_DATA_MAX` bytes.
    pub fn encode(&self, out: &mut [u8; 2 + CTRL_DATA_MAX]) -> usize {
        let (class, command) = self.class_command();
        out[0] = class;
        out[1] = command;
        let data = &mut out[2..];
        let n = match *self {
            Self::Promisc(on) | Self::AllMulti(on) => {
                data[0] = u8::from(on);
                1
            }
            Self::MacAddrSet(mac) => {
                data[..6].copy_from_slice(&mac);
                6
            }
            Self::AnnounceAck => 0,
            Self::VqPairsSet(n) => {
                data[..2].copy_from_slice(&n.to_le_bytes());
                2
            }
            Self::GuestOffloadsSet(bits) => {
                data[..8].copy_from_slice(&bits.to_le_bytes());
                8
            }
        };
        2 + n
    }

    /// Decodes the device-readable part of a control request (class, command, data).
    pub fn decode(bytes: &[u8]) -> Result<Self, CtrlDecodeError> {
        let [class, command, data @ ..] = bytes else {
            return Err(CtrlDecodeError::Truncated);
        };
        let (class, command) = (*class, *command);
        let need = |want: usize| {
            if data.len() == want {
                Ok(())
            } else {
                Err(CtrlDecodeError::BadLength { class, command, want, got: data.len() })
            }
        };
        Ok(match (class, command) {
            (ctrl::CLASS_RX, ctrl::RX_PROMISC) => {
                need(1)?;
                Self::Promisc(data[0] != 0)
            }
            (ctrl::CLASS_RX, ctrl::RX_ALLMULTI) => {
                need(1)?;
                Self::AllMulti(data[0] != 0)
            }
            (ctrl::CLASS_MAC, ctrl::MAC_ADDR_SET) => {
                need(6)?;
                let mut mac = [0u8; 6];
                mac.copy_from_slice(data);
                Self::MacAddrSet(mac)
            }
            (ctrl::CLASS_ANNOUNCE, ctrl::ANNOUNCE_ACK) => {
                need(0)?;
                Self::AnnounceAck
            }
            (ctrl::CLASS_MQ, ctrl::MQ_VQ_PAIRS_SET) => {
                need(2)?;
                Self::VqPairsSet(u16::from_le_bytes([data[0], data[1]]))
            }
            (ctrl::CLASS_GUEST_OFFLOADS, ctrl::GUEST_OFFLOADS_SET) => {
                need(8)?;
                let mut w = [0u8; 8];
                w.copy_from_slice(data);
                Self::GuestOffloadsSet(u64::from_le_bytes(w))
            }
            _ => return Err(CtrlDecodeError::Unknown { class, command }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_hdr_5_1_6_round_trips_little_endian() {
        let h = NetHdr {
            flags: hdr_flags::NEEDS_CSUM,
            gso_type: gso::TCPV4 | gso::ECN,
            hdr_len: 0x0102,
            gso_size: 0x0304,
            csum_start: 0x0506,
            csum_offset: 0x0708,
            num_buffers: 0x090a,
        };
        let b = h.to_bytes();
        assert_eq!(b, [1, 0x81, 2, 1, 4, 3, 6, 5, 8, 7, 0x0a, 9]);
        assert_eq!(NetHdr::parse(&b), h);
        assert!(h.needs_csum() && h.is_gso());
        assert!(!NetHdr { gso_type: gso::ECN, ..Default::default() }.is_gso());
    }

    #[test]
    fn header_claiming_beyond_the_frame_is_caught() {
        let csum = NetHdr { flags: hdr_flags::NEEDS_CSUM, csum_start: 34, csum_offset: 16, ..Default::default() };
        assert_eq!(csum.check_frame(52), Ok(()));
        assert!(matches!(csum.check_frame(51), Err(HeaderError::ChecksumBeyondFrame { frame_len: 51, .. })));
        let tso = NetHdr { gso_type: gso::TCPV4, hdr_len: 54, ..Default::default() };
        assert_eq!(tso.check_frame(54), Ok(()));
        assert!(matches!(tso.check_frame(53), Err(HeaderError::HeadersBeyondFrame { hdr_len: 54, .. })));
        // Without NEEDS_CSUM and GSO the offsets mean nothing.
        let plain = NetHdr { csum_start: u16::MAX, hdr_len: u16::MAX, ..Default::default() };
        assert_eq!(plain.check_frame(60), Ok(()));
    }

    #[test]
    fn config_5_1_4_layout() {
        let c = NetConfig {
            mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            status: status::LINK_UP,
            max_virtqueue_pairs: 4,
            mtu: 9000,
            speed: 10_000,
            duplex: 1,
            rss_max_key_size: 40,
            rss_max_indirection_table_length: 128,
            supported_hash_types: 0x3f,
        };
        let b = c.to_bytes();
        assert_eq!(&b[0..6], &c.mac);
        assert_eq!(&b[6..12], &[1, 0, 4, 0, 0x28, 0x23]);
        assert_eq!(NetConfig::parse(&b), c);
        // A shorter config space (a device without the later fields) reads zeroes.
        let short = NetConfig::parse(&b[..10]);
        assert_eq!((short.max_virtqueue_pairs, short.mtu), (4, 0));
    }

    #[test]
    fn queue_indices_5_1_2() {
        assert_eq!((rx_queue_index(0), tx_queue_index(0)), (0, 1));
        assert_eq!((rx_queue_index(3), tx_queue_index(3)), (6, 7));
        assert_eq!(ctrl_queue_index(4, true), 8);
        assert_eq!(ctrl_queue_index(4, false), 2);
    }

    #[test]
    fn ctrl_commands_round_trip() {
        let all = [
            CtrlCommand::Promisc(true),
            CtrlCommand::AllMulti(false),
            CtrlCommand::MacAddrSet([2, 0, 0, 0, 0, 1]),
            CtrlCommand::AnnounceAck,
            CtrlCommand::VqPairsSet(2),
            CtrlCommand::GuestOffloadsSet(feature::GUEST_CSUM),
        ];
        for c in all {
            let mut buf = [0u8; 2 + CTRL_DATA_MAX];
            let n = c.encode(&mut buf);
            assert_eq!(CtrlCommand::decode(&buf[..n]), Ok(c));
        }
        let mut buf = [0u8; 2 + CTRL_DATA_MAX];
        assert_eq!(CtrlCommand::VqPairsSet(0x1234).encode(&mut buf), 4);
        assert_eq!(&buf[..4], &[4, 0, 0x34, 0x12]);
        assert_eq!(CtrlCommand::decode(&[4]), Err(CtrlDecodeError::Truncated));
        assert_eq!(
            CtrlCommand::decode(&[4, 0, 1]),
            Err(CtrlDecodeError::BadLength { class: 4, command: 0, want: 2, got: 1 })
        );
        assert_eq!(CtrlCommand::decode(&[9, 9]), Err(CtrlDecodeError::Unknown { class: 9, command: 9 }));
    }

    #[test]
    fn features_by_name() {
        assert_eq!(feature::by_name("mrg_rxbuf"), Some(feature::MRG_RXBUF));
        assert_eq!(feature::by_name("VIRTIO_NET_F_MQ"), Some(feature::MQ));
        assert_eq!(feature::by_name("nope"), None);
    }
}
