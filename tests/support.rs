//! Helpers shared by the end-to-end tests.

use std::path::PathBuf;

/// The real datasets, `../shared/data` next to the repository. When absent the caller skips its
/// test, except in CI (`CI=true`), where these tests are mandatory and a missing folder fails.
pub fn shared_data_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    if dir.is_dir() {
        return Some(dir);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "{} not found: the real-data tests are mandatory in CI (CI=true)",
            dir.display()
        );
    }
    eprintln!("skipping: ../shared/data not found");
    None
}

/// The `genseg` binary built for these tests.
pub fn genseg_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_genseg"))
}
