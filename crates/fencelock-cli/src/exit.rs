//! The exit codes of `fencelock`, one place so `--help` and the code agree.

/// The lock was not obtained within `--wait`; the command never ran.
pub(crate) const NOT_ACQUIRED: u8 = 75;
/// The lock was lost while the command ran; the command was stopped.
pub(crate) const LOST: u8 = 76;
/// The store could not be reached or failed.
pub(crate) const STORE_FAILED: u8 = 69;
/// The URL or another setting is wrong.
pub(crate) const CONFIG: u8 = 78;
/// The command could not be executed (not executable).
pub(crate) const NOT_EXECUTABLE: u8 = 126;
/// The command was not found.
pub(crate) const NOT_FOUND: u8 = 127;

/// The exit-code table shown by `--help`.
pub(crate) const TABLE: &str = "\
Exit codes:
  N     fencelock run: the command's own exit status (128+S if a signal S killed it)
  0     fencelock status: the lock state was read
  2     bad flags or arguments
  69    the store could not be reached or failed
  75    fencelock run: the lock was not obtained within --wait; the command never ran
  76    fencelock run: the lock was lost while the command ran; the command got SIGTERM,
        then SIGKILL after --grace
  78    bad URL or setting (unknown scheme, store feature not built in, bad option)
  126   fencelock run: the command is not executable
  127   fencelock run: the command was not found";
