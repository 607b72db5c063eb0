//! The one error type of the wire boundary.

/// Why bytes could not be encoded, opened or decoded. Every variant is a property
/// of the input or the buffer; none is a bug, and none is ever a panic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The output buffer is too small.
    #[error("output buffer too small: {needed} bytes needed")]
    BufferTooSmall {
        /// Bytes the encoding needed at the point it ran out.
        needed: usize,
    },
    /// Input ended in the middle of a field.
    #[error("input truncated")]
    Truncated,
    /// A field does not follow the format.
    #[error("malformed input: {0}")]
    Malformed(&'static str),
    /// A format version this build does not read.
    #[error("unsupported format version {0}")]
    UnsupportedFormat(u8),
    /// An id outside `[a-z0-9-]{1,32}`.
    #[error("invalid id: expected [a-z0-9-]{{1,32}}")]
    InvalidId,
    /// A key that is not 64 hex digits.
    #[error("invalid key: expected 64 hex digits")]
    InvalidKey,
    /// The AEAD tag does not verify: wrong key, forged or corrupted message.
    #[error("authentication failed: wrong key, forged or corrupted message")]
    AuthenticationFailed,
    /// A control message of another kind than the topic promises.
    #[error("control message of kind {0} where another kind was expected")]
    WrongControlKind(u8),
    /// A reading kind the signal table does not know, where one must be known.
    #[error("unknown reading kind {0}")]
    UnknownKind(u16),
    /// Larger than the format allows.
    #[error("too large: {len} where at most {max} is allowed")]
    TooLarge {
        /// The size found.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The operating system gave no randomness for a nonce.
    #[error("no randomness available for a nonce")]
    NoRandomness,
}
