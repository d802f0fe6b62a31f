//! `conformance_tests!` runs every property of the suite: the macro's list and the
//! `pub async fn` properties of `src/suite.rs` name the same functions, so a property
//! added to one and not the other fails here.

use std::collections::BTreeSet;

const SUITE: &str = include_str!("../src/suite.rs");
const LIB: &str = include_str!("../src/lib.rs");

/// Every `pub async fn NAME` of `src/suite.rs`, except the macro's runner.
fn properties() -> BTreeSet<String> {
    SUITE
        .split("pub async fn ")
        .skip(1)
        .filter_map(|rest| {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            (name != "run_bounded").then_some(name)
        })
        .collect()
}

/// The names listed inside `conformance_tests!`.
fn listed() -> BTreeSet<String> {
    let start = LIB
        .find("$crate::conformance_tests!(@each $fixture;")
        .expect("the macro's list in src/lib.rs");
    let list = &LIB[start..];
    let list = &list[list.find(';').unwrap() + 1..list.find(");").unwrap()];
    list.split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_macro_runs_every_property_of_the_suite() {
    let (properties, listed) = (properties(), listed());
    assert!(
        properties.len() >= 18,
        "found only {} properties: {properties:?}",
        properties.len()
    );
    let missing: Vec<_> = properties.difference(&listed).collect();
    let unknown: Vec<_> = listed.difference(&properties).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "conformance_tests! misses {missing:?} and lists {unknown:?}, which src/suite.rs does not define"
    );
}
