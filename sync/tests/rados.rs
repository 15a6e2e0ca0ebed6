//! The RADOS side of a ref's compare-and-swap, with two stores on one pool
//! whose changes are both built against the same old target before either
//! is applied: the OSD applies the first and refuses the second, which no
//! check made while building could catch. Needs the cluster of
//! `scripts/ceph.sh` (`$LAMINA_CEPH_CONF`); required in CI.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;

use lamina_sync::rados::RadosTarget;
use lamina_sync::{
    Access, Error, LayerFormat, LayerKind, ManifestId, OpenOptions, Store, StoreBackend, Version,
};

fn cluster() -> Option<PathBuf> {
    let conf = PathBuf::from(
        std::env::var_os("LAMINA_CEPH_CONF").unwrap_or_else(|| "/tmp/lamina-ceph/ceph.conf".into()),
    );
    let up = conf.exists()
        && Command::new("timeout")
            .args(["20", "rados", "-c"])
            .arg(&conf)
            .arg("lspools")
            .output()
            .is_ok_and(|o| o.status.success());
    if !up {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must provide a Ceph cluster"
        );
        eprintln!("note: skipping: no Ceph cluster (`bash scripts/ceph.sh up`)");
    }
    up.then_some(conf)
}

struct Pool(String, PathBuf);

impl Drop for Pool {
    fn drop(&mut self) {
        let _ = Command::new("timeout")
            .args(["30", "ceph", "-c"])
            .arg(&self.1)
            .args([
                "osd",
                "pool",
                "rm",
                &self.0,
                &self.0,
                "--yes-i-really-really-mean-it",
            ])
            .output();
    }
}

#[test]
fn a_ref_built_against_a_stale_target_is_refused_by_the_osd() {
    let Some(conf) = cluster() else { return };
    let pool = Pool(format!("t-cas-{}", std::process::id()), conf.clone());
    let target = StoreBackend::Rados(RadosTarget::new(&pool.0, Some(conf)));
    let dir = tempfile::tempdir().unwrap();
    let (ra, rb) = (dir.path().join("a"), dir.path().join("b"));
    Store::init_with(&ra, &target).unwrap();
    Store::init_with(&rb, &target).unwrap();
    let a = Store::open(&ra, &OpenOptions::new(Access::Write)).unwrap();
    let b = Store::open(&rb, &OpenOptions::new(Access::Write)).unwrap();
    assert_eq!(a.id(), b.id(), "both directories are one store");
    let layer = a
        .create_layer("l", LayerKind::Os, LayerFormat::Tree)
        .unwrap();
    // The second directory sees the layer; creating it again is refused.
    assert_eq!(b.layer("l").unwrap().id, layer.id);
    assert!(matches!(
        b.create_layer("l", LayerKind::Os, LayerFormat::Tree),
        Err(Error::LayerExists { .. })
    ));
    let version = |n: u64| Version {
        layer: layer.id,
        parents: Vec::new(),
        time_ns: n as i64,
        author: "test".into(),
        message: format!("v{n}"),
        root: ManifestId::of(&n.to_le_bytes()),
    };
    // Both build a move of the empty head; neither has committed.
    let mut ba = a.batch().unwrap();
    let va = ba.put_version(&version(1)).unwrap();
    ba.move_head(&layer, None, va, "test").unwrap();
    let mut bb = b.batch().unwrap();
    let vb = bb.put_version(&version(2)).unwrap();
    bb.move_head(&layer, None, vb, "test").unwrap();
    a.commit(ba).unwrap();
    let err = b.commit(bb).unwrap_err();
    match &err {
        Error::RefConflict { name, found, .. } => {
            assert_eq!(name, "layer/l");
            assert_eq!(*found, va.short());
        }
        other => panic!("expected a ref conflict, got {other}"),
    }
    // Nothing of the refused change landed: no version, no reflog entry.
    assert_eq!(b.head(&layer).unwrap(), Some(va));
    assert!(!a.has_version(vb).unwrap());
    assert_eq!(a.reflog("layer/l").unwrap().len(), 1);

    // Two creations of one new layer, built together: one wins.
    let mut ca = a.batch().unwrap();
    let mut cb = b.batch().unwrap();
    let make = |name: &str| lamina_sync::Layer {
        id: lamina_sync::LayerId::random(),
        name: name.into(),
        kind: LayerKind::Data,
        format: LayerFormat::Tree,
        created_ns: 1,
    };
    ca.put_layer(&make("m")).unwrap();
    cb.put_layer(&make("m")).unwrap();
    a.commit(ca).unwrap();
    assert!(matches!(b.commit(cb), Err(Error::LayerExists { .. })));
}
