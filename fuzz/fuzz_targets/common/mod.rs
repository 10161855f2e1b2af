//! Shared by the fuzz targets: a reader that turns the fuzzer's bytes into decisions.
//!
//! Every read succeeds: past the end of the input it yields zeros, so any byte string is
//! a valid program and short inputs stay meaningful (the seeds are a few dozen bytes).

#![allow(dead_code)]

pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 != 0
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    pub fn u64(&mut self) -> u64 {
        self.u32() as u64 | (self.u32() as u64) << 32
    }

    /// Up to `max` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, max: usize) -> &'a [u8] {
        let n = max.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }

    /// A length that is usually small but sometimes anything: 0..=255, 0..=65535, a full
    /// `u32`, or a multiple of 16 (an indirect table's length).
    pub fn len(&mut self) -> u32 {
        match self.u8() % 4 {
            0 => self.u8() as u32,
            1 => self.u16() as u32,
            2 => self.u32(),
            _ => 16 * (self.u8() as u32 % 33),
        }
    }
}
