//! Fetching on its own: file:// confinement, URL checks, conditional fetches, the egress policy
//! and the few fixed words each kind of transport failure is told in.

use super::*;

fn fetcher(dir: Option<PathBuf>) -> Fetcher {
    Fetcher::new(FetchLimits { max_bytes: 16, allow_file_dir: dir, ..Default::default() }).unwrap()
}

#[tokio::test]
async fn file_urls_need_an_allowed_directory_and_stay_inside_it() {
    let dir = std::env::temp_dir().join(format!("cc-fetch-{}", std::process::id()));
    let inner = dir.join("inner");
    std::fs::create_dir_all(&inner).unwrap();
    std::fs::write(inner.join("a.bin"), b"hello").unwrap();
    std::fs::write(dir.join("secret.bin"), b"no").unwrap();
    std::fs::write(inner.join("big.bin"), [0u8; 64]).unwrap();
    let url = |p: &Path| Url::from_file_path(p).unwrap().to_string();

    let off = fetcher(None);
    assert!(matches!(off.fetch_str(&url(&inner.join("a.bin"))).await, Err(ImageError::FileNotAllowed(_))));

    let on = fetcher(Some(inner.clone()));
    assert_eq!(on.fetch_str(&url(&inner.join("a.bin"))).await.unwrap(), b"hello");
    let escape = format!("{}/../secret.bin", url(&inner));
    assert!(matches!(on.fetch_str(&escape).await, Err(ImageError::Fetch { .. })));
    assert!(matches!(on.fetch_str(&url(&inner.join("big.bin"))).await, Err(ImageError::TooLarge { limit: 16 })));
    assert!(matches!(on.fetch_str(&url(&inner.join("missing.bin"))).await, Err(ImageError::Fetch { .. })));
    // Missing, outside, a directory and a FIFO (which would block a reader forever) all get
    // the same answer, which names no server path.
    let fifo = inner.join("pipe");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let mut answers = Vec::new();
    for u in [url(&inner.join("missing.bin")), escape.clone(), url(&inner), url(&fifo)] {
        let err = tokio::time::timeout(Duration::from_secs(5), on.fetch_str(&u)).await.expect("no blocking read");
        let text = err.unwrap_err().to_string();
        answers.push(text.split_once(": ").map(|(_, reason)| reason.to_string()).unwrap_or(text));
    }
    assert!(answers.iter().all(|a| a == &answers[0]), "{answers:?}");
    assert!(!answers[0].contains(dir.to_str().unwrap()), "{}", answers[0]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn bad_urls_are_rejected_with_the_reason() {
    let f = fetcher(None);
    assert!(matches!(f.fetch_str("not a url").await, Err(ImageError::InvalidUrl { .. })));
    let err = f.fetch_str("ftp://example.com/a.png").await.unwrap_err();
    assert!(err.to_string().contains("\"ftp\" is not supported"), "{err}");
    assert!(f.check_inline(&[0u8; 17]).is_err());
    let huge = format!("http://example.com/{}", "a".repeat(100_000));
    let err = f.check_url(&huge).unwrap_err().to_string();
    assert!(err.len() < 400 && err.contains("over the limit of 8192"), "{err}");
    let hash = format!("sha256:{}", "ab".repeat(32));
    assert!(matches!(f.check_url(&hash), Err(ImageError::InvalidUrl { .. })), "a digest is not a URL");
    for creds in ["http://user:hunter2@example.com/a.png", "https://user@example.com/a.png", "http://:pw@h/"] {
        let err = f.check_url(creds).unwrap_err();
        assert!(matches!(err, ImageError::InvalidUrl { .. }), "{creds}: {err}");
        let text = err.to_string();
        assert!(text.contains("credentials in image URLs are not accepted"), "{text}");
        assert!(!text.contains("hunter2") && !text.contains("user@") && !text.contains("pw"), "{text}");
    }
}

/// A loopback listener that answers each connection with `reply` and counts them.
async fn answering(reply: &'static [u8]) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let _ = sock.read(&mut buf).await;
                let _ = sock.write_all(reply).await;
            });
        }
    });
    (addr, seen)
}

#[test]
fn only_validators_that_change_with_the_bytes_are_kept() {
    let url = Url::parse("http://example.com/a.png").unwrap();
    let of = |pairs: &[(&str, &str)]| {
        let mut headers = header::HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(name.parse::<header::HeaderName>().unwrap(), value.parse().unwrap());
        }
        Validators::of(&headers, &url).map(|v| (v.etag, v.last_modified))
    };
    let (lm, date) = ("Mon, 01 Jan 2024 00:00:00 GMT", "Mon, 01 Jan 2024 00:00:05 GMT");
    assert_eq!(of(&[("etag", "\"v1\"")]), Some((Some("\"v1\"".into()), None)));
    assert_eq!(of(&[("etag", "W/\"v1\"")]), None, "a weak ETag allows other bytes");
    assert_eq!(of(&[("etag", "v1")]), None, "not an entity tag");
    assert_eq!(of(&[("last-modified", lm), ("date", date)]), Some((None, Some(lm.into()))));
    assert_eq!(of(&[("last-modified", lm)]), None, "no Date: the second may not be over");
    assert_eq!(of(&[("last-modified", lm), ("date", lm)]), None, "changed within the second of the answer");
    assert_eq!(of(&[("last-modified", "yesterday"), ("date", date)]), None);
    let both = of(&[("etag", "\"v1\""), ("last-modified", lm), ("date", date)]);
    assert_eq!(both, Some((Some("\"v1\"".into()), Some(lm.into()))));
    assert_eq!(of(&[]), None);
}

#[tokio::test]
async fn conditional_fetches_send_the_validators_through_the_same_policy() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Answers 304 to `If-None-Match: "v1"`, else the image with ETag "v1"; keeps each request.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let requests = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let requests = requests.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let n = sock.read(&mut buf).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]).to_lowercase();
                let reply: &[u8] = if request.contains("if-none-match: \"v1\"\r\n") {
                    b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nConnection: close\r\n\r\n"
                } else {
                    b"HTTP/1.1 200 OK\r\nETag: \"v1\"\r\nContent-Length: 3\r\nConnection: close\r\n\r\nimg"
                };
                requests.lock().unwrap().push(request);
                let _ = sock.write_all(reply).await;
            });
        }
    });
    let url = format!("http://127.0.0.1:{}/a.png", addr.port());
    let allowed = Fetcher::new(FetchLimits {
        egress: EgressPolicy::new(vec!["127.0.0.1/32".parse().unwrap()], Vec::new(), false),
        ..Default::default()
    })
    .unwrap();
    let fresh = allowed.fetch(&allowed.check_url(&url).unwrap()).await.unwrap();
    assert_eq!(fresh.bytes, b"img");
    let validators = fresh.validators.expect("a strong ETag");
    assert_eq!((validators.etag.as_deref(), validators.final_url.as_str()), (Some("\"v1\""), url.as_str()));
    match allowed.fetch_if_changed(&allowed.check_url(&url).unwrap(), &validators).await.unwrap() {
        Conditional::NotModified { final_url } => assert_eq!(final_url, url),
        other => panic!("{other:?}"),
    }
    let older = Validators { etag: Some("\"v0\"".into()), ..validators.clone() };
    match allowed.fetch_if_changed(&allowed.check_url(&url).unwrap(), &older).await.unwrap() {
        Conditional::Changed(fetched) => assert_eq!(fetched.bytes, b"img"),
        other => panic!("{other:?}"),
    }
    let sent = seen.lock().unwrap().clone();
    assert_eq!(sent.len(), 3);
    assert!(!sent[0].contains("if-none-match") && !sent[0].contains("if-modified-since"), "{}", sent[0]);
    assert!(sent[2].contains("if-none-match: \"v0\"\r\n"), "{}", sent[2]);
    // The egress policy applies to conditional fetches as to any other.
    let strict = fetcher(None);
    let denied = strict.fetch_if_changed(&strict.check_url(&url).unwrap(), &validators).await.unwrap_err();
    assert!(matches!(denied, ImageError::DestinationDenied { .. }), "{denied}");
    assert_eq!(seen.lock().unwrap().len(), 3, "no connection was made");
}

#[tokio::test]
async fn denied_addresses_are_refused_before_any_connection_with_a_short_answer() {
    let (addr, seen) = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx").await;
    let port = addr.port();
    let f = fetcher(None);
    for host in ["127.0.0.1", "127.1", "2130706433", "0x7f000001", "0177.0.0.1", "[::ffff:127.0.0.1]", "localhost"] {
        let raw = format!("http://{host}:{port}/a.png");
        let err = f.fetch_str(&raw).await.unwrap_err();
        let shown = Url::parse(&raw).unwrap().to_string();
        assert_eq!(err, ImageError::DestinationDenied { url: shown.clone() }, "{raw}");
        assert_eq!(err.to_string(), format!("image url {shown:?}: destination not allowed"));
    }
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 0, "no connection was made");
    // The same server, allowed, is fetched: the refusals above were the policy's.
    let allowed = Fetcher::new(FetchLimits {
        egress: EgressPolicy::new(vec!["127.0.0.1/32".parse().unwrap()], Vec::new(), false),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(allowed.fetch_str(&format!("http://127.0.0.1:{port}/a.png")).await.unwrap(), b"x");
    assert_eq!(allowed.fetch_str(&format!("http://localhost:{port}/a.png")).await.unwrap(), b"x");
}

#[tokio::test]
async fn transport_failures_are_told_in_fixed_words() {
    let f = Fetcher::new(FetchLimits {
        egress: EgressPolicy::new(vec!["127.0.0.1/32".parse().unwrap()], Vec::new(), false),
        timeout: Duration::from_secs(5),
        ..Default::default()
    })
    .unwrap();
    let reason = |e: ImageError| match e {
        ImageError::Fetch { reason, .. } => reason,
        other => panic!("{other}"),
    };
    let (ssh, _) = answering(b"SSH-2.0-OpenSSH_9.6\r\n").await;
    assert_eq!(reason(f.fetch_str(&format!("http://{ssh}/")).await.unwrap_err()), "not a valid HTTP response");
    let (cut, _) = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort").await;
    assert_eq!(reason(f.fetch_str(&format!("http://{cut}/")).await.unwrap_err()), "connection closed early");
    let (silent, _) = answering(b"").await;
    assert_eq!(reason(f.fetch_str(&format!("http://{silent}/")).await.unwrap_err()), "connection closed early");
    // Closed without reading the request: the peer's kernel answers with a reset.
    let reset = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let reset_addr = reset.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((sock, _)) = reset.accept().await {
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(sock);
        }
    });
    assert_eq!(reason(f.fetch_str(&format!("http://{reset_addr}/")).await.unwrap_err()), "connection closed early");
    // Bound but never listening: the port stays held, and every connection to it is refused.
    let held = tokio::net::TcpSocket::new_v4().unwrap();
    held.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let closed = held.local_addr().unwrap();
    assert_eq!(reason(f.fetch_str(&format!("http://{closed}/")).await.unwrap_err()), "could not connect");
    let (tls, _) = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx").await;
    let err = reason(f.fetch_str(&format!("https://{tls}/")).await.unwrap_err());
    assert!(err == "TLS handshake failed", "{err}");
    let (missing, _) = answering(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n").await;
    assert_eq!(reason(f.fetch_str(&format!("http://{missing}/")).await.unwrap_err()), "server answered 404 Not Found");
}
