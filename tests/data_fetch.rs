//! `data fetch` against a local HTTP server on 127.0.0.1 serving fixture files: a good file,
//! a wrong checksum, a connection cut mid-file (then resumed), a 404, mirror fallback, and
//! the checksum of gzip content; plus tar.gz unpacking.

mod data_fixtures;
use backei::data::fetch::{self, Checksum, ChecksumOf, RemoteFile, Unpack};
use backei::data::DataError;
use data_fixtures::gz;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

fn body() -> Vec<u8> {
    (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect()
}

struct Server {
    base: String,
    log: Arc<Mutex<Vec<String>>>,
}

fn respond(mut s: TcpStream, status: &str, headers: &[String], body: &[u8]) {
    let mut h = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for x in headers {
        h.push_str(x);
        h.push_str("\r\n");
    }
    h.push_str("\r\n");
    let _ = s.write_all(h.as_bytes());
    let _ = s.write_all(body);
    let _ = s.flush();
}

fn handle(s: TcpStream, log: &Mutex<Vec<String>>) {
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range: Option<usize> = None;
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).unwrap_or(0) == 0 || l == "\r\n" {
            break;
        }
        let low = l.to_ascii_lowercase();
        if let Some(v) = low.strip_prefix("range: bytes=") {
            range = v.trim().trim_end_matches('-').parse().ok();
        }
    }
    log.lock().unwrap().push(format!("{path} range={range:?}"));
    let data = if path.ends_with(".gz") { gz(&body()) } else { body() };
    let n = data.len();
    if path.starts_with("/missing/") {
        return respond(s, "404 Not Found", &["Content-Length: 9".into()], b"not found");
    }
    if let Some(start) = range {
        let rest = &data[start..];
        return respond(
            s,
            "206 Partial Content",
            &[format!("Content-Length: {}", rest.len()), format!("Content-Range: bytes {start}-{}/{n}", n - 1)],
            rest,
        );
    }
    if path.starts_with("/cut/") {
        // Announce the whole file, send 40 %, then cut the connection.
        let mut s2 = s;
        let h = format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n");
        let _ = s2.write_all(h.as_bytes());
        let _ = s2.write_all(&data[..n * 2 / 5]);
        let _ = s2.flush();
        let _ = s2.shutdown(std::net::Shutdown::Both);
        return;
    }
    respond(s, "200 OK", &[format!("Content-Length: {n}")], &data);
}

fn server() -> Server {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", l.local_addr().unwrap());
    let log = Arc::new(Mutex::new(Vec::new()));
    let lg = log.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let lg = lg.clone();
            std::thread::spawn(move || handle(s, &lg));
        }
    });
    Server { base, log }
}

fn file(name: &str, urls: Vec<String>, sha: Option<String>) -> RemoteFile {
    RemoteFile { name: name.into(), urls, checksum: sha.map(|h| Checksum { of: ChecksumOf::File, sha256: h }), unpack: Unpack::None }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn good_file_verified() {
    let s = server();
    let d = tempfile::tempdir().unwrap();
    let sha = fetch::sha256_bytes(&body());
    let f = file("good.bin", vec![format!("{}/ok/good.bin", s.base)], Some(sha.clone()));
    let r = fetch::fetch_file(&f, d.path(), false).unwrap();
    assert!(r.verified && !r.already_present);
    assert_eq!(r.sha256, sha);
    assert_eq!(std::fs::read(d.path().join("good.bin")).unwrap(), body());
    assert_eq!(names(d.path()), vec!["good.bin"]);
    // Second run: already there, verified, no request.
    let before = s.log.lock().unwrap().len();
    let r = fetch::fetch_file(&f, d.path(), false).unwrap();
    assert!(r.already_present && r.verified);
    assert_eq!(s.log.lock().unwrap().len(), before);
}

#[test]
fn no_checksum_reports_computed_sha_unverified() {
    let s = server();
    let d = tempfile::tempdir().unwrap();
    let f = file("x.bin", vec![format!("{}/ok/x.bin", s.base)], None);
    let r = fetch::fetch_file(&f, d.path(), false).unwrap();
    assert!(!r.verified);
    assert_eq!(r.sha256, fetch::sha256_bytes(&body()));
}

#[test]
fn wrong_checksum_leaves_nothing() {
    let s = server();
    let d = tempfile::tempdir().unwrap();
    let bad = "00".repeat(32);
    let f = file("good.bin", vec![format!("{}/ok/good.bin", s.base)], Some(bad.clone()));
    let e = fetch::fetch_file(&f, d.path(), false).unwrap_err();
    assert!(matches!(e, DataError::Checksum { .. }), "{e}");
    let m = e.to_string();
    assert!(m.contains("good.bin") && m.contains(&bad) && m.contains(&fetch::sha256_bytes(&body())), "{m}");
    assert!(names(d.path()).is_empty(), "{:?}", names(d.path()));
}

#[test]
fn cut_connection_keeps_part_and_resumes() {
    let s = server();
    let d = tempfile::tempdir().unwrap();
    let sha = fetch::sha256_bytes(&body());
    let f = file("big.bin", vec![format!("{}/cut/big.bin", s.base)], Some(sha.clone()));
    let e = fetch::fetch_file(&f, d.path(), false).unwrap_err();
    let m = e.to_string();
    assert!(m.contains("resume"), "{m}");
    // No file under the final name; the partial file holds what arrived.
    assert!(!d.path().join("big.bin").exists());
    let part = std::fs::read(d.path().join("big.bin.part")).unwrap();
    assert_eq!(part.len(), 40_000);
    assert_eq!(&part[..], &body()[..40_000]);
    // Rerun: resumes with a Range request and verifies.
    let r = fetch::fetch_file(&f, d.path(), false).unwrap();
    assert!(r.verified);
    assert_eq!(std::fs::read(d.path().join("big.bin")).unwrap(), body());
    assert_eq!(names(d.path()), vec!["big.bin"]);
    let log = s.log.lock().unwrap();
    assert_eq!(log.last().unwrap(), "/cut/big.bin range=Some(40000)");
}

#[test]
fn not_found_404() {
    let s = server();
    let d = tempfile::tempdir().unwrap();
    let f = file("gone.bin", vec![format!("{}/missing/gone.bin", s.base)], None);
    let m = fetch::fetch_file(&f, d.path(), false).unwrap_err().to_string();
    assert!(m.contains("404") && m.contains("/missing/gone.bin"), "{m}");
    assert!(names(d.path()).is_empty());
}

#[test]
fn mirror_fallback_after_404() {
    let s = server();
    let d = tempfile::tempdir().unwrap();
    let f = file("m.bin", vec![format!("{}/missing/m.bin", s.base), format!("{}/ok/m.bin", s.base)], Some(fetch::sha256_bytes(&body())));
    assert!(fetch::fetch_file(&f, d.path(), false).unwrap().verified);
}

#[test]
fn checksum_of_gzip_content() {
    let s = server();
    let d = tempfile::tempdir().unwrap();
    let f = RemoteFile {
        name: "a.gz".into(),
        urls: vec![format!("{}/ok/a.gz", s.base)],
        checksum: Some(Checksum { of: ChecksumOf::Gunzipped, sha256: fetch::sha256_bytes(&body()) }),
        unpack: Unpack::None,
    };
    assert!(fetch::fetch_file(&f, d.path(), false).unwrap().verified);
}

#[test]
fn remote_file_table() {
    use backei::data::DatasetKind;
    let f = fetch::remote_files(DatasetKind::FashionMnist);
    assert_eq!(f.len(), 4);
    assert!(f.iter().all(|x| x.checksum.as_ref().is_some_and(|c| c.sha256.len() == 64)));
    let m = fetch::remote_files(DatasetKind::Mnist);
    assert!(m.iter().all(|x| x.urls.len() >= 2 && x.checksum.as_ref().is_some_and(|c| c.sha256.len() == 64)));
    assert!(fetch::remote_files(DatasetKind::Cifar10)[0].checksum.as_ref().is_some_and(|c| c.sha256.len() == 64));
    assert_eq!(fetch::remote_files(DatasetKind::Cifar10)[0].unpack, Unpack::TarGz);
}

/// The Fashion-MNIST checksums in the code match the installed Debian files' content.
#[test]
fn fashion_checksums_match_debian_files() {
    let dir = Path::new("/usr/share/datasets/fashion-mnist");
    assert!(dir.is_dir(), "apt-get install dataset-fashion-mnist");
    for f in fetch::remote_files(backei::data::DatasetKind::FashionMnist) {
        let d = tempfile::tempdir().unwrap();
        std::fs::copy(dir.join(&f.name), d.path().join(&f.name)).unwrap();
        // Present and matching: no download attempted (the URLs are unreachable here).
        let r = fetch::fetch_file(&f, d.path(), false).unwrap();
        assert!(r.already_present && r.verified, "{}", f.name);
    }
}

fn tar_entry(name: &str, data: &[u8]) -> Vec<u8> {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..107].copy_from_slice(b"0000644");
    h[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
    h[156] = b'0';
    h[257..262].copy_from_slice(b"ustar");
    let mut v = h.to_vec();
    v.extend_from_slice(data);
    v.resize(v.len().div_ceil(512) * 512, 0);
    v
}

#[test]
fn tar_gz_unpacking() {
    let d = tempfile::tempdir().unwrap();
    let mut t = tar_entry("cifar-10-batches-bin/test_batch.bin", &[1, 2, 3]);
    t.extend(tar_entry("../evil.bin", &[9]));
    t.extend(tar_entry("cifar-10-batches-bin/readme.html", b"hi"));
    t.extend([0u8; 1024]);
    let a = d.path().join("c.tar.gz");
    std::fs::write(&a, gz(&t)).unwrap();
    let out = d.path().join("out");
    let files = fetch::extract_tar_gz(&a, &out).unwrap();
    assert_eq!(files.len(), 2);
    assert_eq!(std::fs::read(out.join("cifar-10-batches-bin/test_batch.bin")).unwrap(), vec![1, 2, 3]);
    assert!(!d.path().join("evil.bin").exists());
}
