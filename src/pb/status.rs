//! The structured details every status this server makes carries (`google.rpc.ErrorInfo` under the
//! API's domain, and `google.rpc.RetryInfo` where asking again can succeed), so that a caller
//! decides from the code and the reason, never from the message.

use std::{collections::HashMap, time::Duration};

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The `domain` of every ErrorInfo this server attaches: the API's proto package.
pub const DOMAIN: &str = "caption.v1";

/// A status with an ErrorInfo of `reason` (and `metadata`), plus a RetryInfo when `retry` is set:
/// only then may the caller expect the same request to succeed later.
pub fn detailed(
    code: Code,
    message: String,
    reason: &str,
    metadata: &[(&str, String)],
    retry: Option<Duration>,
) -> Status {
    let metadata: HashMap<String, String> = metadata.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    let mut details = ErrorDetails::with_error_info(reason, DOMAIN, metadata);
    if let Some(delay) = retry {
        details.set_retry_info(Some(delay));
    }
    Status::with_error_details(code, message, details)
}
