//! Just enough ZIP to read the archives `torch.save` writes (PyTorch ≥ 1.6).
//!
//! torch.save stores every entry uncompressed (method 0) and aligns each entry's data to
//! 64 bytes with padding in the local header's extra field, so a tensor's bytes can be
//! used straight out of the memory map. The local headers carry zero sizes (the sizes
//! follow the data, flag bit 3), so the central directory is the only trustworthy index;
//! the local header is read only for the length of its name and extra field. Real 13B
//! shards are ~10 GB, past ZIP's 4 GiB limits, so the zip64 records are read too.
//!
//! Every number read from the file is checked against the file's length before use.
//! CRCs are not verified: that would mean reading all 26 GB at open time.

use crate::error::{bail, Result};
use std::ops::Range;
use std::path::Path;

/// One stored entry: its name and where its bytes lie in the archive.
#[derive(Debug, Clone)]
pub(crate) struct ZipEntry {
    pub name: String,
    pub data: Range<usize>,
}

const EOCD_SIG: u32 = 0x0605_4b50;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const LOCAL_SIG: u32 = 0x0403_4b50;
const EOCD_LEN: usize = 22;
const CENTRAL_LEN: usize = 46;
const LOCAL_LEN: usize = 30;

/// Little-endian reads that fail (instead of panicking) past the end of the buffer.
fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at.checked_add(2)?)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at.checked_add(4)?)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at.checked_add(8)?)?.try_into().ok()?))
}

/// Lists the entries of the archive in `bytes` (the whole file); `file` names it in errors.
pub(crate) fn read_entries(bytes: &[u8], file: &Path) -> Result<Vec<ZipEntry>> {
    let f = file.display();
    let damaged = |what: &str| -> crate::error::Error {
        crate::error::Error::new(format!("{f} is a damaged zip archive ({what}); download the file again"))
    };

    // The end-of-central-directory record is the last 22 bytes, unless a comment (≤ 64 KiB)
    // follows it: search backwards.
    if bytes.len() < EOCD_LEN {
        bail!("{f} is too short ({} bytes) to be a PyTorch checkpoint; download it again", bytes.len());
    }
    let lowest = bytes.len().saturating_sub(EOCD_LEN + u16::MAX as usize);
    let eocd =
        (lowest..=bytes.len() - EOCD_LEN).rev().find(|&at| u32_at(bytes, at) == Some(EOCD_SIG)).ok_or_else(|| {
            crate::error::Error::new(format!(
                "{f} is not a zip archive (no end-of-central-directory record): either it is truncated \
                 (download it again) or it is a pre-1.6 legacy torch.save file, which vicuna does not read \
                 (re-save it with a recent torch.save or convert it to safetensors)"
            ))
        })?;

    let disk = u16_at(bytes, eocd + 4).unwrap_or(0);
    let cd_disk = u16_at(bytes, eocd + 6).unwrap_or(0);
    let mut entry_count = u64::from(u16_at(bytes, eocd + 10).unwrap_or(0));
    let mut cd_size = u64::from(u32_at(bytes, eocd + 12).unwrap_or(0));
    let mut cd_offset = u64::from(u32_at(bytes, eocd + 16).unwrap_or(0));
    if disk != 0 || cd_disk != 0 {
        bail!("{f} is a multi-part (spanned) zip archive; vicuna reads single-file PyTorch checkpoints");
    }

    // zip64: a locator right before the EOCD points at the zip64 EOCD, whose 64-bit
    // fields replace the saturated 16/32-bit ones.
    if eocd >= 20 && u32_at(bytes, eocd - 20) == Some(ZIP64_LOCATOR_SIG) {
        let at = u64_at(bytes, eocd - 20 + 8).ok_or_else(|| damaged("zip64 locator cut short"))?;
        let at = usize::try_from(at).map_err(|_| damaged("zip64 record offset out of range"))?;
        if u32_at(bytes, at) != Some(ZIP64_EOCD_SIG) {
            return Err(damaged("zip64 end-of-central-directory record not where the locator says"));
        }
        entry_count = u64_at(bytes, at + 32).ok_or_else(|| damaged("zip64 record cut short"))?;
        cd_size = u64_at(bytes, at + 40).ok_or_else(|| damaged("zip64 record cut short"))?;
        cd_offset = u64_at(bytes, at + 48).ok_or_else(|| damaged("zip64 record cut short"))?;
    }

    let cd_start = usize::try_from(cd_offset).map_err(|_| damaged("central directory offset out of range"))?;
    let cd_end = usize::try_from(cd_size)
        .ok()
        .and_then(|size| cd_start.checked_add(size))
        .filter(|&end| end <= bytes.len())
        .ok_or_else(|| damaged("central directory runs past the end of the file; it is truncated"))?;
    let cd = &bytes[cd_start..cd_end];
    // Each central record is at least 46 bytes: a count the directory cannot hold is a lie.
    if entry_count > (cd.len() / CENTRAL_LEN) as u64 {
        return Err(damaged("entry count larger than the central directory can hold"));
    }

    let mut entries = Vec::new();
    let mut at = 0usize;
    for _ in 0..entry_count {
        if u32_at(cd, at) != Some(CENTRAL_SIG) {
            return Err(damaged("bad central directory record"));
        }
        let field = |off: usize| u16_at(cd, at + off).ok_or_else(|| damaged("central directory record cut short"));
        let field32 = |off: usize| u32_at(cd, at + off).ok_or_else(|| damaged("central directory record cut short"));
        let flags = field(8)?;
        let method = field(10)?;
        let mut compressed = u64::from(field32(20)?);
        let mut size = u64::from(field32(24)?);
        let name_len = usize::from(field(28)?);
        let extra_len = usize::from(field(30)?);
        let comment_len = usize::from(field(32)?);
        let mut local_offset = u64::from(field32(42)?);

        let name_start = at + CENTRAL_LEN;
        let extra_start = name_start + name_len;
        let next = extra_start + extra_len + comment_len;
        if next > cd.len() {
            return Err(damaged("central directory record cut short"));
        }
        let name = String::from_utf8_lossy(&cd[name_start..extra_start]).into_owned();
        let extra = &cd[extra_start..extra_start + extra_len];

        // zip64 extended information (header id 1): holds, in this order, exactly those of
        // size / compressed size / local offset whose 32-bit field is 0xFFFFFFFF.
        if compressed == 0xFFFF_FFFF || size == 0xFFFF_FFFF || local_offset == 0xFFFF_FFFF {
            let zip64 =
                find_extra(extra, 0x0001).ok_or_else(|| damaged(&format!("entry {name} lacks its zip64 sizes")))?;
            let mut cursor = 0usize;
            let mut take = || {
                let v = u64_at(zip64, cursor);
                cursor += 8;
                v.ok_or_else(|| damaged(&format!("entry {name} has a short zip64 field")))
            };
            if size == 0xFFFF_FFFF {
                size = take()?;
            }
            if compressed == 0xFFFF_FFFF {
                compressed = take()?;
            }
            if local_offset == 0xFFFF_FFFF {
                local_offset = take()?;
            }
        }

        if flags & 1 != 0 {
            bail!("{f}: zip entry {name} is encrypted; vicuna reads only plain torch.save archives");
        }
        if method != 0 {
            bail!(
                "{f}: zip entry {name} is compressed (method {method}); torch.save stores entries \
                 uncompressed and vicuna reads only those: re-save the weights with torch.save \
                 (do not re-zip the .bin) or convert them to safetensors"
            );
        }
        if compressed != size {
            return Err(damaged(&format!("stored entry {name} has different compressed and plain sizes")));
        }

        // The local header: only its name and extra lengths matter (its sizes are zero).
        let local = usize::try_from(local_offset).map_err(|_| damaged("entry offset out of range"))?;
        if u32_at(bytes, local) != Some(LOCAL_SIG) {
            return Err(damaged(&format!("entry {name} has no local header where the directory says")));
        }
        let local_name = usize::from(u16_at(bytes, local + 26).ok_or_else(|| damaged("local header cut short"))?);
        let local_extra = usize::from(u16_at(bytes, local + 28).ok_or_else(|| damaged("local header cut short"))?);
        let start = local + LOCAL_LEN + local_name + local_extra;
        let end = usize::try_from(size)
            .ok()
            .and_then(|s| start.checked_add(s))
            .filter(|&end| end <= bytes.len())
            .ok_or_else(|| damaged(&format!("entry {name} runs past the end of the file; it is truncated")))?;
        entries.push(ZipEntry { name, data: start..end });
        at = next;
    }
    Ok(entries)
}

/// The payload of the extra-field block with header id `id`, if any.
fn find_extra(extra: &[u8], id: u16) -> Option<&[u8]> {
    let mut at = 0usize;
    while at + 4 <= extra.len() {
        let header = u16_at(extra, at)?;
        let len = usize::from(u16_at(extra, at + 2)?);
        let body = extra.get(at + 4..at + 4 + len)?;
        if header == id {
            return Some(body);
        }
        at += 4 + len;
    }
    None
}
