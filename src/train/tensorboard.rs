//! TensorBoard event files in the run folder: scalars (losses, accuracies, learning rate, firing
//! rates, inhibitory fractions) per epoch and every N training steps, readable by the
//! `tensorboard` pip package (`tensorboard --logdir runs` shows every run folder as a run).
//!
//! The format, written by hand because it is small: a file of TFRecords, each
//! `u64 length | u32 masked CRC-32C of length | data | u32 masked CRC-32C of data` (little
//! endian; mask: rotate right by 15, add 0xa282ead8), whose data is a protobuf `tensorflow.Event`:
//!   Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
//!   Summary { repeated Value value = 1; }   Value { string tag = 1; float simple_value = 2; }
//! The first record holds `file_version: "brain.Event:2"`. Each process writes its own file
//! (`events.out.tfevents.<seconds>.<host>.<pid>`), as PyTorch's SummaryWriter does; a resumed run
//! writes a new one, and TensorBoard drops the points a killed run logged past its checkpoint
//! (a step that goes back purges the later ones). A record cut short by a kill is the file's
//! last and is skipped by TensorBoard.

use crate::error::{BackeiError, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

fn masked_crc(bytes: &[u8]) -> u32 {
    let c = CRC32C.checksum(bytes);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field (wire type 2).
fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    varint(out, ((field << 3) | 2) as u64);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// An Event's bytes: wall time, step, and either the file version or a summary of scalars.
fn event(wall_time: f64, step: i64, file_version: Option<&str>, scalars: &[(&str, f32)]) -> Vec<u8> {
    let mut e = Vec::new();
    e.push(0x09); // field 1, 64-bit
    e.extend_from_slice(&wall_time.to_le_bytes());
    e.push(0x10); // field 2, varint
    varint(&mut e, step as u64);
    if let Some(v) = file_version {
        bytes_field(&mut e, 3, v.as_bytes());
    }
    if !scalars.is_empty() {
        let mut summary = Vec::new();
        for (tag, value) in scalars {
            let mut v = Vec::new();
            bytes_field(&mut v, 1, tag.as_bytes());
            v.push(0x15); // field 2, 32-bit
            v.extend_from_slice(&value.to_le_bytes());
            bytes_field(&mut summary, 1, &v);
        }
        bytes_field(&mut e, 5, &summary);
    }
    e
}

/// One TFRecord around `data`.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut r = Vec::with_capacity(data.len() + 16);
    r.extend_from_slice(&len);
    r.extend_from_slice(&masked_crc(&len).to_le_bytes());
    r.extend_from_slice(data);
    r.extend_from_slice(&masked_crc(data).to_le_bytes());
    r
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name: String = String::from_utf8_lossy(&buf[..end]).chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
    if ok && !name.is_empty() {
        name
    } else {
        "localhost".into()
    }
}

/// An event file being written.
pub struct EventWriter {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
}

impl EventWriter {
    /// Creates this process's event file in `dir`.
    pub fn create(dir: &Path) -> Result<EventWriter> {
        let secs = now() as u64;
        let path = dir.join(format!("events.out.tfevents.{secs}.{}.{}", hostname(), std::process::id()));
        let file = std::fs::OpenOptions::new().create_new(true).write(true).open(&path).map_err(|e| BackeiError::Io {
            path: path.display().to_string(),
            problem: format!("cannot create the TensorBoard event file: {e}"),
        })?;
        let mut w = EventWriter { path, file: std::io::BufWriter::new(file) };
        w.write(&event(now(), 0, Some("brain.Event:2"), &[]))?;
        w.flush()?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, data: &[u8]) -> Result<()> {
        let r = record(data);
        self.file.write_all(&r).map_err(|e| self.io(e))
    }

    fn io(&self, e: std::io::Error) -> BackeiError {
        BackeiError::Io { path: self.path.display().to_string(), problem: format!("cannot write the TensorBoard event file: {e}") }
    }

    /// Scalars at `step` (one event holding them all).
    pub fn scalars(&mut self, step: u64, values: &[(String, f64)]) -> Result<()> {
        let finite: Vec<(&str, f32)> = values.iter().filter(|(_, v)| v.is_finite()).map(|(t, v)| (t.as_str(), *v as f32)).collect();
        self.write(&event(now(), step as i64, None, &finite))
    }

    /// Pushes what was written to the file (TensorBoard reads it as it grows).
    pub fn flush(&mut self) -> Result<()> {
        self.file.flush().map_err(|e| self.io(e))
    }
}

/// Reads an event file back: (step, tag, value) of every scalar, checking each record's CRCs.
/// The inverse of the writer, for tests and for `backei` tools; a truncated last record ends the
/// file (as TensorBoard reads it).
pub fn read_scalars(path: &Path) -> Result<Vec<(i64, String, f32)>> {
    let bytes = std::fs::read(path).map_err(|e| BackeiError::Io { path: path.display().to_string(), problem: e.to_string() })?;
    let bad = |what: &str| BackeiError::Io { path: path.display().to_string(), problem: format!("not a TensorBoard event file: {what}") };
    let mut out = Vec::new();
    let mut at = 0usize;
    while at + 12 <= bytes.len() {
        let len_bytes = &bytes[at..at + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes")) as usize;
        if u32::from_le_bytes(bytes[at + 8..at + 12].try_into().expect("4 bytes")) != masked_crc(len_bytes) {
            return Err(bad("a record length's CRC does not match"));
        }
        let Some(end) = (at + 12).checked_add(len).filter(|&e| e + 4 <= bytes.len()) else { break };
        let data = &bytes[at + 12..end];
        if u32::from_le_bytes(bytes[end..end + 4].try_into().expect("4 bytes")) != masked_crc(data) {
            return Err(bad("a record's CRC does not match"));
        }
        parse_event(data, &mut out).ok_or_else(|| bad("a record is not an Event"))?;
        at = end + 4;
    }
    Ok(out)
}

fn read_varint(b: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*at)?;
        *at += 1;
        v |= ((byte & 0x7f) as u64) << shift;
        if byte < 0x80 {
            return Some(v);
        }
    }
    None
}

/// Walks the fields of a message: (field number, wire type, payload) for each.
fn fields(b: &[u8]) -> Option<Vec<(u64, u8, &[u8])>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < b.len() {
        let key = read_varint(b, &mut at)?;
        let (field, wire) = (key >> 3, (key & 7) as u8);
        let start = at;
        let end = match wire {
            0 => {
                read_varint(b, &mut at)?;
                at
            }
            1 => start + 8,
            2 => {
                let n = read_varint(b, &mut at)? as usize;
                at.checked_add(n)?
            }
            5 => start + 4,
            _ => return None,
        };
        let payload_start = if wire == 2 { at } else { start };
        out.push((field, wire, b.get(payload_start..end)?));
        at = end;
    }
    Some(out)
}

fn parse_event(b: &[u8], out: &mut Vec<(i64, String, f32)>) -> Option<()> {
    let mut step = 0i64;
    let mut summary: Option<&[u8]> = None;
    for (field, wire, payload) in fields(b)? {
        match (field, wire) {
            (2, 0) => step = read_varint(payload, &mut 0)? as i64,
            (5, 2) => summary = Some(payload),
            _ => {}
        }
    }
    for (field, wire, value) in fields(summary.unwrap_or(&[]))? {
        if (field, wire) != (1, 2) {
            continue;
        }
        let (mut tag, mut x) = (None, None);
        for (f, w, p) in fields(value)? {
            match (f, w) {
                (1, 2) => tag = Some(String::from_utf8_lossy(p).into_owned()),
                (2, 5) => x = Some(f32::from_le_bytes(p.try_into().ok()?)),
                _ => {}
            }
        }
        out.push((step, tag?, x?));
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_is_castagnoli_and_masked_as_tensorflow_does() {
        // CRC-32C check value of "123456789"
        assert_eq!(CRC32C.checksum(b"123456789"), 0xe306_9283);
        // TensorFlow's record of an empty payload starts with 8 zero bytes and their masked CRC
        let r = record(&[]);
        assert_eq!(&r[..8], &[0u8; 8]);
        assert_eq!(u32::from_le_bytes(r[8..12].try_into().unwrap()), masked_crc(&[0u8; 8]));
    }

    #[test]
    fn scalars_read_back_and_a_truncated_last_record_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.scalars(1, &[("epoch/loss/train".into(), 0.25), ("epoch/accuracy/test".into(), 0.9)]).unwrap();
        w.scalars(300, &[("step/loss/train".into(), 1e-3), ("nan is left out".into(), f64::NAN)]).unwrap();
        w.flush().unwrap();
        let path = w.path().to_path_buf();
        assert!(path.file_name().unwrap().to_str().unwrap().starts_with("events.out.tfevents."));
        let got = read_scalars(&path).unwrap();
        assert_eq!(
            got,
            vec![(1, "epoch/loss/train".into(), 0.25), (1, "epoch/accuracy/test".into(), 0.9), (300, "step/loss/train".into(), 1e-3)]
        );
        drop(w);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 3);
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read_scalars(&path).unwrap().len(), 2);
    }
}
