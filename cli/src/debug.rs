//! `isola debug SANDBOX [-- CMD...]`: a shell (or CMD) in a sandbox's
//! guest, in the guest's own namespaces, outside every container
//! (`isola_sandbox::debug`). Off unless the node's config says
//! `debug.console = true` (read here, and by the sandbox's runner when the
//! sandbox started: a sandbox started with it off refuses sessions). With
//! stdin and stdout on a terminal the session gets a pty (raw mode here,
//! window size changes follow), else pipes. Exits with the command's
//! status. The guest logs each session's start and end, with who asked,
//! in the agent's log (`isola logs`), the kept console and the runner's
//! log.

use std::io::IsTerminal;

use anyhow::{bail, Result};
use isola_sandbox::debug::{Session, SessionRequest};
use isola_sandbox::stdio::copy_output;
use tokio::io::AsyncWriteExt;

use crate::lookup::Found;
use crate::{tty, Signals};

/// Where the guest has the containers' root file systems.
pub const CONTAINERS_IN_GUEST: &str = "/run/isola/share/containers";

/// What `isola debug` was asked.
#[derive(Debug, Clone)]
pub struct Options {
    /// The command; empty: a shell.
    pub command: Vec<String>,
    /// Pipes even on a terminal.
    pub no_tty: bool,
}

/// Refuses when the node's config does not enable debug sessions.
pub fn check_enabled(config: &isola_sandbox::config::Config) -> Result<()> {
    if !config.debug.console {
        bail!(
            "debug sessions are off on this node: set `debug.console = true` in the [debug] \
             section of {} (a sandbox takes it when it starts; sandboxes started before keep \
             theirs off)",
            config.path.display()
        );
    }
    Ok(())
}

/// Who runs this, for the guest's log: user, uid, sudo's user, pid, tty.
pub fn who() -> String {
    let uid = nix::unistd::getuid();
    let user = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| "?".to_string());
    let mut who = format!("user={user} uid={uid} host_pid={}", std::process::id());
    if let Ok(sudo) = std::env::var("SUDO_USER") {
        who.push_str(&format!(" sudo_user={sudo}"));
    }
    if let Ok(tty) = nix::unistd::ttyname(std::io::stdin()) {
        who.push_str(&format!(" tty={}", tty.display()));
    }
    cut_to(who, WHO_BYTES)
}

/// The most bytes of `who` sent (the agent refuses more than 256).
const WHO_BYTES: usize = 200;

/// `text` cut to at most `max` bytes, on a character boundary.
fn cut_to(text: String, max: usize) -> String {
    isola_sandbox::log_gate::truncate(&text, max).0.to_string()
}

/// Runs the session; its exit status.
pub async fn run(found: &Found, options: &Options) -> Result<i32> {
    let terminal =
        !options.no_tty && std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let mut env = Vec::new();
    if terminal {
        env.push(format!(
            "TERM={}",
            std::env::var("TERM").unwrap_or_else(|_| "xterm".to_string())
        ));
    }
    let request = SessionRequest {
        args: options.command.clone(),
        env,
        terminal: terminal.then(tty::window_size),
        who: who(),
    };
    let mut signals = Signals::new()?;
    let mut session = Session::start(&found.id, &found.dir, &request).await?;
    if terminal && options.command.is_empty() {
        eprintln!(
            "isola: debug shell in sandbox {}'s guest, outside its containers (their root file \
             systems: {CONTAINERS_IN_GUEST}/<id>/rootfs); `exit` ends it",
            found.id
        );
    }
    let _raw = if terminal {
        tty::RawMode::enter()
    } else {
        None
    };
    if let Some(mut stdin) = session.io.stdin.take() {
        tokio::spawn(async move {
            let mut host = tokio::io::stdin();
            if let Err(err) = tokio::io::copy(&mut host, &mut stdin).await {
                tracing::debug!(%err, "stdin copy ended");
            }
            let _ = stdin.shutdown().await;
        });
    }
    let stdout = session.io.stdout.take();
    let stderr = session.io.stderr.take();
    let copy_out = async {
        if let Some(r) = stdout {
            if let (_, Err(err)) = copy_output(r, tokio::io::stdout()).await {
                tracing::debug!(%err, "stdout not fully delivered");
            }
        }
    };
    let copy_err = async {
        if let Some(r) = stderr {
            if let (_, Err(err)) = copy_output(r, tokio::io::stderr()).await {
                tracing::debug!(%err, "stderr not fully delivered");
            }
        }
    };
    let outputs = async { tokio::join!(copy_out, copy_err) };
    let wait = async { tokio::join!(session.wait(), outputs).0 };
    tokio::pin!(wait);
    loop {
        tokio::select! {
            status = &mut wait => return Ok(status?.status),
            sig = signals.next() => {
                if sig == libc::SIGWINCH {
                    if terminal {
                        if let Err(err) = session.resize(tty::window_size()).await {
                            tracing::debug!(%err, "resizing the terminal");
                        }
                    }
                } else if let Err(err) = session.signal(sig as u32).await {
                    tracing::warn!(%err, signal = sig, "forwarding a signal");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_is_refused_naming_the_switch_and_the_file() {
        let mut config = isola_sandbox::config::Config::defaults();
        let err = check_enabled(&config).expect_err("off by default");
        assert!(err.to_string().contains("debug.console = true"), "{err}");
        config.debug.console = true;
        assert!(check_enabled(&config).is_ok());
    }

    #[test]
    fn who_is_cut_by_bytes_on_a_character_boundary() {
        let long = "é".repeat(150);
        let cut = cut_to(long, WHO_BYTES);
        assert_eq!(cut.len(), WHO_BYTES);
        assert_eq!(cut_to("ab".to_string(), 1), "a");
        assert_eq!(cut_to("aé".to_string(), 2), "a");
    }

    #[test]
    fn who_names_the_user_and_the_pid() {
        let who = who();
        assert!(who.starts_with("user=") && who.contains(" uid="), "{who}");
        assert!(who.contains(&format!("host_pid={}", std::process::id())));
    }
}
