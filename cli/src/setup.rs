//! `isola setup containerd`: puts isola's runtime into an existing
//! containerd config, or takes it out again (`--remove`), editing the file
//! with `toml_edit` so that everything else (comments, order, spacing)
//! stays as it was.
//!
//! The tables are those of `configs/containerd-isola.toml` (config
//! `version = 2`: containerd 1.x, and 2.x, which migrates it) and
//! `configs/containerd-isola-v3.toml` (`version = 3`: containerd 2.x): the
//! CRI runtime `isola` (`runtime_type = "io.containerd.isola.v2"`, the
//! `io.isola.config.*` annotations passed to the shim). In a version-2
//! config that names no `runc` runtime, a `runc` table is added too:
//! naming any runtime replaces containerd 1.x's built-in list, and its CRI
//! plugin fails without the default runtime. Each added table carries a
//! comment saying so, by which `--remove` knows what it may take out; an
//! `isola` table the admin wrote is updated in place (its other keys stay)
//! and removed by `--remove` all the same.
//!
//! The result is parsed again and, when a `containerd` binary is found,
//! checked with `containerd --config NEW config dump` before it replaces
//! the file (a temporary file beside it, renamed; mode kept).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use toml_edit::{value, Array, DocumentMut, Item, Table};

/// containerd's config file.
pub const DEFAULT_CONFIG: &str = "/etc/containerd/config.toml";

/// The CRI runtime handler name (a RuntimeClass's `handler`).
const HANDLER: &str = "isola";
/// The shim's runtime type.
const RUNTIME_TYPE: &str = "io.containerd.isola.v2";
/// The annotations the CRI plugin passes on to the shim.
const ANNOTATIONS: &str = "io.isola.config.*";
/// The comment on every table this command adds.
const MARK: &str = "added by `isola setup containerd`";

#[derive(Debug, Args)]
pub struct SetupArgs {
    #[command(subcommand)]
    target: Target,
}

#[derive(Debug, Subcommand)]
enum Target {
    /// Adds (or updates) isola's runtime in containerd's config, keeping
    /// everything else; `--remove` takes it out. Says whether containerd
    /// must be restarted.
    Containerd(ContainerdArgs),
}

#[derive(Debug, Args)]
pub struct ContainerdArgs {
    /// containerd's config file (made if missing).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Print the new config instead of writing it.
    #[arg(long)]
    dry_run: bool,
    /// Take isola's runtime out again.
    #[arg(long)]
    remove: bool,
    /// The containerd binary that checks the result (`config dump`) and,
    /// for a config without one, tells its format by its version.
    #[arg(long, value_name = "PATH", default_value = "containerd")]
    containerd: PathBuf,
}

/// Runs `isola setup ...`; the exit status.
pub fn run(args: SetupArgs) -> i32 {
    let Target::Containerd(args) = args.target;
    match containerd(&args) {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("isola: setup containerd: {err:#}");
            1
        }
    }
}

fn containerd(args: &ContainerdArgs) -> Result<()> {
    let path = &args.config;
    let original = match std::fs::read_to_string(path) {
        Ok(text) => Some(text),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
        Err(err) => return Err(err).with_context(|| format!("reading {}", path.display())),
    };
    let binary = find_binary(&args.containerd);
    let mut doc = match &original {
        Some(text) => text
            .parse::<DocumentMut>()
            .with_context(|| format!("{} is not valid TOML", path.display()))?,
        None => {
            if args.remove {
                println!("{} does not exist: nothing to remove", path.display());
                return Ok(());
            }
            let Some(bin) = &binary else {
                bail!(
                    "{} does not exist, and without a containerd binary ({}) its format \
                     (version 2 for containerd 1.x, 3 for 2.x) is unknown: pass --containerd PATH",
                    path.display(),
                    args.containerd.display()
                );
            };
            let version = format_for(bin)?;
            let mut doc = DocumentMut::new();
            doc["version"] = value(version);
            doc
        }
    };
    let version = config_version(&doc).with_context(|| format!("in {}", path.display()))?;
    let changed = if args.remove {
        remove(&mut doc, version)?
    } else {
        add(&mut doc, version)?
    };
    let text = doc.to_string();
    if !changed && original.is_some() {
        let what = if args.remove {
            "has no isola runtime"
        } else {
            "has isola's runtime already"
        };
        println!("{} {what}: nothing changed", path.display());
        return Ok(());
    }
    // Valid TOML, and what containerd makes of it.
    text.parse::<toml::Table>()
        .context("the edited config does not parse (a bug: nothing was written)")?;
    let tmp = temp_beside(path);
    std::fs::write(&tmp, &text).with_context(|| format!("writing {}", tmp.display()))?;
    let checked = match &binary {
        Some(bin) => check_with(bin, &tmp, !args.remove),
        None => Ok(false),
    };
    if args.dry_run {
        let _ = std::fs::remove_file(&tmp);
        checked?;
        print!("{text}");
        return Ok(());
    }
    let checked = match checked {
        Ok(checked) => checked,
        Err(err) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(err);
        }
    };
    if let Ok(meta) = std::fs::metadata(path) {
        let _ = std::fs::set_permissions(&tmp, meta.permissions());
    }
    if let Err(err) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(err).with_context(|| format!("replacing {}", path.display()));
    }
    let how = if checked {
        format!(
            " (checked with {} config dump)",
            binary
                .as_deref()
                .unwrap_or(Path::new("containerd"))
                .display()
        )
    } else {
        " (no containerd binary found to check it with)".to_string()
    };
    if args.remove {
        println!("removed isola's runtime from {}{how}", path.display());
    } else {
        println!(
            "isola's runtime (CRI handler `{HANDLER}`, {RUNTIME_TYPE}) is in {} (config version {version}){how}",
            path.display()
        );
    }
    println!("containerd must be restarted to read it: systemctl restart containerd");
    Ok(())
}

/// `name` if it is a path to a file, else the first of that name on PATH.
fn find_binary(name: &Path) -> Option<PathBuf> {
    if name.components().count() > 1 {
        return name.is_file().then(|| name.to_path_buf());
    }
    crate::host::on_path(&name.to_string_lossy())
        .into_iter()
        .find(|p| p.is_file())
}

/// The config format containerd `bin` writes: 3 for 2.x, 2 for 1.x.
fn format_for(bin: &Path) -> Result<i64> {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    format_of_version(&text)
        .with_context(|| format!("{} --version printed {:?}", bin.display(), text.trim()))
}

/// From `containerd --version`'s line (`containerd github.com/... 2.1.9 ...`).
fn format_of_version(line: &str) -> Option<i64> {
    let version = line
        .split_whitespace()
        .find(|w| w.starts_with(|c: char| c.is_ascii_digit()) && w.contains('.'))?;
    match version.split('.').next()? {
        "1" => Some(2),
        "2" => Some(3),
        _ => None,
    }
}

/// The config's `version` (2 or 3).
fn config_version(doc: &DocumentMut) -> Result<i64> {
    match doc.get("version").and_then(Item::as_integer) {
        Some(v @ (2 | 3)) => Ok(v),
        Some(v) => {
            bail!("config version {v}: isola setup edits versions 2 (containerd 1.x) and 3 (2.x)")
        }
        None => bail!(
            "the config has no `version`: containerd 1.x reads that as the old version 1, \
             which isola setup does not edit; `containerd config migrate` writes a current one"
        ),
    }
}

/// The CRI plugin's runtimes table's path in a config of `version`.
fn runtimes_path(version: i64) -> [&'static str; 4] {
    if version == 3 {
        [
            "plugins",
            "io.containerd.cri.v1.runtime",
            "containerd",
            "runtimes",
        ]
    } else {
        [
            "plugins",
            "io.containerd.grpc.v1.cri",
            "containerd",
            "runtimes",
        ]
    }
}

/// The table at `path` under the document's root, made (implicit: no
/// header of its own) where missing.
fn table_at<'a>(doc: &'a mut DocumentMut, path: &[&str]) -> Result<&'a mut Table> {
    let mut table = doc.as_table_mut();
    let mut walked = Vec::new();
    for key in path {
        walked.push(*key);
        let item = table.entry(key).or_insert_with(|| {
            let mut t = Table::new();
            t.set_implicit(true);
            Item::Table(t)
        });
        table = item.as_table_mut().with_context(|| {
            format!(
                "`{}` is not a table (an inline table or a value): edit it by hand",
                walked.join(".")
            )
        })?;
    }
    Ok(table)
}

/// The table at `path`, if there is one.
fn table_get<'a>(doc: &'a DocumentMut, path: &[&str]) -> Option<&'a Table> {
    let mut table = doc.as_table();
    for key in path {
        table = table.get(key)?.as_table()?;
    }
    Some(table)
}

fn annotations() -> Item {
    let mut a = Array::new();
    a.push(ANNOTATIONS);
    value(a)
}

/// Adds (or updates) isola's runtime; whether anything changed.
fn add(doc: &mut DocumentMut, version: i64) -> Result<bool> {
    let path = runtimes_path(version);
    let before = doc.to_string();
    let needs_runc = version == 2 && {
        let runtimes = table_get(doc, &path);
        let has_runc = runtimes.is_some_and(|t| t.contains_key("runc"));
        let default = table_get(doc, &path[..3])
            .and_then(|t| t.get("default_runtime_name"))
            .and_then(Item::as_str)
            .unwrap_or("runc");
        !has_runc && default == "runc"
    };
    // Added tables go at the end of the file, after everything there.
    let mut next = last_position(doc.as_table()) + 1;
    let mut at_end = |t: &mut Table| {
        t.set_position(Some(next));
        next += 1;
    };
    let runtimes = table_at(doc, &path)?;
    if needs_runc {
        let mut runc = Table::new();
        at_end(&mut runc);
        runc["runtime_type"] = value("io.containerd.runc.v2");
        runc.decor_mut().set_prefix(format!(
            "\n# runc, {MARK}: naming any runtime replaces containerd 1.x's built-in list.\n"
        ));
        runtimes.insert("runc", Item::Table(runc));
    }
    let isola = runtimes.entry(HANDLER).or_insert_with(|| {
        let mut t = Table::new();
        at_end(&mut t);
        t.decor_mut()
            .set_prefix(format!("\n# isola's runtime ({RUNTIME_TYPE}), {MARK}.\n"));
        Item::Table(t)
    });
    let isola = isola
        .as_table_mut()
        .context("the `isola` runtime is not a table: edit it by hand")?;
    if isola.get("runtime_type").and_then(Item::as_str) != Some(RUNTIME_TYPE) {
        isola["runtime_type"] = value(RUNTIME_TYPE);
    }
    for key in ["pod_annotations", "container_annotations"] {
        let has = isola
            .get(key)
            .and_then(Item::as_array)
            .is_some_and(|a| a.iter().any(|v| v.as_str() == Some(ANNOTATIONS)));
        if !has {
            isola[key] = annotations();
        }
    }
    Ok(doc.to_string() != before)
}

/// The highest document position of `table` and the tables below it.
fn last_position(table: &Table) -> isize {
    table
        .iter()
        .filter_map(|(_, item)| item.as_table())
        .map(|t| t.position().unwrap_or(0).max(last_position(t)))
        .fold(table.position().unwrap_or(0), isize::max)
}

/// Takes isola's runtime out (and the `runc` table this command added);
/// whether anything changed.
fn remove(doc: &mut DocumentMut, version: i64) -> Result<bool> {
    let path = runtimes_path(version);
    let mut changed = false;
    let Ok(runtimes) = table_at_existing(doc, &path) else {
        return Ok(false);
    };
    if runtimes.remove(HANDLER).is_some() {
        changed = true;
    }
    let ours = runtimes
        .get("runc")
        .and_then(Item::as_table)
        .and_then(|t| t.decor().prefix())
        .and_then(|p| p.as_str())
        .is_some_and(|p| p.contains(MARK));
    if ours {
        runtimes.remove("runc");
        changed = true;
    }
    Ok(changed)
}

/// The table at `path` if every step of it exists (nothing is made).
fn table_at_existing<'a>(doc: &'a mut DocumentMut, path: &[&str]) -> Result<&'a mut Table> {
    let mut table = doc.as_table_mut();
    for key in path {
        table = table
            .get_mut(key)
            .and_then(Item::as_table_mut)
            .with_context(|| format!("no `{key}` table"))?;
    }
    Ok(table)
}

/// Checks `config` with `containerd --config CONFIG config dump`: it must
/// load and (unless `want` is false) list isola's runtime type.
fn check_with(bin: &Path, config: &Path, want: bool) -> Result<bool> {
    let out = Command::new(bin)
        .arg("--config")
        .arg(config)
        .args(["config", "dump"])
        .output()
        .with_context(|| format!("running {} config dump", bin.display()))?;
    if !out.status.success() {
        bail!(
            "{} does not accept the edited config ({}): {}; nothing was written",
            bin.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let dump = String::from_utf8_lossy(&out.stdout);
    if want && !dump.contains(RUNTIME_TYPE) {
        bail!(
            "{} config dump does not list {RUNTIME_TYPE}: the config's CRI section may be \
             replaced by an import; nothing was written",
            bin.display()
        );
    }
    Ok(true)
}

/// A temporary file in `path`'s directory (the rename stays on its file
/// system).
fn temp_beside(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "config.toml".into());
    path.with_file_name(format!(".{name}.isola-{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Debian's /etc/containerd/config.toml (containerd 1.6 and 2.x
    /// packages).
    const DEBIAN: &str = "version = 2\n\n[plugins]\n  [plugins.\"io.containerd.grpc.v1.cri\"]\n    [plugins.\"io.containerd.grpc.v1.cri\".cni]\n      bin_dir = \"/usr/lib/cni\"\n      conf_dir = \"/etc/cni/net.d\"\n  [plugins.\"io.containerd.internal.v1.opt\"]\n    path = \"/var/lib/containerd/opt\"\n";

    /// The shape of `containerd config default` (2.x): version 3, a runc
    /// table, comments.
    const V3: &str = "version = 3\n# a comment the admin wrote\nroot = '/var/lib/containerd'\n\n[plugins]\n  [plugins.'io.containerd.cri.v1.runtime']\n    enable_selinux = false\n\n    [plugins.'io.containerd.cri.v1.runtime'.containerd]\n      default_runtime_name = 'runc'\n\n      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes]\n        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]\n          runtime_type = 'io.containerd.runc.v2'\n\n  [plugins.'io.containerd.gc.v1.scheduler']\n    pause_threshold = 0.02\n";

    fn edit(text: &str, f: fn(&mut DocumentMut, i64) -> Result<bool>) -> (String, bool) {
        let mut doc: DocumentMut = text.parse().unwrap();
        let v = config_version(&doc).unwrap();
        let changed = f(&mut doc, v).unwrap();
        (doc.to_string(), changed)
    }

    fn isola_of(text: &str, version: i64) -> toml::Table {
        let parsed: toml::Table = text.parse().unwrap();
        let mut t = &parsed;
        for key in runtimes_path(version).iter().chain([&HANDLER]) {
            t = t[*key].as_table().unwrap();
        }
        t.clone()
    }

    #[test]
    fn version_2_gets_isola_and_runc_and_remove_restores_every_byte() {
        let (added, changed) = edit(DEBIAN, add);
        assert!(changed);
        assert!(added.starts_with(DEBIAN), "the original changed:\n{added}");
        let isola = isola_of(&added, 2);
        assert_eq!(isola["runtime_type"].as_str(), Some(RUNTIME_TYPE));
        assert_eq!(
            isola["pod_annotations"].as_array().unwrap()[0].as_str(),
            Some(ANNOTATIONS)
        );
        assert!(added.contains(
            "[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\nruntime_type = \"io.containerd.runc.v2\""
        ), "{added}");
        // Again: nothing to do.
        assert_eq!(edit(&added, add), (added.clone(), false));
        let (removed, changed) = edit(&added, remove);
        assert!(changed);
        assert_eq!(removed, DEBIAN);
        assert_eq!(edit(DEBIAN, remove), (DEBIAN.to_string(), false));
    }

    #[test]
    fn version_3_keeps_comments_and_its_runc_and_remove_restores_every_byte() {
        let (added, changed) = edit(V3, add);
        assert!(changed);
        assert!(added.contains("# a comment the admin wrote"));
        assert_eq!(
            isola_of(&added, 3)["runtime_type"].as_str(),
            Some(RUNTIME_TYPE)
        );
        assert_eq!(added.matches(".runtimes.runc]").count(), 1, "{added}");
        let (removed, _) = edit(&added, remove);
        assert_eq!(removed, V3);
        // The admin's runc stays even if it were the only runtime.
        let (removed_twice, changed) = edit(&removed, remove);
        assert!(!changed);
        assert!(removed_twice.contains("runtimes.runc]"));
    }

    #[test]
    fn an_isola_table_of_the_admin_is_updated_in_place() {
        let text = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.isola]\n  runtime_type = \"io.containerd.kata.v2\"\n  privileged_without_host_devices = true\n";
        let (added, changed) = edit(text, add);
        assert!(changed);
        let isola = isola_of(&added, 2);
        assert_eq!(isola["runtime_type"].as_str(), Some(RUNTIME_TYPE));
        assert_eq!(
            isola["privileged_without_host_devices"].as_bool(),
            Some(true)
        );
        assert_eq!(added.matches("runtimes.runc]").count(), 1);
        assert!(!added.contains(MARK), "{added}");
    }

    #[test]
    fn no_runc_table_when_the_default_runtime_is_another() {
        let text = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  default_runtime_name = \"crun\"\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.crun]\n  runtime_type = \"io.containerd.runc.v2\"\n";
        let (added, _) = edit(text, add);
        assert!(!added.contains("runtimes.runc]"), "{added}");
    }

    #[test]
    fn configs_it_does_not_edit_are_refused_by_name() {
        let doc: DocumentMut = "root = \"/x\"\n".parse().unwrap();
        let err = config_version(&doc).unwrap_err().to_string();
        assert!(err.contains("no `version`"), "{err}");
        let doc: DocumentMut = "version = 1\n".parse().unwrap();
        assert!(config_version(&doc)
            .unwrap_err()
            .to_string()
            .contains("version 1"));
        let mut doc: DocumentMut = "version = 2\nplugins = 3\n".parse().unwrap();
        let err = add(&mut doc, 2).unwrap_err().to_string();
        assert!(err.contains("`plugins` is not a table"), "{err}");
    }

    #[test]
    fn the_format_follows_containerds_major_version() {
        assert_eq!(
            format_of_version("containerd github.com/containerd/containerd/v2 2.1.9+unknown \n"),
            Some(3)
        );
        assert_eq!(
            format_of_version(
                "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3\n"
            ),
            Some(2)
        );
        assert_eq!(format_of_version("something else"), None);
    }
}
