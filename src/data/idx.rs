//! IDX reader (MNIST, Fashion-MNIST): raw or `.gz`, standard file names.

use super::{maybe_gunzip, read_file, DataError, Dataset, DatasetKind, Split};
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
    let body = (bytes.len() - header) as u64;
    if body != total {
        let (field, found) = if body < total {
            ("data", format!("{body} bytes (truncated body)"))
        } else {
            ("data", format!("{body} bytes ({} trailing bytes)", body - total))
        };
        return Err(DataError::format(
            path,
            header as u64 + body.min(total),
            field,
            format!("{total} bytes for dimensions {dims:?}"),
            found,
        ));
    }
    Ok(IdxArray { dims, data: bytes[header..].to_vec() })
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

/// Finds `<base>.gz`, `<base>`, or the dotted variant (`train-images.idx3-ubyte`) in `dir`.
/// Returns the path to report if none exists (`<base>.gz`).
pub fn find_file(dir: &Path, base: &str) -> (PathBuf, bool) {
    let dotted = base.replacen("-idx", ".idx", 1);
    for name in [format!("{base}.gz"), base.to_string(), format!("{dotted}.gz"), dotted] {
        let p = dir.join(&name);
        if p.is_file() {
            return (p, true);
        }
    }
    (dir.join(format!("{base}[.gz]")), false)
}

/// Reads, decompresses if needed, and parses an IDX file.
pub fn read_idx(path: &Path, ndims: usize) -> Result<IdxArray, DataError> {
    let what = if ndims == 3 { "an IDX image file (idx3-ubyte, raw or .gz)" } else { "an IDX label file (idx1-ubyte, raw or .gz)" };
    let bytes = maybe_gunzip(path, read_file(path, what)?)?;
    parse_idx(&bytes, path, ndims)
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
