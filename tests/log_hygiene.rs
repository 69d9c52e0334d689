//! What a caller can put in the server's log: a URL appears as scheme, host and path only (no
//! userinfo, query or fragment, even for a URL the server refused to fetch), no caller-supplied
//! character can start a log line or reach it as a control character, and the logged `key` is
//! always the one the server derived, a key sent in metadata being logged apart, escaped. The same
//! holds in JSON (`--log-format json`): every line one object, every value escaped as in text.

mod common;

use caption_cascade::pb::{self, cascade_client::CascadeClient, generator_client::GeneratorClient};
use common::{http::http_server, scenes::draw_scene, server};
use rand::{rngs::StdRng, SeedableRng};
use tonic::{metadata::MetadataValue, transport::Channel, Code};

fn url_image(url: &str) -> Option<pb::Image> {
    Some(pb::Image { source: Some(pb::image::Source::Url(url.into())) })
}

fn caption(image: Option<pb::Image>) -> pb::CaptionRequest {
    let params = pb::GenerationParams { num_candidates: Some(2), max_length: Some(8), ..Default::default() };
    pb::CaptionRequest { image, params: Some(params), ..Default::default() }
}

/// The log lines of the calls answered so far: one `answered` line per call.
fn answered(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains("answered")).collect()
}

/// What a test learns from the hostile calls it sent: the port of the origin that served the
/// fetched image, and the key the server gave the image sent with a forged key.
struct Sent {
    port: u16,
    own_key: String,
}

/// Calls carrying secrets in URLs, line breaks and terminal escapes in URLs and in keys sent in
/// metadata: seven calls, each answered with one `answered` line.
async fn hostile_calls(process: &common::ServerProcess, http_port: u16) -> Sent {
    let ch = Channel::from_shared(format!("http://{}", process.addr())).unwrap().connect().await.unwrap();
    let mut cascade = CascadeClient::new(ch.clone());
    let scene = draw_scene(&mut StdRng::seed_from_u64(3));

    // A pre-signed URL, fetched and answered; the same with userinfo, which is refused.
    let port = http_port;
    let signed = format!(
        "http://127.0.0.1:{port}/scene.png?X-Amz-Credential=CREDENTIAL&X-Amz-Signature=SIGNATURE&token=TOKEN#FRAGMENT"
    );
    let answer = cascade.caption(caption(url_image(&signed))).await.unwrap().into_inner();
    assert_eq!(answer.key, signed, "the caller gets its own key back, as it sent it");
    let with_user = signed.replace("http://", "http://alice:PASSWORD123@");
    let err = cascade.caption(caption(url_image(&with_user))).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(!err.message().contains("PASSWORD123"), "{}", err.message());
    // The same secrets in a URL the egress policy refuses, after the URL check passed.
    let denied = "http://127.0.0.2/img.png?X-Amz-Signature=SIGNATURE2";
    let err = cascade.caption(caption(url_image(denied))).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // Line breaks and terminal escapes in a URL, in a refused URL and in a key sent in metadata.
    let odd = format!("http://127.0.0.2/a{FORGED}b\x1b[2J\x07\u{202e}.png");
    let err = cascade.caption(caption(url_image(&odd))).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = cascade.caption(caption(url_image(&format!("not a url{FORGED}\x1b[2J")))).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let mut request = tonic::Request::new(pb::GenerateRequest {
        image: common::png_image(scene.png()),
        params: Some(pb::GenerationParams { num_candidates: Some(1), max_length: Some(4), ..Default::default() }),
    });
    let sent = MetadataValue::try_from("FORGED-KEY http://evil/x?token=T\tend").unwrap();
    request.metadata_mut().insert(pb::KEY_HEADER, sent);
    let mut bytes = vec![b'k', 0xff, b'\t'];
    bytes.extend_from_slice("é".as_bytes());
    let generated = GeneratorClient::new(ch.clone()).generate(request).await.unwrap().into_inner();
    let mut request = tonic::Request::new(caption(common::png_image(scene.png())));
    request.metadata_mut().insert(pb::KEY_HEADER, MetadataValue::try_from(bytes.as_slice()).unwrap());
    cascade.caption(request).await.unwrap();
    Sent { port, own_key: generated.key }
}

/// A line a caller would like the log to show as the server's own.
const FORGED: &str = "\n2026-01-01T00:00:00.000000Z  INFO caption_cascade::api::auth: FORGED admin token accepted\n";
const SECRETS: [&str; 6] = ["PASSWORD123", "CREDENTIAL", "SIGNATURE", "TOKEN", "FRAGMENT", "alice"];

/// Neither a control character nor a bidirectional override, which would move the text around it.
fn moves_text(c: char) -> bool {
    c.is_control() || c == '\u{202e}'
}

#[tokio::test]
async fn logs_carry_no_secret_and_no_caller_controlled_line() {
    let scene = draw_scene(&mut StdRng::seed_from_u64(3));
    let http = http_server(scene.png()).await;
    // Loopback may be fetched from 127.0.0.1 only: 127.0.0.2 stays denied by the egress policy.
    // Stderr is a file and NO_COLOR is unset: the log has no escape sequence of its own either.
    let process =
        server(&["--fetch-allow", "127.0.0.1/32"]).env("RUST_LOG", "info").env_remove("NO_COLOR").start().await;
    let Sent { port, own_key } = hostile_calls(&process, http.port()).await;

    let log = process.log();
    for secret in SECRETS {
        assert!(!log.contains(secret), "{secret} reached the log:\n{log}");
    }
    assert!(log.contains(&format!("key=http://127.0.0.1:{port}/scene.png}}")), "{log}");
    assert!(log.contains("key=http://127.0.0.2/img.png}"), "{log}");
    for line in log.lines() {
        assert!(!line.contains("FORGED admin") || line.contains("answered"), "a caller wrote a line:\n{line}");
        assert!(!line.starts_with("2026-01-01"), "a caller wrote a line:\n{line}");
        assert!(!line.chars().any(moves_text), "a control character reached the log:\n{line:?}");
    }
    // The key a caller sends in metadata is logged apart, escaped; the key is the server's own.
    let lines = answered(&log);
    assert_eq!(lines.len(), 7, "{log}");
    let own = format!("key={own_key}");
    let by_metadata: Vec<_> = lines.iter().filter(|l| l.contains("sent_key=")).collect();
    assert_eq!(by_metadata.len(), 2, "{log}");
    assert!(by_metadata.iter().all(|l| l.contains(&own)), "the logged key is the digest of the bytes:\n{log}");
    assert!(by_metadata[0].contains(r"sent_key=FORGED-KEY http://evil/x?token=T\tend"), "{log}");
    assert!(by_metadata[1].contains(r"sent_key=k\xff\té"), "{log}");
    // Each of the call's fields once: the span holds service and the keys, the line the rest.
    for line in &lines {
        for field in ["service=", " key=", "sent_key=", "code=", "duration_ms="] {
            assert!(line.matches(field).count() <= 1, "{field} twice:\n{line}");
        }
    }
}

/// Every string a JSON value holds, however deep.
fn strings(value: &serde_json::Value) -> Vec<&str> {
    match value {
        serde_json::Value::String(s) => vec![s],
        serde_json::Value::Array(a) => a.iter().flat_map(strings).collect(),
        serde_json::Value::Object(o) => o.values().flat_map(strings).collect(),
        _ => vec![],
    }
}

#[tokio::test]
async fn json_logs_carry_no_secret_and_no_caller_controlled_line_or_field() {
    let scene = draw_scene(&mut StdRng::seed_from_u64(3));
    let http = http_server(scene.png()).await;
    let process = server(&["--fetch-allow", "127.0.0.1/32", "--log-format", "json"])
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .start()
        .await;
    let Sent { port, own_key } = hostile_calls(&process, http.port()).await;

    let log = process.log();
    for secret in SECRETS {
        assert!(!log.contains(secret), "{secret} reached the log:\n{log}");
    }
    let mut answered = Vec::new();
    for line in log.lines() {
        let entry: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("a line that is not one object ({e}):\n{line}"));
        assert!(!line.chars().any(moves_text), "a control character reached the log:\n{line:?}");
        // Decoded, the values still show caller text escaped as the text log does.
        for value in strings(&entry) {
            assert!(!value.chars().any(moves_text), "a control character in a field:\n{line}");
        }
        assert!(["INFO", "WARN", "ERROR"].contains(&entry["level"].as_str().unwrap()), "{line}");
        assert!(!entry["message"].as_str().unwrap().contains("FORGED"), "a caller wrote a message:\n{line}");
        assert!(!entry["time"].as_str().unwrap().starts_with("2026-01-01"), "{line}");
        if entry["message"] == "answered" {
            // Each of the call's fields once (a parser would keep the last of two silently).
            for field in ["\"service\":", "\"key\":", "\"sent_key\":", "\"code\":", "\"duration_ms\":"] {
                assert!(line.matches(field).count() <= 1, "{field} twice:\n{line}");
            }
            answered.push(entry);
        }
    }
    assert_eq!(answered.len(), 7, "{log}");
    for entry in &answered {
        assert!(entry["duration_ms"].is_u64(), "{entry}");
        assert!(["Caption", "Generate"].contains(&entry["service"].as_str().unwrap()), "{entry}");
    }
    let codes: Vec<_> = answered.iter().map(|e| e["code"].as_str().unwrap()).collect();
    assert_eq!(
        codes,
        ["OK", "INVALID_ARGUMENT", "PERMISSION_DENIED", "PERMISSION_DENIED", "INVALID_ARGUMENT", "OK", "OK"],
        "{log}"
    );
    assert_eq!(answered[0]["key"], format!("http://127.0.0.1:{port}/scene.png"), "the URL's label only");
    assert_eq!(answered[2]["key"], "http://127.0.0.2/img.png");
    let by_metadata: Vec<_> = answered.iter().filter(|e| e.get("sent_key").is_some()).collect();
    assert_eq!(by_metadata.len(), 2, "{log}");
    assert!(by_metadata.iter().all(|e| e["key"] == own_key.as_str()), "the key is the server's own:\n{log}");
    assert_eq!(by_metadata[0]["sent_key"], r"FORGED-KEY http://evil/x?token=T\tend");
    assert_eq!(by_metadata[1]["sent_key"], r"k\xff\té");
}
