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
    /// `stats cachedump` with fewer than two numbers.
    #[error("CLIENT_ERROR bad command line")]
    StatsBadCommandLine,
    /// `stats cachedump` of a class of 64 or more.
    #[error("CLIENT_ERROR Illegal slab id")]
    IllegalSlabId,
    /// `cache_memlimit` below 8 (megabytes).
    #[error("MEMLIMIT_TOO_SMALL cannot set maxbytes to less than 8m")]
    MemlimitTooSmall,
    /// `cache_memlimit` above 1,000,000,000 (megabytes).
    #[error("MEMLIMIT_ADJUST_FAILED input value is megabytes not bytes")]
    MemlimitNotBytes,
    /// `mg` with 20 or more tokens.
    #[error("CLIENT_ERROR options flags are too long")]
    MetaFlagsAreTooLong,
    /// `ms`, `md`, `ma` with 20 or more tokens.
    #[error("CLIENT_ERROR options flags too long")]
    MetaFlagsTooLong,
    /// A meta flag given twice (mg, ms).
    #[error("CLIENT_ERROR duplicate flag")]
    MetaDuplicateFlag,
    /// An unknown meta flag (mg, ms).
    #[error("CLIENT_ERROR invalid flag")]
    MetaInvalidFlag,
    /// Any bad flag of `md` or `ma`.
    #[error("CLIENT_ERROR invalid or duplicate flag")]
    MetaInvalidOrDuplicateFlag,
    /// A bad number after `N`, `T`, `R` or `C`.
    #[error("CLIENT_ERROR bad token in command line format")]
    MetaBadToken,
    /// A `b` key that is not base64.
    #[error("CLIENT_ERROR error decoding key")]
    MetaKeyDecode,
    /// An `M` flag not of one character.
    #[error("CLIENT_ERROR incorrect length for M token")]
    MetaModeLength,
    /// A bad `J` number.
    #[error("CLIENT_ERROR invalid numeric initial value")]
    MetaInitial,
    /// A bad `D` number.
    #[error("CLIENT_ERROR invalid numeric delta value")]
    MetaDelta,
    /// An `O` token over 32 bytes.
    #[error("CLIENT_ERROR opaque token too long")]
    MetaOpaqueTooLong,
    /// An `ms` mode other than `E A P R S`.
    #[error("CLIENT_ERROR invalid mode for ms M token")]
    MetaInvalidSetMode,
    /// An `ma` mode other than `I + D -`.
    #[error("CLIENT_ERROR invalid mode for ma M token")]
    MetaInvalidArithMode,
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
            ClientError::StatsBadCommandLine => "CLIENT_ERROR bad command line",
            ClientError::IllegalSlabId => "CLIENT_ERROR Illegal slab id",
            ClientError::MemlimitTooSmall => {
                "MEMLIMIT_TOO_SMALL cannot set maxbytes to less than 8m"
            }
            ClientError::MemlimitNotBytes => {
                "MEMLIMIT_ADJUST_FAILED input value is megabytes not bytes"
            }
            ClientError::MetaFlagsAreTooLong => "CLIENT_ERROR options flags are too long",
            ClientError::MetaFlagsTooLong => "CLIENT_ERROR options flags too long",
            ClientError::MetaDuplicateFlag => "CLIENT_ERROR duplicate flag",
            ClientError::MetaInvalidFlag => "CLIENT_ERROR invalid flag",
            ClientError::MetaInvalidOrDuplicateFlag => "CLIENT_ERROR invalid or duplicate flag",
            ClientError::MetaBadToken => "CLIENT_ERROR bad token in command line format",
            ClientError::MetaKeyDecode => "CLIENT_ERROR error decoding key",
            ClientError::MetaModeLength => "CLIENT_ERROR incorrect length for M token",
            ClientError::MetaInitial => "CLIENT_ERROR invalid numeric initial value",
            ClientError::MetaDelta => "CLIENT_ERROR invalid numeric delta value",
            ClientError::MetaOpaqueTooLong => "CLIENT_ERROR opaque token too long",
            ClientError::MetaInvalidSetMode => "CLIENT_ERROR invalid mode for ms M token",
            ClientError::MetaInvalidArithMode => "CLIENT_ERROR invalid mode for ma M token",
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
        } else if line == "ERROR" {
            ErrorReply::Error
        } else {
            // memcached's own one-line answers (`MEMLIMIT_TOO_SMALL …`).
            return Response::Raw(format!("{line}\r\n").into());
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
            ClientError::StatsBadCommandLine,
            ClientError::IllegalSlabId,
            ClientError::MemlimitTooSmall,
            ClientError::MemlimitNotBytes,
            ClientError::MetaFlagsAreTooLong,
            ClientError::MetaFlagsTooLong,
            ClientError::MetaDuplicateFlag,
            ClientError::MetaInvalidFlag,
            ClientError::MetaInvalidOrDuplicateFlag,
            ClientError::MetaBadToken,
            ClientError::MetaKeyDecode,
            ClientError::MetaModeLength,
            ClientError::MetaInitial,
            ClientError::MetaDelta,
            ClientError::MetaOpaqueTooLong,
            ClientError::MetaInvalidSetMode,
            ClientError::MetaInvalidArithMode,
        ] {
            assert_eq!(e.to_string(), e.line());
        }
    }
}
