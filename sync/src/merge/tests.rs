//! Mediator tests on real stores: trees imported from directories, disks
//! from raw images.

use std::fs;
use std::path::Path;

use super::*;
use crate::{Access, ExportOptions, ImportOptions, LayerFormat, LayerKind, OpenOptions};

struct T {
    dir: tempfile::TempDir,
    store: Store,
}

impl T {
    fn new() -> T {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("s");
        Store::init(&root).unwrap();
        let store = Store::open(&root, &OpenOptions::new(Access::Write)).unwrap();
        T { dir, store }
    }

    /// Imports `files` as a version of `layer` on top of `parent`.
    fn version(&self, layer: &str, parent: Option<VersionId>, files: &[(&str, &str)]) -> VersionId {
        let l = self.store.layer(layer).unwrap();
        let head = self.store.head(&l).unwrap();
        if head != parent {
            let mut b = self.store.batch().unwrap();
            b.move_ref(&format!("layer/{layer}"), head, parent, "test")
                .unwrap();
            self.store.commit(b).unwrap();
        }
        let src = self
            .dir
            .path()
            .join(format!("src-{}", rand::random::<u32>()));
        for (p, content) in files {
            let path = src.join(p);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, content).unwrap();
        }
        fs::create_dir_all(&src).unwrap();
        self.store
            .import(layer, &src, &ImportOptions::default())
            .unwrap()
            .version
    }

    fn tree(&self) -> (VersionId, VersionId, VersionId) {
        self.store
            .create_layer("data", LayerKind::Data, LayerFormat::Tree)
            .unwrap();
        let base = self.version(
            "data",
            None,
            &[
                ("a.txt", "a\n"),
                ("b.txt", "b\n"),
                ("d/x", "x\n"),
                ("gone", "g\n"),
            ],
        );
        let server = self.version(
            "data",
            Some(base),
            &[
                ("a.txt", "server a\n"),
                ("b.txt", "b\n"),
                ("d/x", "x\n"),
                ("d/s", "new on server\n"),
                ("same", "same\n"),
                ("gone", "changed by server\n"),
            ],
        );
        let client = self.version(
            "data",
            Some(base),
            &[
                ("a.txt", "client a\n"),
                ("b.txt", "b changed by client\n"),
                ("d/x", "x\n"),
                ("d/c", "new on client\n"),
                ("same", "same\n"),
            ],
        );
        (base, server, client)
    }

    fn merge(&self, base: VersionId, server: VersionId, client: VersionId, take: Take) -> Merged {
        let m = Mediation {
            base: Some(base),
            server,
            client,
            host: "laptop",
            now_ns: 1_764_670_500_000_000_000,
        };
        self.store.mediate(&m, &mut |_| Ok(take.clone())).unwrap()
    }

    /// The merged tree as path → content.
    fn files(&self, root: ManifestId) -> Vec<(String, String)> {
        let layer = self.store.layer("data").unwrap();
        let v = Version {
            layer: layer.id,
            parents: vec![],
            time_ns: 1,
            author: "t".into(),
            message: String::new(),
            root,
        };
        let mut b = self.store.batch().unwrap();
        let id = b.put_version(&v).unwrap();
        self.store.commit(b).unwrap();
        let out = self
            .dir
            .path()
            .join(format!("out-{}", rand::random::<u32>()));
        self.store
            .export("data", id, &out, &ExportOptions::default())
            .unwrap();
        let mut files = Vec::new();
        walk(&out, &out, &mut files);
        files.sort();
        files
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, String)>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            walk(root, &p, out);
        } else {
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            out.push((rel, fs::read_to_string(&p).unwrap()));
        }
    }
}

use crate::version::Version;

fn f(p: &str, c: &str) -> (String, String) {
    (p.to_owned(), c.to_owned())
}

#[test]
fn disjoint_changes_merge_and_conflicts_follow_the_policy() {
    let t = T::new();
    let (base, server, client) = t.tree();
    let common = |a: &str, gone: Option<&str>| {
        let mut v = vec![
            f("a.txt", a),
            f("b.txt", "b changed by client\n"),
            f("d/c", "new on client\n"),
            f("d/s", "new on server\n"),
            f("d/x", "x\n"),
            f("same", "same\n"),
        ];
        if let Some(g) = gone {
            v.push(f("gone", g));
        }
        v.sort();
        v
    };
    let m = t.merge(base, server, client, Take::Server);
    assert_eq!(
        t.files(m.root.unwrap()),
        common("server a\n", Some("changed by server\n"))
    );
    let kinds: Vec<(String, ItemKind)> = m.items.iter().map(|i| (i.path.clone(), i.kind)).collect();
    assert_eq!(
        kinds,
        vec![
            ("/a.txt".into(), ItemKind::BothChanged),
            ("/gone".into(), ItemKind::ClientDeleted)
        ]
    );

    let m = t.merge(base, server, client, Take::Client);
    assert_eq!(t.files(m.root.unwrap()), common("client a\n", None));

    let m = t.merge(base, server, client, Take::KeepBoth);
    let mut want = common("server a\n", Some("changed by server\n"));
    want.push(f("a.conflict-laptop-20251202-101500.txt", "client a\n"));
    want.sort();
    assert_eq!(t.files(m.root.unwrap()), want);
    assert_eq!(
        m.items[0].resolution,
        "kept a.conflict-laptop-20251202-101500.txt"
    );

    let m = t.merge(base, server, client, Take::Pending);
    assert!(m.root.is_none());
    assert!(m.items.iter().all(|i| i.resolution == "pending"));
}

#[test]
fn identical_and_one_sided_changes_are_no_conflict() {
    let t = T::new();
    t.store
        .create_layer("data", LayerKind::Data, LayerFormat::Tree)
        .unwrap();
    let base = t.version("data", None, &[("a", "1\n")]);
    let s = t.version("data", Some(base), &[("a", "2\n"), ("n", "n\n")]);
    let c = t.version("data", Some(base), &[("a", "2\n"), ("n", "n\n")]);
    let m = t.merge(base, s, c, Take::Pending);
    assert!(m.items.is_empty(), "{:?}", m.items);
    assert_eq!(t.files(m.root.unwrap()), vec![f("a", "2\n"), f("n", "n\n")]);
    // Only the server moved: the merge is the server's tree.
    let m = t.merge(base, s, base, Take::Pending);
    assert_eq!(m.root, Some(t.store.version(s).unwrap().root));
}

#[test]
fn disks_merge_per_cluster() {
    let t = T::new();
    t.store
        .create_layer("disk", LayerKind::Os, LayerFormat::Disk)
        .unwrap();
    const C: usize = 65536;
    let img = |name: &str, edits: &[(usize, u8)]| {
        let mut data = vec![0u8; 16 * C];
        for (i, chunk) in data.chunks_mut(C).enumerate() {
            chunk.fill(i as u8 + 1);
        }
        for (cl, val) in edits {
            data[cl * C..(cl + 1) * C].fill(*val);
        }
        let p = t.dir.path().join(name);
        fs::write(&p, &data).unwrap();
        p
    };
    let import = |p: &Path, parent: Option<VersionId>| {
        let l = t.store.layer("disk").unwrap();
        let head = t.store.head(&l).unwrap();
        if head != parent {
            let mut b = t.store.batch().unwrap();
            b.move_ref("layer/disk", head, parent, "test").unwrap();
            t.store.commit(b).unwrap();
        }
        t.store
            .import("disk", p, &ImportOptions::default())
            .unwrap()
            .version
    };
    let base = import(&img("base.img", &[]), None);
    let s = import(&img("server.img", &[(1, 0xaa), (5, 0xbb)]), Some(base));
    let c = import(
        &img("client.img", &[(2, 0xcc), (5, 0xdd), (6, 0xee)]),
        Some(base),
    );
    let m = |take: Take| {
        t.store
            .mediate(
                &Mediation {
                    base: Some(base),
                    server: s,
                    client: c,
                    host: "h",
                    now_ns: 0,
                },
                &mut |_| Ok(take.clone()),
            )
            .unwrap()
    };
    let read = |root: ManifestId| {
        let mut map = std::collections::BTreeMap::new();
        let Node::Root(Root::Disk(d)) = t.store.load(root).unwrap() else {
            panic!()
        };
        d.for_each_cluster(&t.store, |i, id| {
            map.insert(i, t.store.chunk(&id).unwrap()[0]);
            Ok(())
        })
        .unwrap();
        map
    };
    let server_wins = m(Take::Server);
    assert_eq!(server_wins.items.len(), 1);
    assert_eq!(server_wins.items[0].path, "clusters 5-6");
    let got = read(server_wins.root.unwrap());
    assert_eq!(
        (got[&1], got[&2], got[&5], got[&6], got[&7]),
        (0xaa, 0xcc, 0xbb, 0xee, 8)
    );
    let got = read(m(Take::Client).root.unwrap());
    assert_eq!(got[&5], 0xdd);
    assert!(m(Take::Pending).root.is_none());
}

#[test]
fn suffix_is_utc_civil_time() {
    // 2026-12-02 10:15:00 UTC.
    assert_eq!(
        conflict_suffix("pc 1", 1_796_206_500_000_000_000),
        "-pc_1-20261202-101500"
    );
    assert_eq!(conflict_suffix("h", 0), "-h-19700101-000000");
}
