//! IDX reader (MNIST, Fashion-MNIST): raw or `.gz`, standard file names.

use super::{maybe_gunzip, open_file, DataError, Dataset, DatasetKind, Split, MAX_GUNZIP};
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};

/// A parsed IDX file of unsigned bytes (type code 0x08).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Parses an (already decompressed) IDX file of u8 with `ndims` dimensions. `path` is used
/// in error messages only. Never panics.
pub fn parse_idx(bytes: &[u8], path: &Path, ndims: usize) -> Result<IdxArray, DataError> {
    let (dims, total) = parse_header(bytes, path, ndims)?;
    let header = 4 + 4 * ndims;
    check_body_size(path, header, (bytes.len() - header) as u64, total, &dims)?;
    Ok(IdxArray { dims, data: bytes[header..].to_vec() })
}

/// Parses the magic number and the dimensions at the start of `bytes` (which may hold more).
/// Returns the dimensions and the body size they call for (saturating: a product past u64 is
/// u64::MAX, which no file matches).
fn parse_header(bytes: &[u8], path: &Path, ndims: usize) -> Result<(Vec<usize>, u64), DataError> {
    let what = if ndims == 3 { "images (idx3)" } else { "labels (idx1)" };
    if bytes.len() < 4 {
        return Err(DataError::format(
            path,
            0,
            "magic number",
            format!("4 bytes of IDX magic for {what}"),
            format!("a file of {} bytes (truncated header)", bytes.len()),
        ));
    }
    let magic = &bytes[..4];
    let want = [0u8, 0, 0x08, ndims as u8];
    if magic != want {
        return Err(DataError::format(
            path,
            0,
            "magic number",
            format!("0x{:08X} (IDX {what}, unsigned bytes)", u32::from_be_bytes(want)),
            format!("0x{:08X}", u32::from_be_bytes([magic[0], magic[1], magic[2], magic[3]])),
        ));
    }
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err(DataError::format(
            path,
            bytes.len() as u64,
            "header (dimension sizes)",
            format!("a {header}-byte header"),
            format!("end of file after {} bytes (truncated header)", bytes.len()),
        ));
    }
    let mut dims = Vec::with_capacity(ndims);
    let mut total: u64 = 1;
    for d in 0..ndims {
        let o = 4 + 4 * d;
        let v = u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as u64;
        dims.push(v as usize);
        total = total.saturating_mul(v);
    }
    Ok((dims, total))
}

/// The error for a body of `body` bytes where the header's dimensions call for `total`.
fn check_body_size(path: &Path, header: usize, body: u64, total: u64, dims: &[usize]) -> Result<(), DataError> {
    if body == total {
        return Ok(());
    }
    let found =
        if body < total { format!("{body} bytes (truncated body)") } else { format!("{body} bytes ({} trailing bytes)", body - total) };
    Err(DataError::format(path, header as u64 + body.min(total), "data", format!("{total} bytes for dimensions {dims:?}"), found))
}

/// Checks an image/label IDX pair: 28×28 images, equal counts, labels < 10.
/// Returns (pixels, labels).
pub fn check_pair(
    images: IdxArray,
    images_path: &Path,
    labels: IdxArray,
    labels_path: &Path,
    hw: (usize, usize),
) -> Result<(Vec<u8>, Vec<u8>), DataError> {
    if images.dims[1] != hw.0 || images.dims[2] != hw.1 {
        return Err(DataError::format(
            images_path,
            8,
            "dimensions (rows, columns)",
            format!("{}×{}", hw.0, hw.1),
            format!("{}×{}", images.dims[1], images.dims[2]),
        ));
    }
    if images.dims[0] != labels.dims[0] {
        return Err(DataError::Mismatch {
            path: labels_path.to_path_buf(),
            other: images_path.to_path_buf(),
            field: "number of items (offset 4)".into(),
            expected: format!("{} images", images.dims[0]),
            found: format!("{} labels", labels.dims[0]),
        });
    }
    if let Some(i) = labels.data.iter().position(|&l| l >= 10) {
        return Err(DataError::format(
            labels_path,
            8 + i as u64,
            format!("label of item {i}"),
            "a class in 0..=9",
            labels.data[i].to_string(),
        ));
    }
    Ok((images.data, labels.data))
}

/// Standard base names of the IDX files of a split.
pub fn base_names(split: Split) -> (&'static str, &'static str) {
    match split {
        Split::Train => ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        Split::Test => ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }
}

/// Finds `<base>.gz`, `<base>`, or the dotted variant (`train-images.idx3-ubyte`) in `dir`:
/// the first name that exists, as a file or as anything else (a directory, a FIFO, a broken
/// link: reading it then says what it is). Returns the path to report if none exists
/// (`<base>[.gz]`).
pub fn find_file(dir: &Path, base: &str) -> (PathBuf, bool) {
    let dotted = base.replacen("-idx", ".idx", 1);
    for name in [format!("{base}.gz"), base.to_string(), format!("{dotted}.gz"), dotted] {
        let p = dir.join(&name);
        if p.symlink_metadata().is_ok() {
            return (p, true);
        }
    }
    (dir.join(format!("{base}[.gz]")), false)
}

/// Reads, decompresses if needed, and parses an IDX file, reading no more than its header calls
/// for: the header first, then the size the dimensions give is checked (against the file's size
/// for a raw file, before the body is read; for a `.gz`, by reading at most one byte past it),
/// so an oversized or mislabelled file costs no memory.
pub fn read_idx(path: &Path, ndims: usize) -> Result<IdxArray, DataError> {
    let what = if ndims == 3 { "an IDX image file (idx3-ubyte, raw or .gz)" } else { "an IDX label file (idx1-ubyte, raw or .gz)" };
    let io = |e: std::io::Error| DataError::io(path, what, e);
    let file = open_file(path, what)?;
    let file_size = file.metadata().map_err(io)?.len();
    let mut buffered = std::io::BufReader::new(file);
    let is_gz = buffered.fill_buf().map_err(io)?.starts_with(&[0x1f, 0x8b]) || path.extension().is_some_and(|e| e == "gz");
    let gz_err = |e: std::io::Error, after: usize| DataError::Gzip {
        path: path.to_path_buf(),
        detail: format!("{e} after {after} decompressed bytes"),
    };
    let mut reader: Box<dyn Read> = if is_gz { Box::new(flate2::bufread::MultiGzDecoder::new(buffered)) } else { Box::new(buffered) };
    let header_len = 4 + 4 * ndims;
    let mut header = Vec::with_capacity(header_len);
    reader.by_ref().take(header_len as u64).read_to_end(&mut header).map_err(|e| if is_gz { gz_err(e, header.len()) } else { io(e) })?;
    let (dims, total) = parse_header(&header, path, ndims)?;
    if !is_gz {
        // the file's size settles it before a byte of the body is read
        check_body_size(path, header_len, file_size.saturating_sub(header_len as u64), total, &dims)?;
    } else if total > MAX_GUNZIP {
        return Err(DataError::format(
            path,
            4,
            "dimensions",
            format!("at most {MAX_GUNZIP} bytes of data in one .gz file"),
            format!("{dims:?} = {total} bytes"),
        ));
    }
    if !is_gz {
        crate::memory::ensure_host(
            total as u128,
            &format!("{} ({dims:?})", path.display()),
            "use a smaller file or a machine with more memory",
        )
        .map_err(|m| DataError::format(path, 4, "dimensions", "data that fits in memory", m))?;
    }
    // grown as read: a .gz whose header claims more than it holds reserves no more than it gives
    let mut data = Vec::with_capacity(if is_gz { total.min(1 << 26) } else { total } as usize);
    reader.take(total + 1).read_to_end(&mut data).map_err(|e| if is_gz { gz_err(e, header_len + data.len()) } else { io(e) })?;
    check_body_size(path, header_len, data.len() as u64, total, &dims)?;
    Ok(IdxArray { dims, data })
}

/// Loads a split of MNIST or Fashion-MNIST from `dir`.
pub fn load_dir(kind: DatasetKind, dir: &Path, split: Split) -> Result<Dataset, DataError> {
    let (ib, lb) = base_names(split);
    let (ip, _) = find_file(dir, ib);
    let (lp, _) = find_file(dir, lb);
    let images = read_idx(&ip, 3)?;
    let labels = read_idx(&lp, 1)?;
    let (px, lab) = check_pair(images, &ip, labels, &lp, (28, 28))?;
    Ok(Dataset::from_raw(kind, split, [1, 28, 28], 1, px, lab, vec![ip, lp]))
}

/// Parses an image/label pair from in-memory (possibly gzipped) bytes; `names` are used in
/// error messages.
pub fn load_bytes(kind: DatasetKind, split: Split, images: &[u8], labels: &[u8], names: (&Path, &Path)) -> Result<Dataset, DataError> {
    let ib = maybe_gunzip(names.0, images.to_vec())?;
    let lb = maybe_gunzip(names.1, labels.to_vec())?;
    let i = parse_idx(&ib, names.0, 3)?;
    let l = parse_idx(&lb, names.1, 1)?;
    let (px, lab) = check_pair(i, names.0, l, names.1, (28, 28))?;
    Ok(Dataset::from_raw(kind, split, [1, 28, 28], 1, px, lab, vec![]))
}
