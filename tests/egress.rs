//! The egress policy of image fetches against the real server, over gRPC: loopback in every
//! spelling is refused without a connection, an allowed sidecar is fetched, redirects are limited
//! and re-checked hop by hop, credentials in URLs are refused, proxy variables cannot route
//! around the policy, and refusals are counted. Every socket here is on loopback.

mod common;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::Duration,
};

use caption_cascade::pb::{self, cascade_client::CascadeClient};
use common::{channel, engine_args, scenes::draw_scene, server, start_server};
use rand::{rngs::StdRng, SeedableRng};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use tonic::{transport::Channel, Code};

/// A listener that only counts the connections it accepts (and drops them at once).
struct Recorder {
    addr: SocketAddr,
    seen: Arc<AtomicUsize>,
}

impl Recorder {
    async fn bind(ip: &str) -> Option<Self> {
        let listener = TcpListener::bind((ip, 0)).await.ok()?;
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let count = seen.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                drop(sock);
            }
        });
        Some(Self { addr, seen })
    }

    fn seen(&self) -> usize {
        self.seen.load(Ordering::SeqCst)
    }
}

/// A tiny HTTP server on `ip`: `/scene.png` answers the PNG, `/hop/N` redirects to
/// `/hop/N-1` and `/hop/0` answers the PNG, `/to/REST` redirects to `http://REST`, `/ftp`
/// redirects to an ftp:// URL; anything else is 404. Returns its address and the paths asked.
async fn http_server_on(ip: &str, png: Vec<u8>) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let asked = Arc::new(Mutex::new(Vec::new()));
    let log = asked.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let (png, log) = (png.clone(), log.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = sock.read(&mut buf).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]);
                let path = request.split_whitespace().nth(1).unwrap_or("/").to_string();
                log.lock().unwrap().push(path.clone());
                let redirect = |location: String| (format!("302 Found\r\nLocation: {location}"), Vec::new());
                let (status, body) = if path == "/scene.png" || path == "/hop/0" {
                    ("200 OK".to_string(), png)
                } else if let Some(n) = path.strip_prefix("/hop/").and_then(|n| n.parse::<u32>().ok()) {
                    redirect(format!("/hop/{}", n - 1))
                } else if let Some(rest) = path.strip_prefix("/to/") {
                    redirect(format!("http://{rest}"))
                } else if path == "/ftp" {
                    redirect(format!("ftp://{addr}/scene.png"))
                } else {
                    ("404 Not Found".to_string(), b"missing".to_vec())
                };
                let head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(&body).await;
            });
        }
    });
    (addr, asked)
}

async fn http_server(png: Vec<u8>) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    http_server_on("127.0.0.1", png).await
}

fn url_request(url: &str) -> pb::CaptionRequest {
    let params =
        pb::GenerationParams { num_candidates: Some(2), max_length: Some(8), seed: Some(1), ..Default::default() };
    pb::CaptionRequest {
        image: Some(pb::Image { source: Some(pb::image::Source::Url(url.to_string())) }),
        params: Some(params),
        top_k: Some(1),
        ..Default::default()
    }
}

async fn caption(ch: &Channel, url: &str) -> Result<pb::CaptionResponse, tonic::Status> {
    CascadeClient::new(ch.clone()).caption(url_request(url)).await.map(|r| r.into_inner())
}

/// The URL as the server's messages show it (parsed and serialised).
fn shown(url: &str) -> String {
    url::Url::parse(url).unwrap().to_string()
}

async fn expect_denied(ch: &Channel, url: &str) {
    let err = caption(ch, url).await.expect_err(url);
    assert_eq!(err.code(), Code::PermissionDenied, "{url}: {}", err.message());
    // The URL as sent and nothing else: no address it resolved to, no rule that matched.
    assert_eq!(err.message(), format!("image url {:?}: destination not allowed", shown(url)), "{url}");
}

/// The server these tests share that allows fetches from 127.0.0.1 alone, as a sidecar needs.
fn sidecar_server() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| start_server(engine_args(&["--fetch-allow", "127.0.0.1/32"])))
}

/// The value of the first sample line starting with `name`, 0 when there is none yet.
async fn scrape(addr: SocketAddr, name: &str) -> f64 {
    let text = reqwest::get(format!("http://{addr}/metrics")).await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn by_default_loopback_in_every_spelling_is_refused_without_a_connection_and_counted() {
    // A process of its own: its counters are this test's alone.
    let server = server(&[]).metrics().start().await;
    let ch = channel(server.addr()).await;
    assert_eq!(scrape(server.metrics(), "caption_fetch_denied_total").await, 0.0);
    let target = Recorder::bind("127.0.0.1").await.unwrap();
    let port = target.addr.port();
    let mut urls: Vec<String> =
        ["127.0.0.1", "localhost", "127.1", "2130706433", "0x7f000001", "0177.0.0.1", "[::ffff:127.0.0.1]"]
            .iter()
            .map(|host| format!("http://{host}:{port}/scene.png"))
            .collect();
    let v6 = Recorder::bind("::1").await;
    if let Some(v6) = &v6 {
        urls.push(format!("http://[::1]:{}/scene.png", v6.addr.port()));
    }
    for url in &urls {
        expect_denied(&ch, url).await;
    }
    // Give a connection that slipped through time to be accepted before counting.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(target.seen(), 0, "the server connected to a denied destination");
    assert_eq!(v6.map_or(0, |r| r.seen()), 0, "the server connected to [::1]");
    assert_eq!(scrape(server.metrics(), "caption_fetch_denied_total").await, urls.len() as f64);
}

#[tokio::test]
async fn an_allowed_sidecar_is_fetched_and_redirects_are_limited() {
    let scene = draw_scene(&mut StdRng::seed_from_u64(31));
    let (http, asked) = http_server(scene.png()).await;
    let ch = channel(sidecar_server()).await;

    let url = format!("http://{http}/scene.png");
    assert_eq!(caption(&ch, &url).await.expect("an allowed address is fetched").key, url);
    // A name resolving to an allowed address is as good as the address.
    let by_name = format!("http://localhost:{}/scene.png", http.port());
    caption(&ch, &by_name).await.expect("localhost resolves to the allowed 127.0.0.1");

    for hops in [2, 3] {
        let url = format!("http://{http}/hop/{hops}");
        caption(&ch, &url).await.unwrap_or_else(|e| panic!("{hops} redirects: {e:?}"));
    }
    asked.lock().unwrap().clear();
    let url = format!("http://{http}/hop/4");
    let err = caption(&ch, &url).await.expect_err("four redirects");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert_eq!(err.message(), format!("image url {url:?}: too many redirects (at most 3 are followed)"));
    assert_eq!(
        *asked.lock().unwrap(),
        ["/hop/4", "/hop/3", "/hop/2", "/hop/1"],
        "the fourth redirect was not followed"
    );

    let err = caption(&ch, &format!("http://{http}/ftp")).await.expect_err("a redirect to ftp://");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(err.message().ends_with(": redirected to a scheme other than http or https"), "{}", err.message());
    let err = caption(&ch, &format!("http://{http}/to/user:pw@{http}/scene.png")).await.expect_err("credentials");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(err.message().ends_with(": redirected to a URL with credentials"), "{}", err.message());
}

#[tokio::test]
async fn a_redirect_to_a_denied_address_is_refused_without_a_connection() {
    let scene = draw_scene(&mut StdRng::seed_from_u64(32));
    let (http, _) = http_server(scene.png()).await;
    let ch = channel(sidecar_server()).await;
    // 127.0.0.2 is loopback like the allowed 127.0.0.1, but not allowed.
    let mut targets = vec![Recorder::bind("127.0.0.2").await.expect("127.0.0.2 is loopback on Linux")];
    targets.extend(Recorder::bind("::1").await);
    for target in &targets {
        expect_denied(&ch, &format!("http://{http}/to/{}/scene.png", target.addr)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    for target in &targets {
        assert_eq!(target.seen(), 0, "the server followed a redirect to {}", target.addr);
    }
}

#[tokio::test]
async fn names_on_redirect_hops_are_checked_and_deny_beats_allow() {
    let target = Recorder::bind("127.0.0.1").await.unwrap();
    let scene = draw_scene(&mut StdRng::seed_from_u64(34));
    let (http, _) = http_server_on("127.0.0.2", scene.png()).await;
    let addr = start_server(engine_args(&["--fetch-allow", "127.0.0.0/8", "--fetch-deny", "127.0.0.1/32"]));
    let ch = channel(addr).await;
    caption(&ch, &format!("http://{http}/scene.png")).await.expect("127.0.0.2 is inside the allowed 127.0.0.0/8");
    expect_denied(&ch, &format!("http://{}/scene.png", target.addr)).await;
    // `localhost` resolves to the denied 127.0.0.1: the resolver refuses it on the redirect hop.
    expect_denied(&ch, &format!("http://{http}/to/localhost:{}/scene.png", target.addr.port())).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(target.seen(), 0, "the server connected to the denied 127.0.0.1");
}

#[tokio::test]
async fn credentials_in_the_url_are_refused_before_any_connection() {
    let target = Recorder::bind("127.0.0.1").await.unwrap();
    let ch = channel(sidecar_server()).await;
    for url in [
        format!("http://user:hunter2@{}/scene.png", target.addr),
        format!("http://user@{}/scene.png", target.addr),
        format!("http://:hunter2@{}/scene.png", target.addr),
    ] {
        let err = caption(&ch, &url).await.expect_err(&url);
        assert_eq!(err.code(), Code::InvalidArgument, "{url}: {}", err.message());
        assert!(err.message().contains("credentials in image URLs are not accepted"), "{}", err.message());
        assert!(!err.message().contains("hunter2") && !err.message().contains("user@"), "{}", err.message());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(target.seen(), 0, "the server connected with the credentials");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_variables_do_not_route_fetches_around_the_policy() {
    let proxy = Recorder::bind("127.0.0.1").await.unwrap();
    let scene = draw_scene(&mut StdRng::seed_from_u64(33));
    let (http, asked) = http_server(scene.png()).await;
    let proxy_url = format!("http://{}", proxy.addr);
    let mut command = server(&["--fetch-allow", "127.0.0.1/32"]);
    for var in ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"] {
        command = command.env(var, &proxy_url);
    }
    for var in ["NO_PROXY", "no_proxy"] {
        command = command.env_remove(var);
    }
    let server = command.start().await;
    let addr = server.addr();
    let ch = channel(addr).await;

    let url = format!("http://{http}/scene.png");
    let resp = caption(&ch, &url).await.expect("fetched directly");
    assert_eq!(resp.key, url);
    assert_eq!(*asked.lock().unwrap(), ["/scene.png"]);
    // Were the proxy used, it would also be how a denied destination could be reached.
    expect_denied(&ch, &format!("http://127.0.0.2:{}/scene.png", http.port())).await;
    assert_eq!(proxy.seen(), 0, "the fetch went through the proxy from the environment");
}
