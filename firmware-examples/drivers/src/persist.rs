//! The unit's boot epoch and command counter in flash, safe against power
//! loss at any point, over any `embedded-storage` NOR flash.
//!
//! Two erase sectors take turns. A record is 24 bytes — magic, epoch, command
//! counter, CRC-32 of those, padding — appended to the sector in use; erased
//! flash reads `0xFF`, so the first all-`0xFF` slot is where the next one
//! goes. When a sector is full the other is erased and written; the sector
//! holding the newest good record is never erased before a newer record is
//! written elsewhere. On start the newest good record wins: the highest
//! (epoch, counter) whose CRC holds — a record torn by a power cut fails its
//! CRC and is skipped.
//!
//! [`BootStore::next_boot`] is the one call a unit makes at start: it writes
//! the new epoch *before* returning it, so a boot that dies anywhere after
//! returning, or while writing, never hands out an epoch twice (the SDK's
//! nonces depend on it). Every record raises the epoch by at most one, so a
//! record found damaged (torn, or rotted after it was handed out) may have held
//! at most one epoch more than the good one before it: the new epoch skips one
//! per damaged record, and is still never one handed out before.

use embedded_storage::nor_flash::{NorFlash, NorFlashError, NorFlashErrorKind};

/// Bytes per record.
pub const RECORD: usize = 24;
const MAGIC: [u8; 4] = *b"FLB1";

/// What survives a reboot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Persisted {
    /// The boot epoch last handed out.
    pub epoch: u32,
    /// The highest command counter accepted.
    pub command_counter: u64,
}

/// What went wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PersistError {
    /// The flash failed.
    Flash(NorFlashErrorKind),
    /// The flash's geometry does not fit: its write size must divide a
    /// record, a sector must hold at least two records, and the region two
    /// sectors.
    Geometry,
    /// The epoch cannot grow any more (`u32::MAX` reached).
    EpochExhausted,
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for b in bytes {
        crc ^= u32::from(*b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

fn encode(p: Persisted) -> [u8; RECORD] {
    let mut r = [0xffu8; RECORD];
    r[..4].copy_from_slice(&MAGIC);
    r[4..8].copy_from_slice(&p.epoch.to_le_bytes());
    r[8..16].copy_from_slice(&p.command_counter.to_le_bytes());
    let crc = crc32(&r[..16]);
    r[16..20].copy_from_slice(&crc.to_le_bytes());
    r
}

fn decode(r: &[u8; RECORD]) -> Option<Persisted> {
    if r[..4] != MAGIC || u32::from_le_bytes([r[16], r[17], r[18], r[19]]) != crc32(&r[..16]) {
        return None;
    }
    Some(Persisted {
        epoch: u32::from_le_bytes([r[4], r[5], r[6], r[7]]),
        command_counter: u64::from_le_bytes([r[8], r[9], r[10], r[11], r[12], r[13], r[14], r[15]]),
    })
}

/// Where the newest record is and where the next goes.
#[derive(Clone, Copy, Debug)]
struct Scan {
    newest: Option<(Persisted, u32)>,
    /// First empty slot after the newest record in its sector, if any.
    free: Option<u32>,
    /// Records that failed their check (torn writes, bit rot).
    damaged: u32,
}

/// The store over two sectors of `flash` starting at `base`.
#[derive(Debug)]
pub struct BootStore<F> {
    flash: F,
    base: u32,
    sector: u32,
    /// Records found damaged at the last scan.
    pub damaged: u32,
}

impl<F: NorFlash> BootStore<F> {
    /// Two sectors of `flash` from `base` (a multiple of the erase size).
    pub fn new(flash: F, base: u32) -> Result<Self, PersistError> {
        let sector = F::ERASE_SIZE as u32;
        let fits = RECORD.is_multiple_of(F::WRITE_SIZE)
            && RECORD.is_multiple_of(F::READ_SIZE)
            && F::ERASE_SIZE >= 2 * RECORD
            && base.is_multiple_of(sector)
            && (base as usize).saturating_add(2 * F::ERASE_SIZE) <= flash.capacity();
        if !fits {
            return Err(PersistError::Geometry);
        }
        Ok(Self { flash, base, sector, damaged: 0 })
    }

    /// Gives the flash back.
    pub fn release(self) -> F {
        self.flash
    }

    fn err(e: F::Error) -> PersistError {
        PersistError::Flash(e.kind())
    }

    fn scan(&mut self) -> Result<Scan, PersistError> {
        let per_sector = self.sector / RECORD as u32;
        let mut s = Scan { newest: None, free: None, damaged: 0 };
        for sec in 0..2 {
            let start = self.base + sec * self.sector;
            for i in 0..per_sector {
                let at = start + i * RECORD as u32;
                let mut r = [0u8; RECORD];
                self.flash.read(at, &mut r).map_err(Self::err)?;
                if r.iter().all(|b| *b == 0xff) {
                    continue;
                }
                match decode(&r) {
                    Some(p) if s.newest.is_none_or(|(n, _)| p > n) => s.newest = Some((p, at)),
                    Some(_) => {}
                    None => s.damaged += 1,
                }
            }
        }
        if let Some((_, at)) = s.newest {
            let sec_start = self.base + (at - self.base) / self.sector * self.sector;
            let mut next = at + RECORD as u32;
            while next + RECORD as u32 <= sec_start + self.sector {
                let mut r = [0u8; RECORD];
                self.flash.read(next, &mut r).map_err(Self::err)?;
                if r.iter().all(|b| *b == 0xff) {
                    s.free = Some(next);
                    break;
                }
                next += RECORD as u32;
            }
        }
        Ok(s)
    }

    /// The newest good record (none on a blank or wholly damaged region).
    pub fn load(&mut self) -> Result<Option<Persisted>, PersistError> {
        let s = self.scan()?;
        self.damaged = s.damaged;
        Ok(s.newest.map(|(p, _)| p))
    }

    /// Writes `p` after the newest record, or into the other sector (erased
    /// first) when its sector is full.
    pub fn save(&mut self, p: Persisted) -> Result<(), PersistError> {
        let s = self.scan()?;
        self.damaged = s.damaged;
        let at = match (s.newest, s.free) {
            (Some(_), Some(free)) => free,
            (Some((_, at)), None) => {
                let other = if at - self.base < self.sector { self.base + self.sector } else { self.base };
                self.flash.erase(other, other + self.sector).map_err(Self::err)?;
                other
            }
            (None, _) => {
                // Nothing readable: start afresh in sector 0.
                self.flash.erase(self.base, self.base + 2 * self.sector).map_err(Self::err)?;
                self.base
            }
        };
        self.flash.write(at, &encode(p)).map_err(Self::err)
    }

    /// The epoch for this boot: one more than any handed out before, written
    /// before it is returned, with the command counter kept.
    pub fn next_boot(&mut self) -> Result<Persisted, PersistError> {
        let last = self.load()?.unwrap_or_default();
        let next = Persisted {
            epoch: last.epoch.checked_add(1 + self.damaged).ok_or(PersistError::EpochExhausted)?,
            command_counter: last.command_counter,
        };
        self.save(next)?;
        Ok(next)
    }

    /// Records a command counter accepted in this boot.
    pub fn accept_command(&mut self, epoch: u32, counter: u64) -> Result<(), PersistError> {
        self.save(Persisted { epoch, command_counter: counter })
    }
}
