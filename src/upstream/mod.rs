//! The cascade tier's client of remote generators and rankers: client-side load balancing over
//! every address an endpoint resolves to, health-checked and re-resolved as pods come and go;
//! the caller's remaining deadline passed down, bounded by `--upstream-timeout`; answers
//! bounded in size by the request limits ([`limits`]); retries on UNAVAILABLE and
//! RESOURCE_EXHAUSTED under a retry budget with jittered backoff; the correlation key and the
//! trace context (`traceparent`) in metadata; and metrics. What an answer holds is checked by the chain, not here.

mod limits;
mod pool;
mod retry;
mod token;

use std::time::{Duration, Instant};

use metrics::{counter, histogram};
use tonic::{metadata::MetadataValue, transport::Channel, Code, Status};
use tracing::Instrument;

pub use limits::{AnswerBounds, CallLimits, DEFAULT_TIMEOUT};
pub use pool::{endpoint_url, Pool, UpstreamSpec};
use retry::RetryBudget;
pub use token::UpstreamToken;

use crate::{
    backend::RankScore,
    cascade::{BrokenAnswer, CascadeError, Chain, IndexedScore, UpstreamCall, Upstreams, GENERATE, RANK},
    engine::EngineError,
    pb::{self, KEY_HEADER},
    telemetry,
    validate::SentParams,
};

/// The Cascade use case over remote models.
pub type RemoteChain = Chain<RemoteUpstreams>;

pub struct RemoteUpstreams {
    generator: Pool,
    ranker: Pool,
    token: Option<UpstreamToken>,
    budget: RetryBudget,
    limits: CallLimits,
}

impl RemoteUpstreams {
    /// Starts watching both upstreams; calls wait for nothing, they fail over to what is healthy.
    pub fn start(
        generator: UpstreamSpec,
        ranker: UpstreamSpec,
        token: Option<UpstreamToken>,
        check_interval: Duration,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            generator: Pool::start("caption.v1.Generator", generator, check_interval),
            ranker: Pool::start("caption.v1.Ranker", ranker, check_interval),
            token,
            budget: RetryBudget::default(),
            limits: CallLimits::default(),
        })
    }

    /// These upstreams with answers and waits bounded as `limits` say.
    pub fn with_limits(mut self, limits: CallLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Whether the generator and the ranker each have a SERVING replica, as it changes.
    pub fn ready(&self) -> [tokio::sync::watch::Receiver<bool>; 2] {
        [self.generator.ready(), self.ranker.ready()]
    }

    /// One call with retries: `send` makes an attempt on the balanced channel with the request it
    /// is given (deadline and metadata already set).
    async fn call<M: Clone, T, F, Fut>(
        &self,
        pool: &Pool,
        service: &'static str,
        call: &UpstreamCall,
        message: M,
        send: F,
    ) -> Result<T, CascadeError>
    where
        F: Fn(Channel, tonic::Request<M>) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        self.budget.deposit();
        let (deadline, bounded_here) = call_deadline(call.deadline, Instant::now().checked_add(self.limits.timeout));
        let expired = || -> CascadeError {
            if bounded_here {
                let message = format!(
                    "the {service} upstream did not answer within --upstream-timeout ({} ms)",
                    self.limits.timeout.as_millis()
                );
                CascadeError::Upstream { code: Code::DeadlineExceeded as i32, message, details: Vec::new() }
            } else {
                EngineError::DeadlineExceeded.into()
            }
        };
        let mut attempt = 0u32;
        loop {
            let remaining = match deadline {
                Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    // An expired call never reaches the model.
                    _ => return Err(expired()),
                },
                None => None,
            };
            let mut request = tonic::Request::new(message.clone());
            if let Some(left) = remaining {
                request.set_timeout(left);
            }
            if let Ok(key) = MetadataValue::try_from(call.key.as_str()) {
                request.metadata_mut().insert(KEY_HEADER, key);
            }
            if let Some(token) = &self.token {
                request.metadata_mut().insert("authorization", token.header());
            }
            let started = Instant::now();
            // With no SERVING replica the balancer would wait for one until the deadline.
            let result = if pool.is_ready() {
                // Each attempt is a span of the call's trace, and the upstream's span its child.
                let span = tracing::info_span!("upstream", upstream = service, attempt = attempt + 1);
                telemetry::inject(&span, request.metadata_mut());
                send(pool.channel(), request).instrument(span).await
            } else {
                Err(Status::unavailable(format!("no {service} replica is serving")))
            };
            histogram!("caption_upstream_duration_seconds", "service" => service)
                .record(started.elapsed().as_secs_f64());
            let status = match result {
                // A connection that broke under the call (a replica killed) is the upstream being
                // unavailable; tonic reports it as UNKNOWN "transport error".
                Err(status) if status.code() == Code::Unknown && is_transport(&status) => {
                    Status::unavailable(format!("the connection to a {service} replica broke"))
                }
                Ok(out) => {
                    counter!("caption_upstream_requests_total", "service" => service, "code" => pb::code_name(Code::Ok)).increment(1);
                    return Ok(out);
                }
                Err(status) => status,
            };
            counter!("caption_upstream_requests_total", "service" => service, "code" => pb::code_name(status.code()))
                .increment(1);
            if is_too_large(&status) {
                // Asking again would bring the same answer.
                let detail = format!("larger than this tier's request limits allow: {}", status.message());
                return Err(BrokenAnswer::new(service, "too_large", detail).into());
            }
            if status.code() == Code::Unavailable {
                // A replica may have gone: look again now rather than at the next interval.
                pool.recheck();
            }
            // Generate and Rank change nothing, so a call cut off on a dead replica may run again.
            let retryable = matches!(status.code(), Code::Unavailable | Code::ResourceExhausted);
            attempt += 1;
            if retryable && attempt < retry::MAX_ATTEMPTS && self.budget.withdraw() {
                let pause = retry::backoff(attempt);
                let in_time = deadline.is_none_or(|d| Instant::now() + pause < d);
                if in_time {
                    counter!("caption_upstream_retries_total", "service" => service).increment(1);
                    tracing::debug!(key = %call.key, service, code = ?status.code(), attempt, "retrying upstream call");
                    tokio::time::sleep(pause).await;
                    continue;
                }
            }
            let past = deadline.is_some_and(|d| Instant::now() >= d);
            // tonic's client enforces the timeout it sends and calls it CANCELLED.
            if past && matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded) {
                return Err(expired());
            }
            return Err(CascadeError::Upstream {
                code: status.code() as i32,
                message: status.message().to_string(),
                details: status.details().to_vec(),
            });
        }
    }
}

/// When a call must end: the caller's deadline, or this tier's `bound` when that comes first (and
/// then `true`).
fn call_deadline(caller: Option<Instant>, bound: Option<Instant>) -> (Option<Instant>, bool) {
    match (caller, bound) {
        (Some(caller), Some(bound)) if bound < caller => (Some(bound), true),
        (None, Some(bound)) => (Some(bound), true),
        (caller, _) => (caller, false),
    }
}

/// Whether `status` is tonic's refusal of an answer longer than the client's decoding limit (read
/// from its length prefix, so the answer was never buffered whole).
fn is_too_large(status: &Status) -> bool {
    status.code() == Code::OutOfRange && status.message().starts_with("Error, decoded message length too large")
}

/// Whether `status` stands for a broken connection rather than an answer from the upstream.
fn is_transport(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.is::<tonic::transport::Error>() || e.is::<hyper::Error>() {
            return true;
        }
        source = e.source();
    }
    status.message() == "transport error"
}

impl Upstreams for RemoteUpstreams {
    async fn generate(&self, call: &UpstreamCall, params: &SentParams) -> Result<Vec<String>, CascadeError> {
        let message = pb::GenerateRequest {
            image: Some(pb::Image { source: Some(pb::image::Source::Data(call.image.to_vec())) }),
            params: Some(params.get().clone()),
        };
        let limit = self.limits.answers.generate;
        let out = self
            .call(&self.generator, GENERATE, call, message, |channel, request| async move {
                let mut client = pb::generator_client::GeneratorClient::new(channel)
                    .max_decoding_message_size(limit)
                    .max_encoding_message_size(usize::MAX);
                client.generate(request).await
            })
            .await?;
        Ok(out.into_inner().candidates.into_iter().map(|c| c.text).collect())
    }

    async fn rank(&self, call: &UpstreamCall, captions: Vec<String>) -> Result<Vec<IndexedScore>, CascadeError> {
        let message = pb::RankRequest {
            image: Some(pb::Image { source: Some(pb::image::Source::Data(call.image.to_vec())) }),
            captions,
        };
        let limit = self.limits.answers.rank;
        let out = self
            .call(&self.ranker, RANK, call, message, |channel, request| async move {
                let mut client = pb::ranker_client::RankerClient::new(channel)
                    .max_decoding_message_size(limit)
                    .max_encoding_message_size(usize::MAX);
                client.rank(request).await
            })
            .await?;
        let scored = |c: pb::RankedCaption| IndexedScore {
            index: c.index,
            score: RankScore { probability: c.probability, cosine: c.cosine, logit: c.logit },
        };
        Ok(out.into_inner().captions.into_iter().map(scored).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_ends_at_the_earlier_of_the_callers_deadline_and_the_tiers_bound() {
        let now = Instant::now();
        let (soon, later) = (now + Duration::from_secs(1), now + Duration::from_secs(30));
        assert_eq!(call_deadline(None, Some(later)), (Some(later), true));
        assert_eq!(call_deadline(Some(soon), Some(later)), (Some(soon), false));
        assert_eq!(call_deadline(Some(later), Some(soon)), (Some(soon), true));
        assert_eq!(call_deadline(Some(soon), None), (Some(soon), false));
        assert_eq!(call_deadline(None, None), (None, false));
    }

    #[test]
    fn only_tonics_decoding_limit_reads_as_an_answer_too_large() {
        let tonic =
            Status::out_of_range("Error, decoded message length too large: found 9 bytes, the limit is: 8 bytes");
        assert!(is_too_large(&tonic));
        assert!(!is_too_large(&Status::out_of_range("top_k: out of range")));
        assert!(!is_too_large(&Status::resource_exhausted("queue full")));
    }
}
