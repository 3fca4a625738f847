//! The API's errors: ttrpc statuses whose code the host maps (the shim to
//! containerd's errdefs) and whose message names the field or object.

pub use ttrpc::Code;

/// An error reply with `code` and `message`.
pub fn error(code: Code, message: impl ToString) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message))
}

/// The status code of an error reply; `None` for errors that are not a
/// reply (the connection failed, the call timed out, ...).
pub fn code(err: &ttrpc::Error) -> Option<Code> {
    match err {
        ttrpc::Error::RpcStatus(status) => Some(status.code()),
        _ => None,
    }
}

/// The message of an error reply, or the error itself as text.
pub fn message(err: &ttrpc::Error) -> String {
    match err {
        ttrpc::Error::RpcStatus(status) => status.message().to_string(),
        other => other.to_string(),
    }
}

/// The longest id (sandbox, container, exec).
pub const MAX_ID_LEN: usize = 64;

/// Checks an id: 1 to [`MAX_ID_LEN`] characters of `[A-Za-z0-9_.-]`,
/// starting with a letter or digit (so it is a safe path component and
/// cgroup name). The error is an `INVALID_ARGUMENT` naming `field`.
pub fn check_id(field: &str, id: &str) -> Result<(), ttrpc::Error> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(error(
            Code::INVALID_ARGUMENT,
            format!(
                "{field}: {id:?} is not an id (1 to {MAX_ID_LEN} of [A-Za-z0-9_.-], \
                 starting with a letter or digit)"
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_messages_survive_the_wire_type() {
        let err = error(Code::NOT_FOUND, "container \"web\" not found");
        assert_eq!(code(&err), Some(Code::NOT_FOUND));
        assert_eq!(message(&err), "container \"web\" not found");
        let local = ttrpc::Error::LocalClosed;
        assert_eq!(code(&local), None);
        assert!(!message(&local).is_empty());
    }

    #[test]
    fn ids() {
        for good in ["a", "web-1", "0123456789abcdef", "x.y_z", &"a".repeat(64)] {
            assert!(check_id("container_id", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-a",
            ".",
            "..",
            "a/b",
            "a b",
            "é",
            &"a".repeat(65),
            "../x",
        ] {
            let err = check_id("container_id", bad).err();
            let err = err.unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert_eq!(code(&err), Some(Code::INVALID_ARGUMENT));
            assert!(
                message(&err).starts_with("container_id: "),
                "{}",
                message(&err)
            );
        }
    }
}
