//! The single mapping from domain errors to gRPC statuses, with the structured details
//! (`google.rpc.ErrorInfo`, and `google.rpc.RetryInfo` where asking again can succeed) that let a
//! caller decide without reading the message. A request that does not decode never reaches a
//! handler: the codec answers it (`pb::Codec`, INVALID_ARGUMENT, reason `UNDECODABLE_REQUEST`).

use std::time::Duration;

use tonic::{Code, Status};

use crate::{
    cascade::{CascadeError, Failed},
    engine::EngineError,
    images::{DecodeError, ImageError},
    pb::{self, status::detailed},
    telemetry::untrusted,
};

pub use pb::status::DOMAIN;

/// How long a caller refused by a full server (admission or a model queue) should wait: about a
/// batch's time on the models, after which slots and queue places have turned over.
const BUSY_RETRY_DELAY: Duration = Duration::from_millis(100);
/// Open streams end when their caller is done with them, which is slower than a call.
const STREAMS_RETRY_DELAY: Duration = Duration::from_secs(1);
/// A draining server takes no new call; a new connection reaches another replica (or this one,
/// restarted) once the balancer has noticed.
const SHUTDOWN_RETRY_DELAY: Duration = Duration::from_millis(500);

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

fn flag(name: &str) -> (&'static str, String) {
    ("flag", name.to_string())
}

impl From<CascadeError> for Status {
    fn from(e: CascadeError) -> Self {
        match e {
            CascadeError::Invalid(p) => {
                let field = ("field", p.field.to_string());
                detailed(Code::InvalidArgument, p.to_string(), "INVALID_PARAM", &[field], None)
            }
            CascadeError::Image(e) => image_status(e),
            CascadeError::Engine(e) => engine_status(e),
            // Passed through as the upstream answered it, details included: the caller sees the
            // same status, and may retry the same way, in either topology.
            CascadeError::Upstream { code, message, details } => {
                Status::with_details(Code::from_i32(code), message, details.into())
            }
            // The upstream is up but broke the contract: asking again would not help, so not
            // UNAVAILABLE (which callers retry); the chain has logged and counted it.
            CascadeError::BrokenAnswer(e) => {
                let metadata = [("service", e.service.to_string()), ("check", e.reason.to_string())];
                detailed(Code::Internal, e.to_string(), "UPSTREAM_ANSWER_INVALID", &metadata, None)
            }
        }
    }
}

fn image_status(e: ImageError) -> Status {
    let (code, reason, metadata) = match &e {
        // The remote side failed, not the request's form: the caller may fix the URL's target.
        ImageError::Fetch { .. } => (Code::FailedPrecondition, "IMAGE_FETCH_FAILED", vec![]),
        ImageError::FileNotAllowed(_) => {
            (Code::PermissionDenied, "FILE_URL_NOT_ALLOWED", vec![flag("--allow-file-dir")])
        }
        ImageError::DestinationDenied { .. } => {
            (Code::PermissionDenied, "DESTINATION_DENIED", vec![flag("--fetch-allow")])
        }
        ImageError::InvalidUrl { .. } => (Code::InvalidArgument, "IMAGE_URL_INVALID", vec![]),
        ImageError::TooLarge { limit } => {
            (Code::InvalidArgument, "IMAGE_TOO_LARGE", vec![flag("--max-image-bytes"), ("limit", limit.to_string())])
        }
        ImageError::Decode(DecodeError::TooManyPixels { limit, .. }) => (
            Code::InvalidArgument,
            "IMAGE_TOO_MANY_PIXELS",
            vec![flag("--max-image-pixels"), ("limit", limit.to_string())],
        ),
        ImageError::Decode(DecodeError::TooDense { per_byte, .. }) => (
            Code::InvalidArgument,
            "IMAGE_TOO_DENSE",
            vec![flag("--max-image-pixels-per-byte"), ("limit", per_byte.to_string())],
        ),
        ImageError::Decode(_) => (Code::InvalidArgument, "IMAGE_UNDECODABLE", vec![]),
    };
    detailed(code, e.to_string(), reason, &metadata, None)
}

fn engine_status(e: EngineError) -> Status {
    let message = e.to_string();
    match e {
        // Admission (--max-inflight) is named "server"; the others are the models' queues.
        EngineError::Overloaded("server") => {
            detailed(Code::ResourceExhausted, message, "SERVER_BUSY", &[flag("--max-inflight")], Some(BUSY_RETRY_DELAY))
        }
        EngineError::Overloaded(queue) => detailed(
            Code::ResourceExhausted,
            message,
            "QUEUE_FULL",
            &[flag("--max-queue-size"), ("queue", queue.to_string())],
            Some(BUSY_RETRY_DELAY),
        ),
        EngineError::DeadlineExceeded => detailed(Code::DeadlineExceeded, message, "DEADLINE_EXCEEDED", &[], None),
        EngineError::ShuttingDown => {
            detailed(Code::Unavailable, message, "SHUTTING_DOWN", &[], Some(SHUTDOWN_RETRY_DELAY))
        }
        EngineError::NotServed(model) => detailed(
            Code::Unimplemented,
            message,
            "MODEL_NOT_SERVED",
            &[flag("--services"), ("model", model.to_string())],
            None,
        ),
        EngineError::Internal(msg) => {
            tracing::error!(msg = %untrusted(msg.as_bytes(), 2000), "internal error");
            detailed(Code::Internal, msg, "INFERENCE_FAILED", &[], None)
        }
    }
}

/// A request message over `--max-message-bytes`: the same message fails the same way however
/// often it is sent, so no RetryInfo.
pub fn message_too_large(len: u32, limit: usize) -> Status {
    let message = format!("request message of {len} bytes is over this server's limit of {limit} bytes");
    let metadata = [flag("--max-message-bytes"), ("limit", limit.to_string()), ("size", len.to_string())];
    detailed(Code::ResourceExhausted, message, "MESSAGE_TOO_LARGE", &metadata, None)
}

/// A CaptionStream refused because `limit` streams are open (`--max-open-streams`).
pub fn too_many_streams(limit: usize) -> Status {
    let message = format!("{limit} CaptionStreams are open, this server's limit (--max-open-streams): retry later");
    let metadata = [flag("--max-open-streams"), ("limit", limit.to_string())];
    detailed(Code::ResourceExhausted, message, "TOO_MANY_STREAMS", &metadata, Some(STREAMS_RETRY_DELAY))
}

/// A stream item's error: what a unary call would have returned, its details included.
pub fn stream_error(status: &Status) -> pb::google::rpc::Status {
    use prost::Message;
    // The details are our own encoding (or an upstream's, passed through); one that does not
    // decode is dropped rather than failing the answer.
    let details = pb::google::rpc::Status::decode(status.details()).map(|s| s.details).unwrap_or_default();
    pb::google::rpc::Status { code: status.code() as i32, message: status.message().to_string(), details }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use tonic_types::StatusExt;

    use super::*;
    use crate::{cascade::BrokenAnswer, validate::InvalidParam};

    /// The code, ErrorInfo reason, ErrorInfo metadata and RetryInfo delay a caller reads.
    fn read(status: &Status) -> (Code, String, HashMap<String, String>, Option<Duration>) {
        let details = status.check_error_details().expect("details decode");
        let info = details.error_info().expect("an ErrorInfo");
        assert_eq!(info.domain, DOMAIN);
        let retry = details.retry_info().map(|r| r.retry_delay.expect("a delay"));
        (status.code(), info.reason.clone(), info.metadata.clone(), retry)
    }

    fn of(e: impl Into<CascadeError>) -> Status {
        Status::from(e.into())
    }

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

    #[test]
    fn only_what_can_succeed_later_carries_a_retry_delay() {
        let (code, reason, meta, retry) = read(&of(EngineError::Overloaded("server")));
        assert_eq!(
            (code, reason.as_str(), meta["flag"].as_str()),
            (Code::ResourceExhausted, "SERVER_BUSY", "--max-inflight")
        );
        assert_eq!(retry, Some(BUSY_RETRY_DELAY));
        let (code, reason, meta, retry) = read(&of(EngineError::Overloaded("rank")));
        assert_eq!((code, reason.as_str(), meta["queue"].as_str()), (Code::ResourceExhausted, "QUEUE_FULL", "rank"));
        assert_eq!(meta["flag"], "--max-queue-size");
        assert!(retry.is_some());
        let (code, reason, meta, retry) = read(&too_many_streams(3));
        assert_eq!((code, reason.as_str(), meta["limit"].as_str()), (Code::ResourceExhausted, "TOO_MANY_STREAMS", "3"));
        assert_eq!(retry, Some(STREAMS_RETRY_DELAY));
        let (code, reason, _, retry) = read(&of(EngineError::ShuttingDown));
        assert_eq!((code, reason.as_str(), retry), (Code::Unavailable, "SHUTTING_DOWN", Some(SHUTDOWN_RETRY_DELAY)));

        // The same code as a full server, but the same message would be refused again.
        let (code, reason, meta, retry) = read(&message_too_large(9, 4));
        assert_eq!((code, reason.as_str(), retry), (Code::ResourceExhausted, "MESSAGE_TOO_LARGE", None));
        assert_eq!(
            (meta["flag"].as_str(), meta["limit"].as_str(), meta["size"].as_str()),
            ("--max-message-bytes", "4", "9")
        );

        let invalid = read(&of(InvalidParam { field: "top_p", reason: "x".into() }));
        assert_eq!((invalid.1.as_str(), invalid.2["field"].as_str(), invalid.3), ("INVALID_PARAM", "top_p", None));
        let denied = read(&of(ImageError::DestinationDenied { url: "u".into() }));
        assert_eq!(
            (denied.1.as_str(), denied.2["flag"].as_str(), denied.3),
            ("DESTINATION_DENIED", "--fetch-allow", None)
        );
        let pixels = read(&of(ImageError::Decode(DecodeError::TooManyPixels { width: 9, height: 9, limit: 80 })));
        assert_eq!((pixels.1.as_str(), pixels.2["limit"].as_str()), ("IMAGE_TOO_MANY_PIXELS", "80"));
        for e in [
            CascadeError::from(ImageError::Fetch { url: "u".into(), reason: "r".into() }),
            EngineError::DeadlineExceeded.into(),
            EngineError::Internal("x".into()).into(),
            BrokenAnswer::new("Rank", "duplicate_index", "twice").into(),
        ] {
            let status = Status::from(e);
            assert_eq!(read(&status).3, None, "{status:?}");
        }
    }

    #[test]
    fn an_upstreams_details_pass_through_the_cascade_tier_and_into_stream_items() {
        let upstream = of(EngineError::Overloaded("generate"));
        let passed = of(CascadeError::Upstream {
            code: upstream.code() as i32,
            message: upstream.message().to_string(),
            details: upstream.details().to_vec(),
        });
        assert_eq!(read(&passed), read(&upstream));

        let item = stream_error(&passed);
        assert_eq!((item.code, item.message.as_str()), (Code::ResourceExhausted as i32, upstream.message()));
        let mut urls: Vec<_> = item.details.iter().map(|a| a.type_url.as_str()).collect();
        urls.sort();
        assert_eq!(urls, ["type.googleapis.com/google.rpc.ErrorInfo", "type.googleapis.com/google.rpc.RetryInfo"]);
        // An upstream status without details stays without.
        assert!(stream_error(&Status::unavailable("gone")).details.is_empty());
    }
}
