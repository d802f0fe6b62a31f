//! Table names that are safe to write into SQL text.

use fencelock_core::{Error, Result};

/// Accepts `[A-Za-z_][A-Za-z0-9_]{0,62}`: every database here takes such a name
/// quoted or not, so validated names are safe to write into SQL text.
pub(crate) fn check_table_name(option: &str, name: &str) -> Result<()> {
    let mut chars = name.chars();
    let well_formed = name.len() <= 63
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if well_formed {
        return Ok(());
    }
    Err(Error::config(format!(
        "{option} {name:?} is not a usable table name: start with a letter or `_`, then use \
         letters, digits and `_`, at most 63 in all, e.g. {option}=my_app_locks"
    )))
}
