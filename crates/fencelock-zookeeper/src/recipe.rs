//! Apache Curator's `InterProcessMutex` layout: where a lock's nodes live, how they
//! are named and which one holds.
//!
//! A lock `name` is the node `{root}/{escaped name}`; each acquisition creates an
//! ephemeral-sequential child `_c_{uuid}-lock-NNNNNNNNNN` (Curator's "protected"
//! name). The child with the lowest sequence number holds the lock; every other
//! child watches only the child just before its own.
//!
//! Every child whose name ends in a 10-digit sequence number (what ZooKeeper appends
//! to a sequential node, from the parent's counter) is a contender, whatever comes
//! before it: Curator's nodes (`…lock-NNNNNNNNNN`), and kazoo's `Lock` nodes
//! (`{uuid}__lock__NNNNNNNNNN`) too, so a lock held by a Python service through kazoo
//! excludes ours. kazoo counts our nodes when given `extra_lock_patterns=["-lock-"]`.

use std::fmt::Write;

/// What follows the uuid in a lock node's name, before the sequence number.
const LOCK_MARK: &str = "-lock-";
/// How many digits ZooKeeper appends to a sequential node's name (`%010d`).
const SEQUENCE_DIGITS: usize = 10;
/// Curator's prefix of protected node names.
const PROTECTED: &str = "_c_";

/// Escapes a lock name into one path component: ASCII letters, digits, `-` and `_`
/// stay; every other byte becomes `%XX`. Injective, so two names never share a node,
/// and never `.`, `..` or `zookeeper`-reserved.
pub(crate) fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// The node of lock `name` under `root`: the parent of its lock nodes.
pub(crate) fn lock_dir(root: &str, name: &str) -> String {
    format!("{root}/{}", escape(name))
}

/// The path to create (ZooKeeper appends the sequence number) for acquisition `uuid`.
pub(crate) fn node_prefix(dir: &str, uuid: &str) -> String {
    format!("{dir}/{PROTECTED}{uuid}{LOCK_MARK}")
}

/// The sequence number of a contender's node: the 10 digits ZooKeeper appended to
/// its name, whatever the name (ours, Curator's, kazoo's); `None` for a child without
/// them, which is no contender.
pub(crate) fn sequence(child: &str) -> Option<i64> {
    let digits = child.get(child.len().checked_sub(SEQUENCE_DIGITS)?..)?;
    digits
        .bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| digits.parse().ok())
        .flatten()
}

/// Whether `child` is the node of acquisition `uuid`.
pub(crate) fn is_ours(child: &str, uuid: &str) -> bool {
    child.contains(uuid) && sequence(child).is_some()
}

/// The lock nodes among `children`, lowest sequence first (the holder, then the line).
pub(crate) fn queue(children: Vec<String>) -> Vec<String> {
    let mut nodes: Vec<(i64, String)> = children
        .into_iter()
        .filter_map(|child| sequence(&child).map(|seq| (seq, child)))
        .collect();
    nodes.sort();
    nodes.into_iter().map(|(_, child)| child).collect()
}

/// Where a node stands in line.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Place<'a> {
    /// Lowest: holds the lock.
    First,
    /// Waits for this node, the one just before it.
    After(&'a str),
    /// Not in line at all (deleted).
    Gone,
}

/// Where `ours` stands in `queue`.
pub(crate) fn place<'a>(queue: &'a [String], ours: &str) -> Place<'a> {
    match queue.iter().position(|child| child == ours) {
        Some(0) => Place::First,
        Some(at) => Place::After(&queue[at - 1]),
        None => Place::Gone,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_is_injective_and_yields_one_valid_component() {
        assert_eq!(escape("orders-42_x"), "orders-42_x");
        assert_eq!(escape("orders/42"), "orders%2F42");
        assert_eq!(escape("."), "%2E");
        assert_eq!(escape(".."), "%2E%2E");
        assert_eq!(escape("%2F"), "%252F");
        assert_eq!(escape("ä"), "%C3%A4");
        assert_ne!(escape("a/b"), escape("a%2Fb"));
        let all = escape(&"é\u{1}/ .".repeat(30));
        assert!(
            all.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"%-_".contains(&b))
        );
        assert_eq!(lock_dir("/fencelock", "a/b"), "/fencelock/a%2Fb");
        assert_eq!(lock_dir("", "a"), "/a");
    }

    #[test]
    fn the_lowest_sequence_holds_and_each_waiter_follows_the_one_before() {
        let children = vec![
            "_c_b-lock-0000000010".to_owned(),
            "readme".to_owned(),
            "_c_a-lock-0000000002".to_owned(),
            "_c_c-lock-0000000011".to_owned(),
            // Curator without protection: sorted by sequence like the others.
            "lock-0000000005".to_owned(),
            // kazoo's Lock: a contender too, by its sequence.
            "8d2b6c1e0f9a4e0b9c3d2a1b0c9d8e7f__lock__0000000007".to_owned(),
            // Not 10 digits at the end: no contender.
            "snapshot-42".to_owned(),
            "x-lock-12345678901a".to_owned(),
        ];
        let line = queue(children);
        assert_eq!(
            line,
            [
                "_c_a-lock-0000000002",
                "lock-0000000005",
                "8d2b6c1e0f9a4e0b9c3d2a1b0c9d8e7f__lock__0000000007",
                "_c_b-lock-0000000010",
                "_c_c-lock-0000000011"
            ]
        );
        assert_eq!(place(&line, "_c_a-lock-0000000002"), Place::First);
        assert_eq!(
            place(&line, "_c_c-lock-0000000011"),
            Place::After("_c_b-lock-0000000010")
        );
        // Ours right after kazoo's node waits for it.
        assert_eq!(
            place(&line, "_c_b-lock-0000000010"),
            Place::After("8d2b6c1e0f9a4e0b9c3d2a1b0c9d8e7f__lock__0000000007")
        );
        assert_eq!(place(&line, "_c_z-lock-0000000001"), Place::Gone);
        assert!(is_ours("_c_b-lock-0000000010", "b"));
        assert_eq!(sequence("x-lock-"), None);
        assert_eq!(sequence("0000000003"), Some(3));
        assert_eq!(sequence("é-lock-000000003"), None);
        assert_eq!(sequence("é123456789"), None);
        assert_eq!(node_prefix("/r/n", "u"), "/r/n/_c_u-lock-");
    }
}
