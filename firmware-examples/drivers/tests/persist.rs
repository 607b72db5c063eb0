//! The boot store against a NOR flash that loses power mid-write or mid-erase
//! and rots bits: an epoch is never handed out twice.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is the failure report.

use std::cell::RefCell;
use std::rc::Rc;

use embedded_storage::nor_flash::{ErrorType, NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash};
use fleetline_unit_drivers::persist::{BootStore, PersistError, Persisted};

const SECTOR: usize = 128;

/// NOR flash in memory: writes only clear bits, erases set a sector to 0xFF.
/// After `budget` bytes written or erased the power goes: the operation stops
/// where it is and everything after fails.
#[derive(Clone)]
struct Flash {
    bytes: Rc<RefCell<Vec<u8>>>,
    budget: Rc<RefCell<Option<usize>>>,
}

#[derive(Debug)]
struct PowerLost;

impl NorFlashError for PowerLost {
    fn kind(&self) -> NorFlashErrorKind {
        NorFlashErrorKind::Other
    }
}

impl ErrorType for Flash {
    type Error = PowerLost;
}

impl Flash {
    fn new(size: usize) -> Self {
        Self { bytes: Rc::new(RefCell::new(vec![0xff; size])), budget: Rc::new(RefCell::new(None)) }
    }

    fn spend(&self) -> bool {
        let mut b = self.budget.borrow_mut();
        match b.as_mut() {
            None => true,
            Some(0) => false,
            Some(n) => {
                *n -= 1;
                true
            }
        }
    }
}

impl ReadNorFlash for Flash {
    const READ_SIZE: usize = 1;
    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), PowerLost> {
        if self.budget.borrow().is_some_and(|b| b == 0) {
            return Err(PowerLost);
        }
        let o = offset as usize;
        bytes.copy_from_slice(&self.bytes.borrow()[o..o + bytes.len()]);
        Ok(())
    }
    fn capacity(&self) -> usize {
        self.bytes.borrow().len()
    }
}

impl NorFlash for Flash {
    const WRITE_SIZE: usize = 4;
    const ERASE_SIZE: usize = SECTOR;
    fn erase(&mut self, from: u32, to: u32) -> Result<(), PowerLost> {
        for i in from as usize..to as usize {
            if !self.spend() {
                return Err(PowerLost);
            }
            self.bytes.borrow_mut()[i] = 0xff;
        }
        Ok(())
    }
    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), PowerLost> {
        for (i, b) in bytes.iter().enumerate() {
            if !self.spend() {
                return Err(PowerLost);
            }
            self.bytes.borrow_mut()[offset as usize + i] &= b;
        }
        Ok(())
    }
}

#[test]
fn epochs_rise_across_boots_and_sector_switches() {
    let flash = Flash::new(1024);
    let mut store = BootStore::new(flash.clone(), 256).unwrap();
    assert_eq!(store.load().unwrap(), None, "blank flash");
    let mut last = 0;
    for boot in 0..40u64 {
        let p = store.next_boot().unwrap();
        assert!(p.epoch > last);
        last = p.epoch;
        store.accept_command(p.epoch, boot * 3).unwrap();
        // A fresh store over the same flash (a reboot) sees the same.
        let mut again = BootStore::new(flash.clone(), 256).unwrap();
        assert_eq!(again.load().unwrap(), Some(Persisted { epoch: p.epoch, command_counter: boot * 3 }));
    }
    assert_eq!(last, 40, "no epoch skipped without damage");
    assert!(flash.bytes.borrow()[..256].iter().all(|b| *b == 0xff), "nothing outside its region");
}

#[test]
fn a_power_cut_at_any_byte_never_hands_out_an_epoch_twice() {
    // Each run: some boots and commands, the power cut after `cut` bytes
    // written or erased, then boots with the power back.
    for cut in 0..600 {
        let flash = Flash::new(1024);
        let mut handed = Vec::new();
        let mut store = BootStore::new(flash.clone(), 0).unwrap();
        *flash.budget.borrow_mut() = Some(cut);
        for boot in 0..12u64 {
            match store.next_boot() {
                Ok(p) => {
                    handed.push(p.epoch);
                    let _ = store.accept_command(p.epoch, boot);
                }
                Err(PersistError::Flash(_)) => break,
                Err(e) => panic!("{e:?}"),
            }
        }
        *flash.budget.borrow_mut() = None;
        let mut store = BootStore::new(flash.clone(), 0).unwrap();
        for _ in 0..3 {
            let p = store.next_boot().unwrap();
            assert!(handed.iter().all(|e| p.epoch > *e), "cut at {cut}: epoch {} after {handed:?}", p.epoch);
            handed.push(p.epoch);
        }
    }
}

#[test]
fn a_rotted_newest_record_still_gives_a_new_epoch() {
    let flash = Flash::new(512);
    let mut store = BootStore::new(flash.clone(), 0).unwrap();
    for _ in 0..5 {
        store.next_boot().unwrap();
    }
    // The newest record (epoch 5, the fifth slot) loses a bit.
    flash.bytes.borrow_mut()[4 * 24 + 5] ^= 0x10;
    let mut store = BootStore::new(flash.clone(), 0).unwrap();
    assert_eq!(store.load().unwrap().unwrap().epoch, 4);
    assert_eq!(store.damaged, 1);
    let p = store.next_boot().unwrap();
    assert!(p.epoch > 5, "epoch 5 was handed out before its record rotted: got {}", p.epoch);
}

#[test]
fn geometry_that_does_not_fit_is_refused() {
    assert_eq!(BootStore::new(Flash::new(1024), 100).err(), Some(PersistError::Geometry), "not sector-aligned");
    assert_eq!(
        BootStore::new(Flash::new(1024), 1024 - SECTOR as u32).err(),
        Some(PersistError::Geometry),
        "one sector"
    );
    assert!(BootStore::new(Flash::new(1024), 0).is_ok());
}
