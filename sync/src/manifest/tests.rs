use std::cell::RefCell;
use std::collections::HashMap;

use proptest::prelude::*;

use super::diff::{diff_disks, diff_trees, Change};
use super::*;
use crate::id::{ChunkId, ManifestId};

/// An in-memory node store for unit tests.
#[derive(Default)]
struct MapSource(RefCell<HashMap<ManifestId, Vec<u8>>>);

impl MapSource {
    fn put(&self, node: Node) -> crate::Result<ManifestId> {
        let (id, bytes) = node.encode();
        self.0.borrow_mut().insert(id, bytes);
        Ok(id)
    }
}

impl NodeSource for MapSource {
    fn load(&self, id: ManifestId) -> crate::Result<Node> {
        let bytes = self
            .0
            .borrow()
            .get(&id)
            .cloned()
            .ok_or(crate::Error::ManifestCorrupt {
                id,
                reason: "missing".into(),
            })?;
        Node::decode(id, &bytes)
    }
}

fn meta(mode: u32) -> Meta {
    Meta {
        mode,
        uid: 1000,
        gid: 1000,
        mtime_sec: 1_700_000_000,
        mtime_nsec: 123_456_789,
        xattrs: vec![],
    }
}

fn file(name: &str, data: &[u8]) -> Entry {
    let chunk = ChunkId::of(data);
    Entry {
        name: name.as_bytes().to_vec(),
        meta: meta(0o644),
        kind: EntryKind::File {
            size: data.len() as u64,
            content: Content::Inline(if data.is_empty() {
                vec![]
            } else {
                vec![Extent::Data {
                    chunk,
                    len: data.len() as u32,
                }]
            }),
            link: None,
        },
    }
}

fn dir(src: &MapSource, name: &str, mut entries: Vec<Entry>) -> Entry {
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    let node = src.put(Node::Dir(DirNode { entries })).unwrap();
    Entry {
        name: name.as_bytes().to_vec(),
        meta: meta(0o755),
        kind: EntryKind::Dir {
            node,
            opaque: false,
        },
    }
}

fn arb_entry() -> impl Strategy<Value = Entry> {
    let name = proptest::collection::vec(1u8..=255, 1..40)
        .prop_filter("valid name", |n| tree::check_name(n).is_ok());
    let kind = prop_oneof![
        (any::<u32>(), any::<[u8; 32]>(), any::<bool>()).prop_map(|(len, id, linked)| {
            let len = len.max(1);
            EntryKind::File {
                size: u64::from(len),
                content: Content::Inline(vec![Extent::Data {
                    chunk: ChunkId(id),
                    len,
                }]),
                link: linked.then(|| b"a/b".to_vec()),
            }
        }),
        any::<[u8; 32]>().prop_map(|id| EntryKind::Dir {
            node: ManifestId(id),
            opaque: false
        }),
        proptest::collection::vec(any::<u8>(), 0..100)
            .prop_map(|target| EntryKind::Symlink { target }),
        any::<u64>().prop_map(|rdev| EntryKind::CharDevice { rdev }),
        Just(EntryKind::Fifo),
        Just(EntryKind::Whiteout),
    ];
    let xattrs = proptest::collection::btree_map(
        proptest::collection::vec(any::<u8>(), 1..20),
        proptest::collection::vec(any::<u8>(), 0..50),
        0..4,
    );
    (
        name,
        kind,
        0u32..0o7777,
        any::<u32>(),
        any::<i64>(),
        0u32..1_000_000_000,
        xattrs,
    )
        .prop_map(
            |(name, kind, mode, uid, mtime_sec, mtime_nsec, xattrs)| Entry {
                name,
                meta: Meta {
                    mode,
                    uid,
                    gid: uid / 2,
                    mtime_sec,
                    mtime_nsec,
                    xattrs: xattrs
                        .into_iter()
                        .map(|(name, value)| Xattr { name, value })
                        .collect(),
                },
                kind,
            },
        )
}

proptest! {
    #[test]
    fn dir_nodes_round_trip(entries in proptest::collection::vec(arb_entry(), 0..20)) {
        let mut entries = entries;
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        entries.dedup_by(|a, b| a.name == b.name);
        let node = Node::Dir(DirNode { entries });
        let (id, bytes) = node.encode();
        prop_assert_eq!(Node::decode(id, &bytes).unwrap(), node.clone());
        // Canonical: encoding again gives the same bytes.
        prop_assert_eq!(node.encode().1, bytes);
    }

    #[test]
    fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut with_magic = NODE_MAGIC.to_vec();
        with_magic.extend_from_slice(&bytes);
        for b in [&bytes, &with_magic] {
            let _ = Node::decode(ManifestId::of(b), b);
        }
    }

    #[test]
    fn leaves_cover_extents(n in 0usize..20_000, seed in any::<u64>()) {
        let extents: Vec<Extent> = (0..n)
            .map(|i| Extent::Data { chunk: ChunkId::of(&seed.wrapping_add(i as u64).to_le_bytes()), len: 10 })
            .collect();
        let leaves = split_leaves(&extents);
        prop_assert!(leaves.iter().all(|l| !l.is_empty() && l.len() <= LEAF_EXTENTS));
        let joined: Vec<Extent> = leaves.concat();
        prop_assert_eq!(joined, extents);
    }
}

#[test]
fn leaves_resynchronise_after_an_insert() {
    let ids: Vec<Extent> = (0..20_000u64)
        .map(|i| Extent::Data {
            chunk: ChunkId::of(&i.to_le_bytes()),
            len: 1,
        })
        .collect();
    let mut edited = ids.clone();
    edited.insert(
        100,
        Extent::Data {
            chunk: ChunkId::of(b"new"),
            len: 1,
        },
    );
    let a = split_leaves(&ids);
    let b = split_leaves(&edited);
    // Every leaf of the original that starts after the first content-defined
    // cut following the insert is shared with the edited version.
    let first_cut = (100..ids.len())
        .find(|&i| split_leaves(&ids[i..=i]).len() == 1 && is_cut(&ids[i]))
        .unwrap();
    let mut start = 0;
    let mut after = 0;
    for leaf in &a {
        if start > first_cut {
            after += 1;
        }
        start += leaf.len();
    }
    let common = a
        .iter()
        .rev()
        .zip(b.iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    assert!(a.len() > 5, "{} leaves", a.len());
    assert!(
        after > 0 && common >= after,
        "{common} shared, {after} expected"
    );
}

fn is_cut(e: &Extent) -> bool {
    matches!(e, Extent::Data { chunk, .. } if u16::from_le_bytes([chunk.0[0], chunk.0[1]]) % LEAF_SPLIT == 0)
}

#[test]
fn decode_rejects_damage() {
    let node = Node::Dir(DirNode {
        entries: vec![file("a", b"x"), file("b", b"y")],
    });
    let (id, bytes) = node.encode();
    let mut flipped = bytes.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    let err = Node::decode(id, &flipped).unwrap_err();
    assert!(err.to_string().contains(&id.to_hex()), "{err}");
    // Unsorted entries are refused even when the id matches the bytes.
    let unsorted = Node::Dir(DirNode {
        entries: vec![file("b", b"y"), file("a", b"x")],
    });
    let (uid, ubytes) = unsorted.encode();
    assert!(Node::decode(uid, &ubytes)
        .unwrap_err()
        .to_string()
        .contains("sorted"));
    // A file whose extents don't add up to its size.
    let mut bad = file("c", b"zz");
    if let EntryKind::File { size, .. } = &mut bad.kind {
        *size = 5;
    }
    let (bid, bbytes) = Node::Dir(DirNode { entries: vec![bad] }).encode();
    assert!(Node::decode(bid, &bbytes).is_err());
    let mut trailing = bytes.clone();
    trailing.push(0);
    assert!(Node::decode(ManifestId::of(&trailing), &trailing).is_err());
}

fn build_disk(src: &MapSource, size: u64, clusters: &[(u64, u8)]) -> DiskRoot {
    let mut b = DiskBuilder::new(size, 65536);
    let levels = b.levels();
    let mut put = |n: Node| src.put(n);
    for &(c, v) in clusters {
        b.push(c, ChunkId::of(&[v]), &mut put).unwrap();
    }
    DiskRoot {
        size,
        cluster_size: 65536,
        levels,
        top: b.finish(&mut put).unwrap(),
    }
}

#[test]
fn disk_radix_round_trips_across_levels() {
    for size in [
        65536u64 * 10,
        65536 * 4096,
        65536 * 4097 + 5,
        65536 * 20_000,
    ] {
        let src = MapSource::default();
        let clusters: Vec<(u64, u8)> = (0..size.div_ceil(65536))
            .filter(|c| c % 7 == 0 || *c == size.div_ceil(65536) - 1)
            .map(|c| (c, (c % 251) as u8))
            .collect();
        let root = build_disk(&src, size, &clusters);
        assert_eq!(root.levels, disk::levels_for(size, 65536));
        let (rid, rbytes) = Node::Root(Root::Disk(root.clone())).encode();
        assert!(Node::decode(rid, &rbytes).is_ok());
        let mut seen = Vec::new();
        root.for_each_cluster(&src, |c, id| {
            seen.push((c, id));
            Ok(())
        })
        .unwrap();
        let want: Vec<(u64, ChunkId)> = clusters
            .iter()
            .map(|&(c, v)| (c, ChunkId::of(&[v])))
            .collect();
        assert_eq!(seen, want, "size {size}");
    }
}

#[test]
fn disk_builder_refuses_out_of_order_and_past_end() {
    let mut b = DiskBuilder::new(65536 * 4, 65536);
    let src = MapSource::default();
    let mut put = |n: Node| src.put(n);
    b.push(2, ChunkId::of(b"a"), &mut put).unwrap();
    assert!(b.push(1, ChunkId::of(b"b"), &mut put).is_err());
    assert!(b.push(4, ChunkId::of(b"b"), &mut put).is_err());
}

#[test]
fn disk_diff_lists_exact_ranges_even_across_depths() {
    let src = MapSource::default();
    let a = build_disk(
        &src,
        65536 * 100,
        &[(3, 1), (4, 1), (10, 1), (20, 1), (50, 9)],
    );
    let b = build_disk(
        &src,
        65536 * 5000,
        &[(3, 2), (4, 2), (10, 3), (30, 1), (50, 9), (4500, 1)],
    );
    assert_ne!(a.levels, b.levels);
    let r = diff_disks(&src, &a, &b).unwrap();
    let got: Vec<(u64, u64, Change)> = r.iter().map(|x| (x.start, x.end, x.change)).collect();
    assert_eq!(
        got,
        vec![
            (3, 5, Change::Modified),
            (10, 11, Change::Modified),
            (20, 21, Change::Removed),
            (30, 31, Change::Added),
            (4500, 4501, Change::Added),
        ]
    );
    assert!(diff_disks(&src, &a, &a).unwrap().is_empty());
}

#[test]
fn tree_diff_lists_exact_paths() {
    let src = MapSource::default();
    let sub_a = dir(&src, "sub", vec![file("keep", b"k"), file("gone", b"g")]);
    let old_dir = dir(&src, "old", vec![file("inner", b"i")]);
    let root_a = src
        .put(Node::Dir(DirNode {
            entries: vec![file("a", b"1"), old_dir, sub_a, file("z", b"z")],
        }))
        .unwrap();
    let mut chmod = file("a", b"1");
    chmod.meta.mode = 0o600;
    let sub_b = dir(&src, "sub", vec![file("keep", b"k"), file("new", b"n")]);
    let fresh = dir(&src, "fresh", vec![file("x", b"x")]);
    let link = Entry {
        name: b"z".to_vec(),
        meta: meta(0o777),
        kind: EntryKind::Symlink {
            target: b"a".to_vec(),
        },
    };
    let root_b = src
        .put(Node::Dir(DirNode {
            entries: vec![chmod, fresh, sub_b, link],
        }))
        .unwrap();
    let m = meta(0o755);
    let changes = diff_trees(&src, (&m, root_a), (&m, root_b)).unwrap();
    let got: Vec<(String, Change, Vec<&str>)> = changes
        .into_iter()
        .map(|c| (c.path, c.change, c.what))
        .collect();
    let want = vec![
        ("/a".to_string(), Change::Modified, vec!["mode"]),
        ("/fresh".into(), Change::Added, vec![]),
        ("/fresh/x".into(), Change::Added, vec![]),
        ("/old".into(), Change::Removed, vec![]),
        ("/old/inner".into(), Change::Removed, vec![]),
        ("/sub/gone".into(), Change::Removed, vec![]),
        ("/sub/new".into(), Change::Added, vec![]),
        ("/z".into(), Change::Modified, vec!["type", "mode"]),
    ];
    assert_eq!(got, want);
    assert!(diff_trees(&src, (&m, root_a), (&m, root_a))
        .unwrap()
        .is_empty());
}
