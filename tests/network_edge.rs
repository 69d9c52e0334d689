//! The network edge against the real server process, over real sockets on loopback: connection
//! limits and accept back-off, the first-request and idle timeouts, the drain on SIGTERM with
//! idle, half-open and stuck clients, exact status codes for deadlines and oversized messages,
//! TLS (reloaded, and mutual), the bearer token and where reflection is served.

mod common;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use bytes::Bytes;
use caption_cascade::pb::{self, cascade_client::CascadeClient};
use common::{png_image, scenes::draw_scene, server, ServerProcess};
use prost::Message;
use rand::{rngs::StdRng, SeedableRng};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tonic::{
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
    Code,
};
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
use tonic_types::StatusExt;

/// The server binary, its metrics on a port of their own.
struct Server {
    process: ServerProcess,
    addr: SocketAddr,
    metrics: SocketAddr,
}

impl Server {
    async fn spawn(args: &[&str]) -> Self {
        Self::of(server(args).metrics().start().await)
    }

    fn of(process: ServerProcess) -> Self {
        Self { addr: process.addr(), metrics: process.metrics(), process }
    }

    async fn ready(&self) -> Channel {
        common::channel(self.addr).await
    }

    async fn metric(&self, prefix: &str) -> f64 {
        let text = reqwest::get(format!("http://{}/metrics", self.metrics)).await.unwrap().text().await.unwrap();
        text.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
    }

    fn sigterm(&self) {
        let kill = Command::new("kill").args(["-TERM", &self.process.id().to_string()]).status().unwrap();
        assert!(kill.success());
    }

    /// Waits for the process to exit, for at most `within`.
    fn exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < within {
            if let Some(status) = self.process.child().try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// CPU seconds the process has used (user + system).
    fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.process.id())).unwrap();
        let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split_whitespace().collect();
        let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
        ticks / 100.0
    }
}

/// Whether the server closes `sock` (EOF or reset) within `within`; what it sends first is ignored.
async fn closed_within(sock: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let until = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(until, sock.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn scene_png() -> Vec<u8> {
    draw_scene(&mut StdRng::seed_from_u64(5)).png()
}

fn caption_request(params: pb::GenerationParams) -> pb::CaptionRequest {
    pb::CaptionRequest { image: png_image(scene_png()), params: Some(params), top_k: Some(1), ..Default::default() }
}

/// Enough decoding that the call is still running a while after it is sent.
fn slow_params() -> pb::GenerationParams {
    pb::GenerationParams { num_candidates: Some(32), max_length: Some(40), seed: Some(1), ..Default::default() }
}

/// A gRPC request's head for `path` on `addr`, as a bare HTTP/2 client sends it.
fn grpc_request(addr: SocketAddr, path: &str) -> http::request::Builder {
    http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
}

/// `message` as one gRPC length-prefixed frame.
fn grpc_frame(message: &[u8]) -> Bytes {
    let mut body = vec![0u8];
    body.extend_from_slice(&(message.len() as u32).to_be_bytes());
    body.extend_from_slice(message);
    Bytes::from(body)
}

/// A gRPC call over a bare HTTP/2 connection, so what is seen is exactly what the server answered
/// (tonic's client would also enforce grpc-timeout itself, and answer CANCELLED first).
async fn raw_call(addr: SocketAddr, path: &str, message: &[u8], headers: &[(&str, &str)]) -> (Code, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let mut req = grpc_request(addr, path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let (response, mut send) = client.send_request(req.body(()).unwrap(), false).unwrap();
    send.send_data(grpc_frame(message), true).unwrap();
    let (parts, mut recv) = response.await.unwrap().into_parts();
    let status = |h: &http::HeaderMap| {
        let code = h.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
        let msg = h.get("grpc-message").map(|m| m.to_str().unwrap_or("").to_string()).unwrap_or_default();
        Some((Code::from_i32(code), msg))
    };
    if let Some(found) = status(&parts.headers) {
        return found;
    }
    while let Some(data) = recv.data().await {
        let data = data.unwrap();
        let _ = recv.flow_control().release_capacity(data.len());
    }
    let trailers = recv.trailers().await.unwrap().expect("trailers");
    status(&trailers).expect("grpc-status in the trailers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_closed_at_once_and_the_server_recovers() {
    let server = Server::spawn(&["--max-connections", "3"]).await;
    let ch = server.ready().await;
    drop(ch);
    // The readiness channel's connection may take a moment to be let go of.
    let start = Instant::now();
    while server.metric("caption_connections ").await > 0.0 {
        assert!(start.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(TcpStream::connect(server.addr).await.unwrap());
    }
    while server.metric("caption_connections ").await < 3.0 {
        assert!(start.elapsed() < Duration::from_secs(5), "the idle connections were never counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut extra = TcpStream::connect(server.addr).await.unwrap();
    let asked = Instant::now();
    assert!(closed_within(&mut extra, Duration::from_secs(1)).await, "the fourth connection was kept waiting");
    println!("refused in {:?}", asked.elapsed());
    assert!(server.metric("caption_connections_rejected_total").await >= 1.0);
    drop(idle);
    let mut client = CascadeClient::new(server.ready().await);
    client.caption(caption_request(Default::default())).await.expect("served again once the idle ones left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_errors_back_off_instead_of_spinning() {
    // Few file descriptors, so queued connections make every accept fail with EMFILE.
    let process = server(&["--max-connections", "100000"]).metrics().wrapped_in(&["prlimit", "--nofile=200:200"]);
    let server = Server::of(process.start().await);
    let ch = server.ready().await;
    // Connect until the server's accepts fail. Its accept queue holds 128 connections, which a busy
    // machine can fill before the server takes them; a connect then times out while the server
    // still has file descriptors, so that ends a burst, not the connecting.
    let start = Instant::now();
    let mut socks = Vec::new();
    while server.metric("caption_accept_errors_total").await < 1.0 {
        assert!(start.elapsed() < Duration::from_secs(30), "accepts never failed; {} connections", socks.len());
        for _ in socks.len()..(socks.len() + 50).min(1000) {
            match tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(server.addr)).await {
                Ok(Ok(s)) => socks.push(s),
                _ => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = server.cpu_seconds();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = server.cpu_seconds() - before;
    println!("{} connections queued; server used {used:.2} CPU s in 2 s of failing accepts", socks.len());
    assert!(used < 0.5, "the accept loop spun: {used:.2} CPU s in 2 s");
    drop(socks);
    let mut client = CascadeClient::new(ch);
    let resp = client.caption(caption_request(Default::default())).await;
    assert!(resp.is_ok(), "served again once the connections left: {resp:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_preface_only_connections_are_closed_after_the_handshake_timeout() {
    let server = Server::spawn(&["--handshake-timeout-s", "1"]).await;
    server.ready().await;
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let mut preface = TcpStream::connect(server.addr).await.unwrap();
    preface.write_all(PREFACE).await.unwrap();
    // An empty SETTINGS frame: the preface is complete, yet no request follows.
    preface.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    let opened = Instant::now();
    assert!(closed_within(&mut silent, Duration::from_secs(3)).await, "a silent connection stayed open");
    assert!(closed_within(&mut preface, Duration::from_secs(3)).await, "a preface-only connection stayed open");
    assert!(opened.elapsed() >= Duration::from_millis(800), "closed before its timeout");
    assert!(server.metric(r#"caption_connections_closed_total{reason="handshake_timeout"}"#).await >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_calls_is_closed_after_the_idle_timeout() {
    let server = Server::spawn(&["--idle-timeout-s", "1"]).await;
    server.ready().await;
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    // One call, then nothing.
    let health = HealthCheckRequest { service: String::new() }.encode_to_vec();
    let mut client = client.ready().await.unwrap();
    let req = grpc_request(server.addr, "/grpc.health.v1.Health/Check").body(()).unwrap();
    let (resp, mut send) = client.send_request(req, false).unwrap();
    send.send_data(grpc_frame(&health), true).unwrap();
    let mut recv = resp.await.unwrap().into_body();
    while recv.data().await.is_some() {}
    let idle_from = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(4), conn).await;
    assert!(ended.is_ok(), "an idle connection was kept open");
    assert!(idle_from.elapsed() >= Duration::from_millis(800), "closed before its idle timeout");
    assert!(server.metric(r#"caption_connections_closed_total{reason="idle"}"#).await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_calls_and_exits_in_time_despite_idle_and_stuck_clients() {
    let mut server = Server::spawn(&["--drain-timeout-s", "4"]).await;
    let ch = server.ready().await;
    // An idle TCP connection, one that sent only the preface, and a call whose body never ends.
    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    let mut preface = TcpStream::connect(server.addr).await.unwrap();
    preface.write_all(PREFACE).await.unwrap();
    let (client, conn) = h2::client::handshake(TcpStream::connect(server.addr).await.unwrap()).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = grpc_request(server.addr, "/caption.v1.Cascade/Caption").body(()).unwrap();
    let (_stuck_response, mut stuck) = client.send_request(req, false).unwrap();
    stuck.send_data(Bytes::from_static(&[0, 0, 0, 0, 100, 1, 2, 3]), false).unwrap();
    // And a real call that is computing when the signal comes.
    let mut cascade = CascadeClient::new(ch);
    let call = tokio::spawn(async move { cascade.caption(caption_request(slow_params())).await });
    let start = Instant::now();
    while server.metric(r#"caption_inflight_requests{service="Caption"}"#).await < 1.0 {
        assert!(start.elapsed() < Duration::from_secs(10), "the call never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.sigterm();
    let signalled = Instant::now();
    assert!(closed_within(&mut idle, Duration::from_secs(2)).await, "an idle connection outlived the signal");
    assert!(closed_within(&mut preface, Duration::from_secs(2)).await, "a preface-only connection outlived the signal");
    let answer = call.await.unwrap();
    assert!(answer.is_ok(), "the in-flight call was not drained: {answer:?}");
    let status = tokio::task::spawn_blocking(move || {
        let status = server.exit(Duration::from_secs(8));
        (status, server)
    })
    .await
    .unwrap()
    .0
    .expect("the server was still running 8 s after SIGTERM");
    let took = signalled.elapsed();
    println!("exited {status} {took:?} after SIGTERM");
    assert!(status.success(), "exit status {status}");
    assert!(took < Duration::from_secs(6), "took {took:?}: past the 4 s drain period");
    drop(stuck);
}

/// An HTTP server whose every answer hangs: a fetch from it only ends at the caller's deadline.
async fn hanging_http_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_deadline_is_deadline_exceeded_wherever_it_expires() {
    let server = Server::spawn(&["--fetch-allow", "127.0.0.1/32"]).await;
    server.ready().await;
    let path = "/caption.v1.Cascade/Caption";
    // While computing: a deadline of a quarter of what the call takes without one.
    let computing = caption_request(slow_params()).encode_to_vec();
    let t = Instant::now();
    assert_eq!(raw_call(server.addr, path, &computing, &[]).await.0, Code::Ok);
    let quarter = (t.elapsed().as_millis() / 4).max(1).to_string() + "m";
    let t = Instant::now();
    let (code, msg) = raw_call(server.addr, path, &computing, &[("grpc-timeout", &quarter)]).await;
    assert_eq!(code, Code::DeadlineExceeded, "{msg}");
    println!("grpc-timeout {quarter}: DEADLINE_EXCEEDED after {:?}", t.elapsed());
    // While fetching.
    let hang = hanging_http_server().await;
    let fetching = pb::CaptionRequest {
        image: Some(pb::Image { source: Some(pb::image::Source::Url(format!("http://{hang}/a.png"))) }),
        ..Default::default()
    }
    .encode_to_vec();
    let (code, msg) = raw_call(server.addr, path, &fetching, &[("grpc-timeout", "300m")]).await;
    assert_eq!(code, Code::DeadlineExceeded, "{msg}");
    // Already expired on arrival.
    let (code, _) = raw_call(server.addr, path, &computing, &[("grpc-timeout", "0n")]).await;
    assert_eq!(code, Code::DeadlineExceeded);
    // A timeout too large to hold, or malformed, is no deadline rather than a crash.
    for bad in ["18446744073709551615S", "99999999H", "x", "1"] {
        let cheap = caption_request(pb::GenerationParams { num_candidates: Some(1), ..Default::default() });
        let (code, msg) = raw_call(server.addr, path, &cheap.encode_to_vec(), &[("grpc-timeout", bad)]).await;
        assert_eq!(code, Code::Ok, "grpc-timeout {bad}: {msg}");
    }
    let counted = server.metric(r#"caption_requests_total{service="Caption",code="DEADLINE_EXCEEDED"}"#).await;
    assert_eq!(counted, 3.0, "deadline expiries counted as such");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_limit_is_resource_exhausted() {
    let server = Server::spawn(&["--max-message-bytes", "4096"]).await;
    let mut client = CascadeClient::new(server.ready().await);
    let req = pb::CaptionRequest { image: png_image(vec![7u8; 100_000]), ..Default::default() };
    let err = client.caption(req).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("limit of 4096 bytes") && err.message().len() < 200, "{}", err.message());
    // The same code as a full server's, but the details say it is no use asking again.
    let details = err.get_error_details();
    let info = details.error_info().expect("an ErrorInfo");
    assert_eq!((info.reason.as_str(), info.domain.as_str()), ("MESSAGE_TOO_LARGE", "caption.v1"));
    assert_eq!(info.metadata["flag"], "--max-message-bytes");
    assert!(details.retry_info().is_none(), "{details:?}");
    // Under the limit the same service answers normally (here: the bytes are no image).
    let req = pb::CaptionRequest { image: png_image(vec![7u8; 1000]), ..Default::default() };
    assert_eq!(client.caption(req).await.unwrap_err().code(), Code::InvalidArgument);
}

/// A CA, and certificates it signs for 127.0.0.1 / localhost, written as PEM files.
struct Pki {
    dir: PathBuf,
    ca: rcgen::Issuer<'static, rcgen::KeyPair>,
    ca_pem: String,
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        let ca_pem = params.self_signed(&key).unwrap().pem();
        std::fs::create_dir_all(dir).unwrap();
        Self { dir: dir.to_path_buf(), ca: rcgen::Issuer::new(params, key), ca_pem }
    }

    /// (certificate PEM, key PEM) for a leaf this CA signs.
    fn leaf(&self, names: &[&str]) -> (String, String) {
        let params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        (params.signed_by(&key, &self.ca).unwrap().pem(), key.serialize_pem())
    }

    fn write(&self, name: &str, text: &str) -> String {
        let path = self.dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    }
}

async fn tls_channel(addr: SocketAddr, ca_pem: &str, identity: Option<(&str, &str)>) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem)).domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let endpoint =
        Channel::from_shared(format!("https://{addr}")).unwrap().tls_config(tls).map_err(|e| e.to_string())?;
    endpoint.connect().await.map_err(|e| format!("{e:?}"))
}

/// A health check through `ch` — the call that needs no token.
async fn healthy(ch: Channel) -> Result<(), Code> {
    let req = HealthCheckRequest { service: "caption.v1.Cascade".into() };
    HealthClient::new(ch).check(req).await.map(|_| ()).map_err(|s| s.code())
}

async fn tls_ready(addr: SocketAddr, ca_pem: &str) -> Channel {
    for _ in 0..600 {
        if let Ok(ch) = tls_channel(addr, ca_pem, None).await {
            if healthy(ch.clone()).await.is_ok() {
                return ch;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("TLS server at {addr} never became ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_encrypted_and_picks_up_renewed_files() {
    let dir = std::env::temp_dir().join(format!("cc-tls-{}", std::process::id()));
    let first = Pki::new(&dir, "first CA");
    let (cert, key) = first.leaf(&["localhost", "127.0.0.1"]);
    let (cert_path, key_path) = (first.write("tls.crt", &cert), first.write("tls.key", &key));
    let server = Server::spawn(&["--tls-cert", &cert_path, "--tls-key", &key_path]).await;
    let ch = tls_ready(server.addr, &first.ca_pem).await;
    let mut client = CascadeClient::new(ch);
    client.caption(caption_request(Default::default())).await.expect("a call over TLS");
    // Plaintext is not spoken on a TLS port.
    let plain = Channel::from_shared(format!("http://{}", server.addr)).unwrap().connect().await;
    if let Ok(plain) = plain {
        assert!(healthy(plain).await.is_err(), "a plaintext call succeeded on the TLS port");
    }
    // The certificate is renewed (by a new CA, so which one is served can be told apart).
    let second = Pki::new(&dir, "second CA");
    let (cert, key) = second.leaf(&["localhost", "127.0.0.1"]);
    second.write("tls.key", &key);
    second.write("tls.crt", &cert);
    let start = Instant::now();
    loop {
        let renewed = tls_channel(server.addr, &second.ca_pem, None).await;
        if let Ok(ch) = renewed {
            if healthy(ch).await.is_ok() {
                break;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the renewed certificate was never served");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let old = tls_channel(server.addr, &first.ca_pem, None).await;
    assert!(old.is_err() || healthy(old.unwrap()).await.is_err(), "the old certificate is still served");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_clients_without_a_certificate_from_the_ca() {
    let dir = std::env::temp_dir().join(format!("cc-mtls-{}", std::process::id()));
    let pki = Pki::new(&dir, "cluster CA");
    let (cert, key) = pki.leaf(&["localhost", "127.0.0.1"]);
    let args = [
        "--tls-cert".to_string(),
        pki.write("tls.crt", &cert),
        "--tls-key".to_string(),
        pki.write("tls.key", &key),
        "--tls-client-ca".to_string(),
        pki.write("ca.crt", &pki.ca_pem),
    ];
    let server = Server::spawn(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let (client_cert, client_key) = pki.leaf(&["client"]);
    let stranger = Pki::new(&dir.join("other"), "stranger CA");
    let (other_cert, other_key) = stranger.leaf(&["client"]);
    let mut ok = None;
    for _ in 0..600 {
        if let Ok(ch) = tls_channel(server.addr, &pki.ca_pem, Some((&client_cert, &client_key))).await {
            if healthy(ch.clone()).await.is_ok() {
                ok = Some(ch);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut client = CascadeClient::new(ok.expect("a client with a certificate from the CA is served"));
    client.caption(caption_request(Default::default())).await.expect("a call over mutual TLS");
    for identity in [None, Some((other_cert.as_str(), other_key.as_str()))] {
        let refused = match tls_channel(server.addr, &pki.ca_pem, identity).await {
            Err(_) => true,
            Ok(ch) => healthy(ch).await.is_err(),
        };
        assert!(refused, "a client without the CA's certificate was served");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_token_guards_every_service_but_health_which_probes_also_reach_apart() {
    let dir = std::env::temp_dir().join(format!("cc-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, "open-sesame\n").unwrap();
    let server =
        Server::of(server(&["--auth-token-file", token_file.to_str().unwrap()]).metrics().health().start().await);
    let probe = server.process.health();
    let ch = server.ready().await; // health needs no token
    let with = |token: &str| {
        let mut req = tonic::Request::new(caption_request(pb::GenerationParams {
            num_candidates: Some(2),
            ..Default::default()
        }));
        req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        req
    };
    let mut client = CascadeClient::new(ch.clone());
    let err = client.caption(caption_request(Default::default())).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert_eq!(client.caption(with("open-sesamE")).await.unwrap_err().code(), Code::Unauthenticated);
    client.caption(with("open-sesame")).await.expect("the right token is let through");
    let mut generator = pb::generator_client::GeneratorClient::new(ch.clone());
    let req = pb::GenerateRequest { image: png_image(scene_png()), params: None };
    assert_eq!(generator.generate(req).await.unwrap_err().code(), Code::Unauthenticated);
    assert_eq!(list_services(ch).await.unwrap_err(), Code::Unauthenticated, "reflection needs the token too");
    // The probe address answers health, and nothing else.
    let probe = Channel::from_shared(format!("http://{probe}")).unwrap().connect().await.unwrap();
    assert_eq!(healthy(probe.clone()).await, Ok(()));
    let err = CascadeClient::new(probe).caption(with("open-sesame")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    std::fs::remove_dir_all(&dir).unwrap();
}

async fn list_services(ch: Channel) -> Result<Vec<String>, Code> {
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
        server_reflection_response::MessageResponse, ServerReflectionRequest,
    };
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(ch)
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .map_err(|s| s.code())?
        .into_inner();
    match stream.message().await.map_err(|s| s.code())? {
        Some(resp) => match resp.message_response {
            Some(MessageResponse::ListServicesResponse(list)) => Ok(list.service.into_iter().map(|s| s.name).collect()),
            other => panic!("unexpected reflection answer {other:?}"),
        },
        None => Err(Code::Unknown),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_can_be_turned_off_or_served_on_its_own_address() {
    let off = Server::spawn(&["--no-reflection"]).await;
    assert_eq!(list_services(off.ready().await).await.unwrap_err(), Code::Unimplemented);
    let apart = Server::of(server(&[]).metrics().reflection().start().await);
    let side = apart.process.reflection();
    let main = apart.ready().await;
    assert_eq!(list_services(main).await.unwrap_err(), Code::Unimplemented);
    let names = list_services(Channel::from_shared(format!("http://{side}")).unwrap().connect().await.unwrap())
        .await
        .expect("reflection on its own address");
    assert!(names.iter().any(|n| n == "caption.v1.Cascade"), "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_answering_pings_is_disconnected() {
    let server =
        Server::spawn(&["--keepalive-interval-s", "1", "--keepalive-timeout-s", "1", "--idle-timeout-s", "60"]).await;
    server.ready().await;
    let baseline = Instant::now();
    while server.metric("caption_connections ").await > 0.0 {
        assert!(baseline.elapsed() < Duration::from_secs(5), "the readiness connection never went");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // One call, with the connection polled (so PINGs are answered) only until its answer.
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::pin!(conn);
    let mut client = client.ready().await.unwrap();
    let req = grpc_request(server.addr, "/grpc.health.v1.Health/Check").body(()).unwrap();
    let (resp, mut send) = client.send_request(req, false).unwrap();
    send.send_data(grpc_frame(&[]), true).unwrap();
    tokio::select! {
        r = resp => assert!(r.is_ok()),
        _ = &mut conn => panic!("the connection ended before the answer"),
    }
    assert_eq!(server.metric("caption_connections ").await, 1.0);
    // Now silent: the socket stays open but nothing answers the server's PINGs.
    let silent = Instant::now();
    while server.metric("caption_connections ").await > 0.0 {
        assert!(silent.elapsed() < Duration::from_secs(6), "a peer that answers no PING was kept");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // `conn`, never polled again, held the socket open until here.
    assert!(silent.elapsed() >= Duration::from_millis(900), "closed before a PING could go unanswered");
}
