//! `lamina bench ceph`: imports into a store on Ceph beside the embedded
//! store, and a mirror's catch-up, next to `rados bench` on the same
//! cluster in the same run — the cluster's own ceiling for 64 KiB writes
//! and for reads.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use serde::Serialize;

use super::{data, stdout_of, timed};
use crate::output::bytes;

const MIB: f64 = 1024.0 * 1024.0;

#[derive(Debug, Serialize)]
pub struct Row {
    what: String,
    bytes: u64,
    secs: f64,
    /// MiB/s (as `rados bench` reports MB/sec).
    mib_s: f64,
    /// Over `rados bench`'s 64 KiB write bandwidth.
    vs_rados_write: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    ceph_version: String,
    conf: PathBuf,
    rados_bench_write_mib_s: f64,
    rados_bench_seq_mib_s: f64,
    rows: Vec<Row>,
}

fn ceph(conf: &Path, args: &[&str]) -> anyhow::Result<String> {
    stdout_of(
        Command::new("timeout")
            .args(["120", "ceph", "-c"])
            .arg(conf)
            .args(args),
        &format!("ceph {}", args.join(" ")),
    )
}

fn drop_pool(conf: &Path, pool: &str) {
    let _ = ceph(
        conf,
        &[
            "osd",
            "pool",
            "rm",
            pool,
            pool,
            "--yes-i-really-really-mean-it",
        ],
    );
}

/// `Bandwidth (MB/sec): X` of a `rados bench` run.
fn bandwidth(out: &str) -> anyhow::Result<f64> {
    out.lines()
        .find_map(|l| l.strip_prefix("Bandwidth (MB/sec):"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no bandwidth in rados bench's output: {out}"))
}

pub fn run(
    exe: &Path,
    conf: &Path,
    work: &Path,
    size: u64,
    note: &dyn Fn(&str),
) -> anyhow::Result<Report> {
    if !conf.exists() {
        bail!(
            "{} does not exist: start a cluster (`bash scripts/ceph.sh up`) or give --ceph-conf",
            conf.display()
        );
    }
    let ceph_version = stdout_of(Command::new("ceph").arg("--version"), "ceph --version")?
        .trim()
        .to_owned();
    let tag = format!("lamina-bench-{}", std::process::id());
    let pools = [
        format!("{tag}-rados"),
        format!("{tag}-store"),
        format!("{tag}-mirror"),
    ];
    let result = measure(exe, conf, work, size, &pools, note);
    for p in &pools {
        drop_pool(conf, p);
    }
    let (write, seq, rows) = result?;
    Ok(Report {
        ceph_version,
        conf: conf.to_owned(),
        rados_bench_write_mib_s: write,
        rados_bench_seq_mib_s: seq,
        rows,
    })
}

type Measured = (f64, f64, Vec<Row>);

fn measure(
    exe: &Path,
    conf: &Path,
    work: &Path,
    size: u64,
    pools: &[String; 3],
    note: &dyn Fn(&str),
) -> anyhow::Result<Measured> {
    note(&format!("generating {} of tree and of image…", bytes(size)));
    let tree = work.join("data/tree");
    let (tree_bytes, files) = data::make_tree(&tree, size, 1)?;
    let image = work.join("data/image.raw");
    let image_bytes = data::make_image(&image, size, 2)?;
    note(&format!(
        "tree: {files} files, {}; image: {}",
        bytes(tree_bytes),
        bytes(image_bytes)
    ));

    note("rados bench: 20 s of 64 KiB writes, then sequential reads…");
    ceph(conf, &["osd", "pool", "create", &pools[0]])?;
    let rados = |args: &[&str]| -> anyhow::Result<String> {
        stdout_of(
            Command::new("rados")
                .arg("-c")
                .arg(conf)
                .args(["-p", &pools[0]])
                .args(args),
            "rados bench",
        )
    };
    let write = bandwidth(&rados(&[
        "bench",
        "20",
        "write",
        "-b",
        "65536",
        "--no-cleanup",
    ])?)?;
    let seq = bandwidth(&rados(&["bench", "20", "seq"])?)?;
    drop_pool(conf, &pools[0]);

    let lamina = |store: &Path| {
        let mut c = Command::new(exe);
        c.arg("--store").arg(store).arg("--quiet");
        c.env_remove("LAMINA_STORE");
        c
    };
    let local = work.join("local");
    let on_ceph = work.join("rados");
    super::run_ok(lamina(&local).arg("init"), "lamina init")?;
    super::run_ok(
        lamina(&on_ceph)
            .args([
                "init",
                "--backend",
                "rados",
                "--pool",
                &pools[1],
                "--ceph-conf",
            ])
            .arg(conf),
        "lamina init --backend rados",
    )?;
    let mut rows = Vec::new();
    let mut row = |what: String, bytes: u64, secs: f64| {
        let mib_s = bytes as f64 / MIB / secs;
        rows.push(Row {
            what,
            bytes,
            secs,
            mib_s,
            vs_rados_write: mib_s / write,
        });
    };
    for (store, backend) in [(&local, "local"), (&on_ceph, "rados")] {
        for (layer, format, src, n) in [
            ("os/tree", "tree", &tree, tree_bytes),
            ("os/disk", "disk", &image, image_bytes),
        ] {
            super::run_ok(
                lamina(store).args(["layer", "create", layer, "--kind", "os", "--format", format]),
                "lamina layer create",
            )?;
            note(&format!("import of the {format} into the {backend} store…"));
            let secs = timed(
                lamina(store).args(["layer", "import", layer]).arg(src),
                "lamina layer import",
            )?;
            row(format!("fresh {format} import, {backend} store"), n, secs);
        }
    }
    note("mirror of the local store onto a pool…");
    super::run_ok(
        lamina(&local)
            .args([
                "mirror",
                "add",
                "bench",
                &format!("rados:{}", pools[2]),
                "--no-sync",
                "--ceph-conf",
            ])
            .arg(conf),
        "lamina mirror add",
    )?;
    let secs = timed(
        lamina(&local).args(["mirror", "sync", "bench"]),
        "lamina mirror sync",
    )?;
    row(
        "mirror catch-up (tree + image)".into(),
        tree_bytes + image_bytes,
        secs,
    );
    Ok((write, seq, rows))
}

pub fn render(r: &Report) -> String {
    let mut t = format!(
        "{} ({})\nrados bench, same cluster: write 64 KiB {:.1} MiB/s, seq read {:.1} MiB/s\n\n",
        r.ceph_version,
        r.conf.display(),
        r.rados_bench_write_mib_s,
        r.rados_bench_seq_mib_s
    );
    t.push_str(&format!(
        "{:<40} {:>10} {:>8} {:>9} {:>14}\n",
        "", "bytes", "secs", "MiB/s", "× rados write"
    ));
    for row in &r.rows {
        t.push_str(&format!(
            "{:<40} {:>10} {:>8.2} {:>9.1} {:>14.2}\n",
            row.what,
            bytes(row.bytes),
            row.secs,
            row.mib_s,
            row.vs_rados_write
        ));
    }
    t
}
