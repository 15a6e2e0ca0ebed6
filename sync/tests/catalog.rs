//! Catalog behaviour through the public API: compare-and-swap refs, the
//! reflog, and version names (prefixes, ambiguity, head offsets).

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;

use lamina_sync::{
    Access, Error, LayerFormat, LayerKind, ManifestId, OpenOptions, Store, Version, VersionId,
};

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("s");
    Store::init(&root).unwrap();
    let store = Store::open(&root, &OpenOptions::new(Access::Write)).unwrap();
    (dir, store)
}

fn version(layer: &lamina_sync::Layer, parent: Option<VersionId>, n: u64) -> Version {
    Version {
        layer: layer.id,
        parents: parent.into_iter().collect(),
        time_ns: n as i64,
        author: "test".into(),
        message: format!("v{n}"),
        root: ManifestId::of(&n.to_le_bytes()),
    }
}

#[test]
fn refs_move_only_from_the_expected_version() {
    let (_d, s) = store();
    let l = s
        .create_layer("l", LayerKind::Os, LayerFormat::Tree)
        .unwrap();
    let v1 = s
        .commit_version(&l, None, &version(&l, None, 1), "test", &mut |_| Ok(()))
        .unwrap();
    // A second writer that still believes the layer is empty loses.
    let err = s
        .commit_version(&l, None, &version(&l, None, 2), "test", &mut |_| Ok(()))
        .unwrap_err();
    assert!(matches!(err, Error::RefConflict { .. }), "{err}");
    assert_eq!(s.head(&l).unwrap(), Some(v1));
    let v2 = s
        .commit_version(&l, Some(v1), &version(&l, Some(v1), 2), "test", &mut |_| {
            Ok(())
        })
        .unwrap();
    assert_eq!(s.head(&l).unwrap(), Some(v2));
    let log = s.reflog("layer/l").unwrap();
    let moves: Vec<_> = log.iter().map(|e| (e.old, e.new)).collect();
    assert_eq!(moves, vec![(None, Some(v1)), (Some(v1), Some(v2))]);
    // Removing the layer is journalled too.
    s.remove_layer("l").unwrap();
    let log = s.reflog("layer/l").unwrap();
    assert_eq!(log.last().map(|e| (e.old, e.new)), Some((Some(v2), None)));
}

#[test]
fn version_prefixes_resolve_or_report_ambiguity() {
    let (_d, s) = store();
    let l = s
        .create_layer("l", LayerKind::Os, LayerFormat::Tree)
        .unwrap();
    let other = s
        .create_layer("other", LayerKind::Os, LayerFormat::Tree)
        .unwrap();
    // Enough versions that two share a 4-hex-digit prefix (birthday bound:
    // 1500 ids in 65536 prefixes collide with near certainty).
    let mut head = None;
    let mut by_prefix: HashMap<String, Vec<VersionId>> = HashMap::new();
    for n in 0..1500 {
        let v = s
            .commit_version(&l, head, &version(&l, head, n), "test", &mut |_| Ok(()))
            .unwrap();
        by_prefix
            .entry(v.to_hex()[..4].to_owned())
            .or_default()
            .push(v);
        head = Some(v);
    }
    let (prefix, ids) = by_prefix
        .iter()
        .find(|(_, v)| v.len() > 1)
        .expect("a shared prefix");
    match s.resolve(&l, prefix) {
        Err(Error::VersionAmbiguous { candidates, .. }) => {
            assert_eq!(candidates.len(), ids.len());
        }
        other => panic!("expected ambiguity for {prefix}, got {other:?}"),
    }
    // The full id is never ambiguous; head offsets walk first parents.
    for id in ids {
        assert_eq!(s.resolve(&l, &id.to_hex()).unwrap(), *id);
    }
    let head = head.unwrap();
    assert_eq!(s.resolve(&l, "head").unwrap(), head);
    let parent = s.version(head).unwrap().parents[0];
    assert_eq!(s.resolve(&l, "head~1").unwrap(), parent);
    assert_eq!(
        s.resolve(&l, &format!("{}^", &head.to_hex()[..12]))
            .unwrap(),
        parent
    );
    // Versions of another layer are not found through this one.
    assert!(matches!(
        s.resolve(&other, &head.to_hex()),
        Err(Error::VersionNotFound { .. })
    ));
    assert!(matches!(
        s.resolve(&l, "head~1500"),
        Err(Error::VersionNotFound { .. })
    ));
}
