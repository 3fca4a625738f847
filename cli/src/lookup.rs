//! Finding sandboxes' run directories under the run roots:
//! `<root>/<namespace>/<dir>`, each named by its status file.

use std::path::PathBuf;

use anyhow::Result;
use isola_sandbox::status;

/// Every directory `<root>/<namespace>/<dir>` under `roots`, with its
/// namespace's name.
pub fn sandbox_dirs(roots: &[PathBuf]) -> Vec<(String, PathBuf)> {
    let mut all = Vec::new();
    for root in roots {
        let Ok(namespaces) = std::fs::read_dir(root) else {
            continue;
        };
        for ns in namespaces.flatten() {
            if !ns.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let Ok(dirs) = std::fs::read_dir(ns.path()) else {
                continue;
            };
            let name = ns.file_name().to_string_lossy().into_owned();
            for dir in dirs.flatten() {
                if dir.file_type().is_ok_and(|t| t.is_dir()) {
                    all.push((name.clone(), dir.path()));
                }
            }
        }
    }
    all
}

/// The error for no sandbox `id` (in `namespace`) under `roots`.
pub fn missing(id: &str, namespace: Option<&str>, roots: &[PathBuf]) -> anyhow::Error {
    anyhow::anyhow!(
        "no sandbox {id}{} under {} (`isola ps` lists them)",
        namespace.map_or(String::new(), |n| format!(" in namespace {n}")),
        roots
            .iter()
            .map(|r| r.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// The error for more than one sandbox `id`, in `namespaces`.
pub fn ambiguous<'a>(id: &str, namespaces: impl Iterator<Item = &'a str>) -> anyhow::Error {
    let namespaces: Vec<&str> = namespaces.collect();
    anyhow::anyhow!(
        "{} sandboxes are named {id} (namespaces {}): name one with --namespace",
        namespaces.len(),
        namespaces.join(", ")
    )
}

/// A sandbox's run directory, found by id (and namespace).
#[derive(Debug, Clone)]
pub struct Found {
    pub id: String,
    pub namespace: String,
    pub dir: PathBuf,
}

/// Finds sandbox `id` (in `namespace`, if given: the directory's
/// namespace, as `isola ps` shows it, or the one its status names) under
/// `roots`, by the status files of their directories.
pub fn find(roots: &[PathBuf], id: &str, namespace: Option<&str>) -> Result<Found> {
    let mut found: Vec<Found> = sandbox_dirs(roots)
        .into_iter()
        .filter_map(|(ns, dir)| {
            let status = status::read(&dir).ok()?;
            let ns_matches = namespace.map_or(true, |n| n == ns || n == status.namespace);
            (status.id == id && ns_matches).then_some(Found {
                id: status.id,
                namespace: ns,
                dir,
            })
        })
        .collect();
    found.sort_by(|a, b| a.dir.cmp(&b.dir));
    found.dedup_by(|a, b| a.dir == b.dir);
    match found.len() {
        0 => Err(missing(id, namespace, roots)),
        1 => Ok(found.remove(0)),
        _ => Err(ambiguous(id, found.iter().map(|f| f.namespace.as_str()))),
    }
}
