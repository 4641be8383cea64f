//! Every error line memdial sends for bad client input, written once.

use super::{ErrorReply, Response};

/// A request memdial refuses, with memcached 1.6's own answer for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// Unknown command, or the wrong number of tokens for a known one.
    #[error("ERROR")]
    UnknownCommand,
    /// A malformed key or number on a command line.
    #[error("CLIENT_ERROR bad command line format")]
    BadCommandLine,
    /// `delete` with a trailing token other than `0` and `noreply`.
    #[error("CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]")]
    BadDeleteUsage,
    /// The data block did not end in `\r\n` where its declared length said.
    #[error("CLIENT_ERROR bad data chunk")]
    BadDataChunk,
    #[error("CLIENT_ERROR invalid exptime argument")]
    InvalidExptime,
    #[error("CLIENT_ERROR invalid numeric delta argument")]
    InvalidDelta,
    #[error("CLIENT_ERROR cannot increment or decrement non-numeric value")]
    NonNumeric,
    #[error("SERVER_ERROR object too large for cache")]
    TooLarge,
    /// A command line longer than the limit; the connection is closed.
    #[error("CLIENT_ERROR line too long")]
    LineTooLong,
    /// `stats detail` without a valid sub-command.
    #[error("CLIENT_ERROR usage: stats detail on|off|dump")]
    StatsDetailUsage,
}

impl ClientError {
    /// The reply line, without its `\r\n`.
    pub fn line(self) -> &'static str {
        match self {
            ClientError::UnknownCommand => "ERROR",
            ClientError::BadCommandLine => "CLIENT_ERROR bad command line format",
            ClientError::BadDeleteUsage => {
                "CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]"
            }
            ClientError::BadDataChunk => "CLIENT_ERROR bad data chunk",
            ClientError::InvalidExptime => "CLIENT_ERROR invalid exptime argument",
            ClientError::InvalidDelta => "CLIENT_ERROR invalid numeric delta argument",
            ClientError::NonNumeric => {
                "CLIENT_ERROR cannot increment or decrement non-numeric value"
            }
            ClientError::TooLarge => "SERVER_ERROR object too large for cache",
            ClientError::LineTooLong => "CLIENT_ERROR line too long",
            ClientError::StatsDetailUsage => "CLIENT_ERROR usage: stats detail on|off|dump",
        }
    }
}

impl From<ClientError> for Response {
    fn from(e: ClientError) -> Response {
        let line = e.line();
        let reply = if let Some(m) = line.strip_prefix("CLIENT_ERROR ") {
            ErrorReply::Client(m.to_string())
        } else if let Some(m) = line.strip_prefix("SERVER_ERROR ") {
            ErrorReply::Server(m.to_string())
        } else {
            ErrorReply::Error
        };
        Response::Error(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_the_wire_line() {
        for e in [
            ClientError::UnknownCommand,
            ClientError::BadCommandLine,
            ClientError::BadDeleteUsage,
            ClientError::BadDataChunk,
            ClientError::InvalidExptime,
            ClientError::InvalidDelta,
            ClientError::NonNumeric,
            ClientError::TooLarge,
            ClientError::LineTooLong,
            ClientError::StatsDetailUsage,
        ] {
            assert_eq!(e.to_string(), e.line());
        }
    }
}
