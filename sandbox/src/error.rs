//! Errors of a sandbox: what kind (for the shim's errdefs mapping) and
//! where (sandbox, container, step), with the cause.

use std::fmt;

use isola_protocol::ttrpc;
use isola_protocol::ttrpc::Code;

/// What kind of failure, independent of where it happened. The agent's
/// ttrpc status codes map onto it one to one; the shim maps it onto
/// containerd's errdefs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No such container or process.
    NotFound,
    /// The id is taken.
    AlreadyExists,
    /// A field of the request is wrong; the message names it.
    InvalidArgument,
    /// The object is not in a state that allows the call.
    FailedPrecondition,
    /// The call did not finish in time.
    DeadlineExceeded,
    /// The agent does not implement the call.
    Unimplemented,
    /// The agent could not be reached (its connection failed).
    Unavailable,
    /// The sandbox is dead: its VMM or virtiofsd ended, or it was stopped.
    Dead,
    /// The guest failed doing what it was asked.
    Internal,
    /// A failure on the host (a file, a mount, a process).
    Host,
}

impl ErrorKind {
    /// The kind an agent's status code stands for.
    pub fn from_code(code: Code) -> ErrorKind {
        match code {
            Code::NOT_FOUND => ErrorKind::NotFound,
            Code::ALREADY_EXISTS => ErrorKind::AlreadyExists,
            Code::INVALID_ARGUMENT | Code::OUT_OF_RANGE => ErrorKind::InvalidArgument,
            Code::FAILED_PRECONDITION | Code::ABORTED => ErrorKind::FailedPrecondition,
            Code::DEADLINE_EXCEEDED => ErrorKind::DeadlineExceeded,
            Code::UNIMPLEMENTED => ErrorKind::Unimplemented,
            Code::UNAVAILABLE => ErrorKind::Unavailable,
            _ => ErrorKind::Internal,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not found",
            ErrorKind::AlreadyExists => "already exists",
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::FailedPrecondition => "failed precondition",
            ErrorKind::DeadlineExceeded => "deadline exceeded",
            ErrorKind::Unimplemented => "unimplemented",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Dead => "sandbox dead",
            ErrorKind::Internal => "internal",
            ErrorKind::Host => "host",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A sandbox operation's failure: its kind, the sandbox, the container if
/// any, the step that failed and why.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    sandbox: String,
    container: Option<String>,
    step: String,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// The result of this crate's operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error; `step` says what was being done ("mounting the rootfs").
    pub fn new(
        kind: ErrorKind,
        sandbox: &str,
        step: impl Into<String>,
        message: impl Into<String>,
    ) -> Error {
        Error {
            kind,
            sandbox: sandbox.to_string(),
            container: None,
            step: step.into(),
            message: message.into(),
            source: None,
        }
    }

    /// A host-side failure caused by `source`.
    pub fn host(
        sandbox: &str,
        step: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Error {
        let message = source.to_string();
        Error {
            source: Some(Box::new(source)),
            ..Error::new(ErrorKind::Host, sandbox, step, message)
        }
    }

    /// The failure of an agent call: a status reply keeps its code and
    /// message; any other ttrpc error means the agent was not reachable.
    /// (The ttrpc error is not kept as the source: its message is all it
    /// says, and its Debug form is noise in an error chain.)
    pub fn agent(sandbox: &str, step: impl Into<String>, err: ttrpc::Error) -> Error {
        let (kind, message) = match isola_protocol::status::code(&err) {
            Some(code) => (ErrorKind::from_code(code), agent_message(&err)),
            None => (
                ErrorKind::Unavailable,
                format!("agent connection: {}", agent_message(&err)),
            ),
        };
        Error::new(kind, sandbox, step, message)
    }

    /// The same error, naming `container`.
    pub fn in_container(mut self, container: &str) -> Error {
        self.container = Some(container.to_string());
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn sandbox(&self) -> &str {
        &self.sandbox
    }

    pub fn container(&self) -> Option<&str> {
        self.container.as_deref()
    }

    pub fn step(&self) -> &str {
        &self.step
    }

    /// The cause, without the sandbox, container and step.
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// Longest agent error message kept (the guest chooses its text).
pub const MAX_AGENT_MESSAGE: usize = 4096;

/// An agent error's message, cut at [`MAX_AGENT_MESSAGE`] bytes, its
/// control characters escaped: the guest is not trusted to keep it short,
/// and it ends up in errors, logs and an operator's terminal (a line
/// break or an escape sequence must not pass as it is).
pub fn agent_message(err: &ttrpc::Error) -> String {
    let raw = isola_protocol::status::message(err);
    let (kept, cut) = crate::log_gate::truncate(&raw, MAX_AGENT_MESSAGE);
    let mut message = String::with_capacity(kept.len());
    for c in kept.chars() {
        if c.is_control() {
            message.extend(c.escape_default());
        } else {
            message.push(c);
        }
    }
    if cut {
        message.push_str(&format!("... ({} bytes cut)", raw.len() - kept.len()));
    }
    message
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sandbox {}", self.sandbox)?;
        if let Some(container) = &self.container {
            write!(f, ", container {container}")?;
        }
        write!(f, ": {}: {} ({})", self.step, self.message, self.kind)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use isola_protocol::status;

    #[test]
    fn agent_codes_map_to_kinds() {
        let cases = [
            (Code::NOT_FOUND, ErrorKind::NotFound),
            (Code::ALREADY_EXISTS, ErrorKind::AlreadyExists),
            (Code::INVALID_ARGUMENT, ErrorKind::InvalidArgument),
            (Code::FAILED_PRECONDITION, ErrorKind::FailedPrecondition),
            (Code::DEADLINE_EXCEEDED, ErrorKind::DeadlineExceeded),
            (Code::UNIMPLEMENTED, ErrorKind::Unimplemented),
            (Code::UNAVAILABLE, ErrorKind::Unavailable),
            (Code::INTERNAL, ErrorKind::Internal),
            (Code::UNKNOWN, ErrorKind::Internal),
        ];
        for (code, kind) in cases {
            let err = Error::agent("sb", "starting", status::error(code, "why"));
            assert_eq!(err.kind(), kind, "{code:?}");
            assert_eq!(err.message(), "why");
        }
    }

    #[test]
    fn an_agent_message_cannot_break_a_line_or_drive_a_terminal() {
        let err = status::error(Code::INTERNAL, "bad\nnews \x1b[2J\tend é");
        assert_eq!(agent_message(&err), "bad\\nnews \\u{1b}[2J\\tend é");
    }

    #[test]
    fn long_agent_messages_are_cut() {
        let long = "é".repeat(MAX_AGENT_MESSAGE);
        let err = Error::agent("sb", "starting", status::error(Code::INTERNAL, &long));
        let kept = MAX_AGENT_MESSAGE / 2 * 2;
        assert!(err.message().starts_with(&long[..kept]));
        assert!(
            err.message()
                .ends_with(&format!("... ({} bytes cut)", long.len() - kept)),
            "{}",
            &err.message()[kept..]
        );
    }

    #[test]
    fn transport_failures_are_unavailable() {
        let err = Error::agent("sb", "StartContainer", ttrpc::Error::LocalClosed);
        assert_eq!(err.kind(), ErrorKind::Unavailable);
        assert!(err.message().starts_with("agent connection: "), "{err}");
    }

    #[test]
    fn display_names_sandbox_container_and_step() {
        let err = Error::agent(
            "pod1",
            "CreateContainer",
            status::error(Code::INVALID_ARGUMENT, "oci_spec_json: process.args: empty"),
        )
        .in_container("web");
        assert_eq!(
            err.to_string(),
            "sandbox pod1, container web: CreateContainer: oci_spec_json: process.args: empty \
             (invalid argument)"
        );
        assert_eq!(err.container(), Some("web"));
        assert_eq!(err.step(), "CreateContainer");
        let io = Error::host(
            "pod1",
            "creating the run dir",
            std::io::Error::other("disk full"),
        );
        assert_eq!(io.kind(), ErrorKind::Host);
        assert!(std::error::Error::source(&io).is_some());
        assert_eq!(
            io.to_string(),
            "sandbox pod1: creating the run dir: disk full (host)"
        );
    }
}
