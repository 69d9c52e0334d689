//! Where the bulk job's images are captioned: in-process with a bounded number at once, or by a
//! server over one CaptionStream call with the same bound on requests awaiting their answer.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
};

use tokio::{
    sync::{mpsc, Semaphore},
    task::JoinSet,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    transport::{Certificate, Channel, ClientTlsConfig},
    Code, Status,
};

use crate::{
    api::{convert, error::Refused, Captioning},
    engine::Admission,
    pb,
};

/// One image of the job, by its position in the list.
pub struct Job {
    pub seq: usize,
    pub name: String,
}

/// What every request of the job asks for.
#[derive(Clone)]
pub struct Shape {
    pub params: pb::GenerationParams,
    pub top_k: u32,
    pub each_candidate: bool,
}

pub struct Done {
    pub seq: usize,
    pub name: String,
    pub result: Result<Outcome, Failure>,
}

impl Done {
    pub fn failed(seq: usize, name: String, code: Code, message: String) -> Self {
        Self { seq, name, result: Err(Failure { key: None, code, message }) }
    }
}

pub struct Outcome {
    pub key: String,
    /// As the server sends them, so both paths report from the same form.
    pub captions: Vec<pb::RankedCaption>,
    pub candidates: Vec<String>,
    pub total_ms: f64,
}

impl From<pb::CaptionResponse> for Outcome {
    fn from(r: pb::CaptionResponse) -> Self {
        Self {
            key: r.key,
            captions: r.captions,
            candidates: r.candidates,
            total_ms: r.timings.map_or(0.0, |t| t.total_ms),
        }
    }
}

pub struct Failure {
    pub key: Option<String>,
    pub code: Code,
    pub message: String,
}

impl From<Status> for Failure {
    fn from(s: Status) -> Self {
        Self { key: None, code: s.code(), message: s.message().to_string() }
    }
}

#[derive(Clone)]
pub enum Target {
    /// The models in this process, answering exactly as a server's Cascade service does.
    Local(Captioning),
    Remote(Remote),
}

impl Target {
    /// Captions every job, sending each result on `tx` as it completes. An error means the
    /// remote stream was refused or ended early (its status); the jobs it left unanswered were
    /// not sent on `tx`.
    pub async fn run(
        self,
        jobs: Vec<Job>,
        shape: Shape,
        concurrency: usize,
        tx: mpsc::Sender<Done>,
    ) -> Result<(), Status> {
        match self {
            Target::Local(captioning) => {
                local(captioning, jobs, shape, concurrency, tx).await;
                Ok(())
            }
            Target::Remote(remote) => remote.run(jobs, shape, concurrency, tx).await,
        }
    }
}

async fn local(captioning: Captioning, jobs: Vec<Job>, shape: Shape, concurrency: usize, tx: mpsc::Sender<Done>) {
    let slots = Arc::new(Semaphore::new(concurrency));
    let mut running = JoinSet::new();
    for job in jobs {
        let slot = slots.clone().acquire_owned().await.expect("the semaphore is never closed");
        let (captioning, shape, tx) = (captioning.clone(), shape.clone(), tx.clone());
        running.spawn(async move {
            let result = caption_here(&captioning, &job.name, &shape).await;
            let _ = tx.send(Done { seq: job.seq, name: job.name, result }).await;
            drop(slot);
        });
        while running.try_join_next().is_some() {}
    }
    while running.join_next().await.is_some() {}
}

/// One job through the same validation and answer as a server's Caption call.
async fn caption_here(captioning: &Captioning, name: &str, shape: &Shape) -> Result<Outcome, Failure> {
    let image = Some(pb::Image { source: Some(source_of(name).await?) });
    let source = convert::image_source(image).map_err(|e| Failure::from(Status::invalid_argument(e.to_string())))?;
    let request = pb::CaptionRequest {
        image: None,
        params: Some(shape.params.clone()),
        top_k: Some(shape.top_k),
        each_candidate: shape.each_candidate,
    };
    let answer = captioning.caption(source, request, Admission::default()).await;
    answer.map(Outcome::from).map_err(|failed| {
        let Refused { key, status } = failed.into();
        Failure { key, code: status.code(), message: status.message().to_string() }
    })
}

/// Whether a job names a URL (sent as is) rather than a local path (read here).
pub fn is_url(name: &str) -> bool {
    ["http://", "https://", "file://"].iter().any(|s| name.starts_with(s))
}

/// A URL is sent as is (the one who fetches is whoever captions); a path is read here.
async fn source_of(name: &str) -> Result<pb::image::Source, Failure> {
    if is_url(name) {
        return Ok(pb::image::Source::Url(name.to_string()));
    }
    let bytes = tokio::fs::read(name).await.map_err(|e| Failure {
        key: None,
        code: Code::NotFound,
        message: format!("cannot read {name}: {e}"),
    })?;
    Ok(pb::image::Source::Data(bytes))
}

/// A server reached over one channel, with the token its calls carry.
#[derive(Clone)]
pub struct Remote {
    channel: Channel,
    endpoint: String,
    token: Option<String>,
}

impl Remote {
    pub async fn connect(endpoint: &str, ca: Option<&Path>, token_file: Option<&Path>) -> anyhow::Result<Self> {
        let url = crate::upstream::endpoint_url(endpoint, ca.is_some());
        let mut builder = Channel::from_shared(url).map_err(|e| anyhow::anyhow!("--endpoint {endpoint}: {e}"))?;
        if let Some(ca) = ca {
            let pem = std::fs::read(ca).map_err(|e| anyhow::anyhow!("--endpoint-ca {}: {e}", ca.display()))?;
            builder = builder
                .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
                .map_err(|e| anyhow::anyhow!("--endpoint-ca {}: {e}", ca.display()))?;
        }
        let token = match token_file {
            // A file a server also reads may hold several tokens during a rotation: the first is sent.
            Some(path) => {
                let fail = |e: String| anyhow::anyhow!("--endpoint-token-file {}: {e}", path.display());
                let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
                Some(crate::watched::tokens::parse(&bytes).map_err(fail)?[0].to_string())
            }
            None => None,
        };
        let channel = builder.connect().await.map_err(|e| anyhow::anyhow!("cannot connect to {endpoint}: {e}"))?;
        Ok(Self { channel, endpoint: endpoint.to_string(), token })
    }

    async fn run(self, jobs: Vec<Job>, shape: Shape, concurrency: usize, tx: mpsc::Sender<Done>) -> Result<(), Status> {
        let limit = crate::api::server::MAX_MESSAGE_BYTES;
        let mut client = pb::cascade_client::CascadeClient::new(self.channel)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);
        let (requests, outgoing) = mpsc::channel(concurrency);
        let mut call = tonic::Request::new(ReceiverStream::new(outgoing));
        if let Some(token) = &self.token {
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|_| Status::invalid_argument("the token is not a valid header value"))?;
            call.metadata_mut().insert("authorization", value);
        }
        // Requests sent and not yet answered, by id; at most `concurrency` of them.
        let pending: Arc<Mutex<HashMap<String, (usize, String)>>> = Arc::default();
        let slots = Arc::new(Semaphore::new(concurrency));
        let feeder = tokio::spawn(feed(jobs, shape, requests, pending.clone(), slots.clone(), tx.clone()));
        let answers = client.caption_stream(call).await;
        let mut answers = match answers {
            Ok(resp) => resp.into_inner(),
            Err(status) => {
                feeder.abort();
                return Err(Status::new(
                    status.code(),
                    format!("{} refused the stream: {}", self.endpoint, status.message()),
                ));
            }
        };
        let ended = loop {
            match answers.message().await {
                Ok(Some(answer)) => {
                    let Some((seq, name)) = pending.lock().expect("not poisoned").remove(&answer.id) else { continue };
                    slots.add_permits(1);
                    let result = match answer.result {
                        Some(pb::caption_stream_response::Result::Response(r)) => Ok(Outcome::from(r)),
                        Some(pb::caption_stream_response::Result::Error(e)) => Err(Failure {
                            key: Some(answer.key).filter(|k| !k.is_empty()),
                            code: Code::from_i32(e.code),
                            message: e.message,
                        }),
                        None => Err(Failure { key: None, code: Code::Internal, message: "empty answer".into() }),
                    };
                    let _ = tx.send(Done { seq, name, result }).await;
                }
                Ok(None) => break Ok(()),
                Err(status) => {
                    break Err(Status::new(status.code(), format!("the stream ended: {}", status.message())))
                }
            }
        };
        feeder.abort();
        ended
    }
}

/// Sends each job as a stream request once a slot is free; a file that cannot be read is
/// answered here, without a request.
async fn feed(
    jobs: Vec<Job>,
    shape: Shape,
    requests: mpsc::Sender<pb::CaptionStreamRequest>,
    pending: Arc<Mutex<HashMap<String, (usize, String)>>>,
    slots: Arc<Semaphore>,
    tx: mpsc::Sender<Done>,
) {
    for job in jobs {
        let slot = slots.acquire().await.expect("the semaphore is never closed");
        let source = match source_of(&job.name).await {
            Ok(source) => source,
            Err(failure) => {
                let _ = tx.send(Done { seq: job.seq, name: job.name, result: Err(failure) }).await;
                continue;
            }
        };
        // Given back when the answer arrives.
        slot.forget();
        let id = job.seq.to_string();
        pending.lock().expect("not poisoned").insert(id.clone(), (job.seq, job.name));
        let request = pb::CaptionRequest {
            image: Some(pb::Image { source: Some(source) }),
            params: Some(shape.params.clone()),
            top_k: Some(shape.top_k),
            each_candidate: shape.each_candidate,
        };
        if requests.send(pb::CaptionStreamRequest { id, request: Some(request) }).await.is_err() {
            return;
        }
    }
    // Dropping `requests` half-closes the stream: the server answers what it has, then ends it.
}
