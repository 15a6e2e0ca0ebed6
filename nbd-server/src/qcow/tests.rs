//! Tests against qemu-img: every image we write must pass `qemu-img check`
//! and read back identically through qemu-img; images qemu-img makes must
//! open, read correctly, or be refused with a clear reason.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;

fn qemu_img(args: &[&str]) -> std::process::Output {
    let out = Command::new("qemu-img").args(args).output();
    match out {
        Ok(o) => o,
        Err(e) => panic!("qemu-img is needed for these tests (apt install qemu-utils): {e}"),
    }
}

fn check_clean(path: &Path) {
    let out = qemu_img(&["check", path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "qemu-img check {}: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Dir {
        Dir(tempfile::tempdir().unwrap())
    }
    fn p(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }
}

/// Applies the same writes to a qcow2 image and a raw model.
fn apply(img: &Qcow2, model: &mut [u8], offset: u64, data: &[u8]) {
    img.write_at(offset, data).unwrap();
    model[offset as usize..offset as usize + data.len()].copy_from_slice(data);
}

#[test]
fn written_images_pass_qemu_img_check_and_compare() {
    let d = Dir::new();
    let size = 64u64 << 20;
    let path = d.p("a.qcow2");
    Qcow2::create(&path, size).unwrap();
    let mut model = vec![0u8; size as usize];
    {
        let img = Qcow2::open(&path, true, Backing::FromHeader).unwrap();
        apply(&img, &mut model, 0, &pattern(4096, 1));
        apply(&img, &mut model, 65536 * 3 + 100, &pattern(200_000, 2));
        apply(&img, &mut model, size - 5000, &pattern(5000, 3));
        for i in 0..200u64 {
            let off = (i * 7919 * 4096) % (size - 8192);
            apply(
                &img,
                &mut model,
                off,
                &pattern(4096 + (i as usize % 3) * 512, i + 10),
            );
        }
        img.write_zeroes(65536 * 10, 65536 * 4, true).unwrap();
        model[65536 * 10..65536 * 14].fill(0);
        img.write_zeroes(65536 * 20 + 512, 65536 * 2, false)
            .unwrap();
        model[65536 * 20 + 512..65536 * 22 + 512].fill(0);
        img.discard(65536 * 30, 65536 * 2).unwrap();
        model[65536 * 30..65536 * 32].fill(0);
        let mut back = vec![0u8; size as usize];
        img.read_at(0, &mut back).unwrap();
        assert!(back == model, "read-back differs");
        img.close().unwrap();
    }
    check_clean(&path);
    let raw = d.p("model.raw");
    std::fs::write(&raw, &model).unwrap();
    let out = qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        path.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn a_crashed_writer_is_repaired_on_the_next_open() {
    let d = Dir::new();
    let path = d.p("c.qcow2");
    Qcow2::create(&path, 16 << 20).unwrap();
    let img = Qcow2::open(&path, true, Backing::FromHeader).unwrap();
    img.write_at(1 << 20, &pattern(300_000, 5)).unwrap();
    // A crash: no close, the dirty bit stays set.
    std::mem::forget(img);
    let h = Header::parse(&std::fs::read(&path).unwrap()[..4096]).unwrap();
    assert_ne!(h.incompatible_features & INCOMPAT_DIRTY, 0);
    let img = Qcow2::open(&path, true, Backing::FromHeader).unwrap();
    assert!(img.repaired().is_some());
    let mut back = vec![0u8; 300_000];
    img.read_at(1 << 20, &mut back).unwrap();
    assert_eq!(back, pattern(300_000, 5));
    img.close().unwrap();
    drop(img);
    check_clean(&path);
}

#[test]
fn qemu_img_images_read_correctly_including_compressed_and_chains() {
    let d = Dir::new();
    let raw = d.p("src.raw");
    let mut content = vec![0u8; 8 << 20];
    content[..1 << 20].copy_from_slice(&pattern(1 << 20, 7));
    content[3 << 20..(3 << 20) + 70_000]
        .copy_from_slice(&b"compressible ".repeat(70_000 / 13 + 1)[..70_000]);
    std::fs::write(&raw, &content).unwrap();
    // Compressed.
    let comp = d.p("comp.qcow2");
    let out = qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        comp.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let img = Qcow2::open(&comp, false, Backing::FromHeader).unwrap();
    let mut back = vec![0u8; content.len()];
    img.read_at(0, &mut back).unwrap();
    assert!(back == content, "compressed image reads back differently");
    // A chain: base (raw) <- mid (qcow2) <- top (qcow2), written by qemu-io.
    let mid = d.p("mid.qcow2");
    let top = d.p("top.qcow2");
    assert!(qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "src.raw",
        "-F",
        "raw",
        mid.to_str().unwrap()
    ])
    .status
    .success());
    assert!(qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap()
    ])
    .status
    .success());
    let io = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0xab 65536 65536",
            "-c",
            "write -z 0 4096",
            mid.to_str().unwrap(),
        ])
        .output()
        .expect("qemu-io");
    assert!(io.status.success());
    content[65536..131072].fill(0xab);
    content[..4096].fill(0);
    let img = Qcow2::open(&top, false, Backing::FromHeader).unwrap();
    assert_eq!(img.backing_name(), Some("mid.qcow2"));
    img.read_at(0, &mut back).unwrap();
    assert!(back == content, "chain reads back differently");
    // Writing the top copies up from the chain.
    let img = Qcow2::open(&top, true, Backing::FromHeader).unwrap();
    img.write_at(65536 + 10, b"top").unwrap();
    content[65536 + 10..65536 + 13].copy_from_slice(b"top");
    img.read_at(0, &mut back).unwrap();
    assert!(back == content);
    img.close().unwrap();
    drop(img);
    check_clean(&top);
}

#[test]
fn unsafe_images_are_refused_with_the_reason() {
    let d = Dir::new();
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        (
            "small.qcow2",
            vec!["-o", "cluster_size=512"],
            "at least 4096",
        ),
        ("extl2.qcow2", vec!["-o", "extended_l2=on"], "extended L2"),
        ("zstd.qcow2", vec!["-o", "compression_type=zstd"], "zlib"),
    ];
    for (name, opts, reason) in cases {
        let p = d.p(name);
        let mut args = vec!["create", "-f", "qcow2"];
        args.extend(opts);
        args.extend([p.to_str().unwrap(), "16M"]);
        assert!(qemu_img(&args).status.success(), "{name}");
        let err = Qcow2::open(&p, false, Backing::FromHeader)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains(reason), "{name}: {err}");
    }
    let snap = d.p("snap.qcow2");
    assert!(
        qemu_img(&["create", "-f", "qcow2", snap.to_str().unwrap(), "16M"])
            .status
            .success()
    );
    assert!(qemu_img(&["snapshot", "-c", "s1", snap.to_str().unwrap()])
        .status
        .success());
    let err = Qcow2::open(&snap, true, Backing::FromHeader)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("snapshot"), "{err}");
    // Truncated and garbage files.
    let trunc = d.p("trunc.qcow2");
    let mut bytes = std::fs::read(&snap).unwrap();
    bytes.truncate(40);
    std::fs::write(&trunc, &bytes).unwrap();
    let err = Qcow2::open(&trunc, false, Backing::FromHeader)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("shorter than a qcow2 header"), "{err}");
    let ok = d.p("ok.qcow2");
    Qcow2::create(&ok, 1 << 20).unwrap();
    let mut bytes = std::fs::read(&ok).unwrap();
    bytes[40..48].copy_from_slice(&(1u64 << 40).to_be_bytes());
    std::fs::write(&ok, &bytes).unwrap();
    let err = Qcow2::open(&ok, false, Backing::FromHeader)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("L1 table lies past the end"), "{err}");
}

#[test]
fn concurrent_writers_keep_the_image_consistent() {
    let d = Dir::new();
    let path = d.p("mt.qcow2");
    let size = 32u64 << 20;
    Qcow2::create(&path, size).unwrap();
    let img = std::sync::Arc::new(Qcow2::open(&path, true, Backing::FromHeader).unwrap());
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let img = img.clone();
            std::thread::spawn(move || {
                for i in 0..64u64 {
                    // Each thread owns every fourth 64 KiB cluster, written in
                    // 4 KiB pieces from different threads' point of view.
                    let c = i * 4 + t;
                    for s in 0..16u64 {
                        img.write_at(c * 65536 + s * 4096, &pattern(4096, c * 100 + s))
                            .unwrap();
                    }
                    if i % 8 == 0 {
                        img.write_zeroes(c * 65536, 65536, i % 16 == 0).unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for c in 0..256u64 {
        let mut back = vec![0u8; 65536];
        img.read_at(c * 65536, &mut back).unwrap();
        let i = c / 4;
        for s in 0..16u64 {
            let want = if i % 8 == 0 {
                vec![0u8; 4096]
            } else {
                pattern(4096, c * 100 + s)
            };
            assert!(
                back[(s * 4096) as usize..((s + 1) * 4096) as usize] == want[..],
                "cluster {c}"
            );
        }
    }
    img.close().unwrap();
    drop(img);
    check_clean(&path);
}

/// A backing device that is not local (like a base not cached yet).
struct Remote(Vec<u8>);

impl ReadAt for Remote {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let o = offset as usize;
        buf.copy_from_slice(&self.0[o..o + buf.len()]);
        Ok(())
    }
    fn status(&self, _offset: u64, len: u64) -> Result<Runs> {
        Ok(vec![(len, Alloc::Data)])
    }
}

#[test]
fn local_paths_serve_only_what_is_local() {
    let d = Dir::new();
    let path = d.p("top.qcow2");
    let size = 1u64 << 20;
    Qcow2::create(&path, size).unwrap();
    let base = pattern(size as usize, 3);
    let img = Qcow2::open(&path, true, Backing::Device(Arc::new(Remote(base.clone())))).unwrap();
    let cs = img.cluster_size() as usize;
    let mut buf = vec![0u8; 8192];
    // Unallocated over a base that is not local: nothing done.
    assert!(!img.read_local(0, &mut buf).unwrap());
    let mut called = 0;
    let new = pattern(4096, 4);
    assert!(!img
        .write_in_place(4096, &new, || {
            called += 1;
            Ok(())
        })
        .unwrap());
    assert_eq!(called, 0);
    // Once the cluster is allocated (copy-on-write), both are local.
    img.write_at(0, &base[..512]).unwrap();
    assert!(img
        .write_in_place(4096, &new, || {
            called += 1;
            Ok(())
        })
        .unwrap());
    assert_eq!(called, 1);
    assert!(img.read_local(0, &mut buf).unwrap());
    assert_eq!(buf[..4096], base[..4096]);
    assert_eq!(buf[4096..], new[..]);
    // A range reaching into the next (unallocated) cluster is not.
    let mut two = vec![0u8; 4096];
    assert!(!img.read_local(cs as u64 - 2048, &mut two).unwrap());
    img.close().unwrap();
    check_clean(&path);
}
