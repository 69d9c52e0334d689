//! What a caller can put in the server's log: a URL appears as scheme, host and path only (no
//! userinfo, query or fragment, even for a URL the server refused to fetch), no caller-supplied
//! character can start a log line or reach it as a control character, and the logged `key` is
//! always the one the server derived, a key sent in metadata being logged apart, escaped.

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

#[tokio::test]
async fn logs_carry_no_secret_and_no_caller_controlled_line() {
    let scene = draw_scene(&mut StdRng::seed_from_u64(3));
    let http = http_server(scene.png()).await;
    // Loopback may be fetched from 127.0.0.1 only: 127.0.0.2 stays denied by the egress policy.
    let process = server(&["--fetch-allow", "127.0.0.1/32"]).env("RUST_LOG", "info").env("NO_COLOR", "1").start().await;
    let ch = Channel::from_shared(format!("http://{}", process.addr())).unwrap().connect().await.unwrap();
    let mut cascade = CascadeClient::new(ch.clone());

    // A pre-signed URL, fetched and answered; the same with userinfo, which is refused.
    let port = http.port();
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
    let forged = "\n2026-01-01T00:00:00.000000Z  INFO caption_cascade::api::auth: FORGED admin token accepted\n";
    let odd = format!("http://127.0.0.2/a{forged}b\x1b[2J\x07\u{202e}.png");
    let err = cascade.caption(caption(url_image(&odd))).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = cascade.caption(caption(url_image(&format!("not a url{forged}\x1b[2J")))).await.unwrap_err();
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

    let log = process.log();
    for secret in ["PASSWORD123", "CREDENTIAL", "SIGNATURE", "TOKEN", "FRAGMENT", "alice"] {
        assert!(!log.contains(secret), "{secret} reached the log:\n{log}");
    }
    assert!(log.contains(&format!("key=http://127.0.0.1:{port}/scene.png}}")), "{log}");
    assert!(log.contains("key=http://127.0.0.2/img.png}"), "{log}");
    for line in log.lines() {
        assert!(!line.contains("FORGED admin") || line.contains("answered"), "a caller wrote a line:\n{line}");
        assert!(!line.starts_with("2026-01-01"), "a caller wrote a line:\n{line}");
        assert!(
            !line.chars().any(|c| c.is_control() || c == '\u{202e}'),
            "a control character reached the log:\n{line:?}"
        );
    }
    // The key a caller sends in metadata is logged apart, escaped; the key is the server's own.
    let lines = answered(&log);
    assert_eq!(lines.len(), 7, "{log}");
    let own = format!("key={}", generated.key);
    let by_metadata: Vec<_> = lines.iter().filter(|l| l.contains("sent_key=")).collect();
    assert_eq!(by_metadata.len(), 2, "{log}");
    assert!(by_metadata.iter().all(|l| l.contains(&own)), "the logged key is the digest of the bytes:\n{log}");
    assert!(by_metadata[0].contains(r"sent_key=FORGED-KEY http://evil/x?token=T\tend"), "{log}");
    assert!(by_metadata[1].contains(r"sent_key=k\xff\té"), "{log}");
}
