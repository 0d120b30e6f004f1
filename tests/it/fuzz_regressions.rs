//! Replays every committed fuzz input, the seed corpus (`fuzz/corpus/<target>/`) and the inputs
//! of fixed crashes (`fuzz/regressions/<target>/`), through the same checks the cargo-fuzz
//! targets run (`fuzz/checks.rs`), on stable and in the normal test suite.

#[path = "../../fuzz/checks.rs"]
mod checks;

use std::path::Path;

use crate::support::repo_root;

/// Runs `check` on every file of the target's corpus and regression directories; fails with the
/// names of the inputs that panicked.
fn replay(target: &str, check: fn(&[u8])) {
    let mut replayed = 0;
    let mut failed = Vec::new();
    for dir in ["corpus", "regressions"] {
        let dir = repo_root().join("fuzz").join(dir).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("dir entry").path();
            if !path.is_file() || is_hidden(&path) {
                continue;
            }
            let data = std::fs::read(&path).expect("read input");
            replayed += 1;
            if std::panic::catch_unwind(|| check(&data)).is_err() {
                failed.push(path.display().to_string());
            }
        }
    }
    assert!(replayed > 0, "no inputs for {target}");
    assert!(
        failed.is_empty(),
        "{target}: these inputs fail: {failed:#?}"
    );
}

fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

#[test]
fn route_map_inputs() {
    replay("route_map", checks::route_map);
}

#[test]
fn reference_inputs() {
    replay("reference", checks::reference);
}

#[test]
fn config_inputs() {
    replay("config", checks::config);
}

#[test]
fn admission_inputs() {
    replay("admission", checks::admission);
}
