//! One error type for the whole request path, and one code set for both protocols.
//!
//! Every [`Error`] carries an [`ErrorCode`] that knows its HTTP status, its gRPC status code
//! and a stable snake_case label (used in metrics and logs). Messages say what to fix and do
//! not leak internals.

use std::fmt;

/// The stable set of failure kinds that a client can see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Malformed request: bad JSON, wrong datatype, shape or element count.
    InvalidArgument,
    /// Unknown model, version or route.
    NotFound,
    /// The body or a tensor is larger than the configured limits.
    PayloadTooLarge,
    /// The tenant's quota or a queue bound is exhausted.
    ResourceExhausted,
    /// No capacity to meet the request now (server draining, no instance ready).
    Unavailable,
    /// The deadline passed, or cannot be met by any variant.
    DeadlineExceeded,
    /// Missing or wrong credentials.
    Unauthenticated,
    /// The tenant may not use this model.
    PermissionDenied,
    /// A bug or an engine failure; the message is generic.
    Internal,
    /// The request's Content-Type is not one the route reads.
    UnsupportedMediaType,
    /// The client did not send its request in time.
    RequestTimeout,
}

impl ErrorCode {
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidArgument => 400,
            ErrorCode::NotFound => 404,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::ResourceExhausted => 429,
            ErrorCode::Unavailable => 503,
            ErrorCode::DeadlineExceeded => 504,
            ErrorCode::Unauthenticated => 401,
            ErrorCode::PermissionDenied => 403,
            ErrorCode::Internal => 500,
            ErrorCode::UnsupportedMediaType => 415,
            ErrorCode::RequestTimeout => 408,
        }
    }

    /// gRPC status code number (`google.rpc.Code`).
    pub fn grpc_code(self) -> i32 {
        match self {
            ErrorCode::InvalidArgument => 3,
            ErrorCode::NotFound => 5,
            ErrorCode::PayloadTooLarge => 8, // RESOURCE_EXHAUSTED, as gRPC reports oversized messages
            ErrorCode::ResourceExhausted => 8,
            ErrorCode::Unavailable => 14,
            ErrorCode::DeadlineExceeded => 4,
            ErrorCode::Unauthenticated => 16,
            ErrorCode::PermissionDenied => 7,
            ErrorCode::Internal => 13,
            ErrorCode::UnsupportedMediaType => 3,
            ErrorCode::RequestTimeout => 4,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::NotFound => "not_found",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::ResourceExhausted => "resource_exhausted",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::DeadlineExceeded => "deadline_exceeded",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::Internal => "internal",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::RequestTimeout => "request_timeout",
        }
    }
}

/// An error with a code and a message meant for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub code: ErrorCode,
    pub message: String,
}

impl Error {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Error { code, message: message.into() }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::InvalidArgument, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::NotFound, message)
    }
    pub fn too_large(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::PayloadTooLarge, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::Unavailable, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::Internal, message)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T, E = Error> = std::result::Result<T, E>;
