//! The single mapping from domain errors to gRPC statuses.

use tonic::{Code, Status};

use crate::{
    cascade::{CascadeError, Failed},
    engine::EngineError,
    images::ImageError,
    telemetry::untrusted,
};

/// A refused call: its status, and its image's correlation key when the call got as far as
/// naming the image (a stream item's answer carries it).
#[derive(Debug)]
pub struct Refused {
    pub key: Option<String>,
    pub status: Status,
}

impl From<Failed> for Refused {
    fn from(Failed { key, error }: Failed) -> Self {
        Self { key, status: error.into() }
    }
}

impl From<Refused> for Status {
    fn from(refused: Refused) -> Self {
        refused.status
    }
}

impl From<CascadeError> for Status {
    fn from(e: CascadeError) -> Self {
        match e {
            CascadeError::Invalid(p) => Status::invalid_argument(p.to_string()),
            CascadeError::Image(e) => image_status(e),
            CascadeError::Engine(e) => engine_status(e),
            // Passed through as the upstream answered it: the caller sees the same status either way.
            CascadeError::Upstream { code, message } => Status::new(Code::from_i32(code), message),
            // The upstream is up but broke the contract: asking again would not help, so not
            // UNAVAILABLE (which callers retry); the chain has logged and counted it.
            CascadeError::BrokenAnswer(e) => Status::internal(e.to_string()),
        }
    }
}

fn image_status(e: ImageError) -> Status {
    let code = match e {
        // The remote side failed, not the request's form: the caller may fix the URL's target.
        ImageError::Fetch { .. } => Code::FailedPrecondition,
        ImageError::FileNotAllowed(_) | ImageError::DestinationDenied { .. } => Code::PermissionDenied,
        ImageError::InvalidUrl { .. } | ImageError::TooLarge { .. } | ImageError::Decode(_) => Code::InvalidArgument,
    };
    Status::new(code, e.to_string())
}

fn engine_status(e: EngineError) -> Status {
    match e {
        EngineError::Overloaded(_) => Status::resource_exhausted(e.to_string()),
        EngineError::DeadlineExceeded => Status::deadline_exceeded(e.to_string()),
        EngineError::ShuttingDown => Status::unavailable(e.to_string()),
        EngineError::NotServed(_) => Status::unimplemented(e.to_string()),
        EngineError::Internal(msg) => {
            tracing::error!(msg = %untrusted(msg.as_bytes(), 2000), "internal error");
            Status::internal(msg)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{cascade::BrokenAnswer, images::DecodeError, validate::InvalidParam};

    #[test]
    fn each_error_kind_has_its_code() {
        let code = |e: CascadeError| Status::from(e).code();
        assert_eq!(code(InvalidParam { field: "top_p", reason: "x".into() }.into()), Code::InvalidArgument);
        assert_eq!(code(ImageError::Decode(DecodeError::Empty).into()), Code::InvalidArgument);
        assert_eq!(code(ImageError::Fetch { url: "u".into(), reason: "r".into() }.into()), Code::FailedPrecondition);
        assert_eq!(code(ImageError::DestinationDenied { url: "u".into() }.into()), Code::PermissionDenied);
        assert_eq!(code(EngineError::Overloaded("generate").into()), Code::ResourceExhausted);
        assert_eq!(code(EngineError::DeadlineExceeded.into()), Code::DeadlineExceeded);
        assert_eq!(code(EngineError::ShuttingDown.into()), Code::Unavailable);
        assert_eq!(code(EngineError::Internal("x".into()).into()), Code::Internal);
        let broken = BrokenAnswer::new("Rank", "duplicate_index", "caption 1 is scored twice");
        let status = Status::from(CascadeError::from(broken));
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "the Rank upstream's answer is invalid: caption 1 is scored twice");
    }
}
