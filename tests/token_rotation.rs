//! Bearer tokens rotate without a restart. A server started with --auth-token-file follows the
//! file as it is replaced (the new token works, the old one is refused), holds two tokens (both
//! work), is emptied or deleted (every call but health refused, one warning per change, no token
//! in the log) and restored. A cascade tier follows its --upstream-token-file through a rotation
//! of its generator's and ranker's tokens without failing a call, and keeps its last good token
//! when its file is emptied. Files are replaced whole, as Kubernetes swaps a Secret's files.

mod common;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use caption_cascade::pb::{self, cascade_client::CascadeClient, ranker_client::RankerClient};
use common::{png_image, scenes::draw_scene, ServerProcess};
use rand::{rngs::StdRng, SeedableRng};
use tonic::{transport::Channel, Code};
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};

/// How often the servers here look at their files (the default is a second).
const RECHECK_MS: &str = "100";
/// How long a change may take to be seen: the interval, many times over on a loaded machine.
const WITHIN: Duration = Duration::from_secs(5);

/// A folder of token files, removed when dropped.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("cc-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// `name` replaced whole with `text` (written beside it, then renamed over it).
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let (path, next) = (self.0.join(name), self.0.join(format!(".{name}.next")));
        std::fs::write(&next, text).unwrap();
        std::fs::rename(&next, &path).unwrap();
        path
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn connect(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap()
}

fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    if let Some(token) = token {
        req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    req
}

/// What a Rank call carrying `token` gets.
async fn rank(ch: &Channel, token: Option<&str>) -> Code {
    let message = pb::RankRequest {
        image: png_image(draw_scene(&mut StdRng::seed_from_u64(3)).png()),
        captions: vec!["a red circle".into(), "a blue square".into()],
    };
    match RankerClient::new(ch.clone()).rank(with_token(message, token)).await {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// What a reflection call carrying `token` gets: the cheapest call a token guards.
async fn reflect(addr: SocketAddr, token: &str) -> Code {
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
        ServerReflectionRequest,
    };
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut client = ServerReflectionClient::new(connect(addr).await);
    let answer = match client.server_reflection_info(with_token(futures::stream::iter([req]), Some(token))).await {
        Ok(resp) => resp.into_inner().message().await.map(|_| ()),
        Err(status) => Err(status),
    };
    answer.map(|_| Code::Ok).unwrap_or_else(|s| s.code())
}

async fn health(ch: &Channel) -> Option<i32> {
    let resp = HealthClient::new(ch.clone()).check(HealthCheckRequest { service: String::new() }).await.ok()?;
    Some(resp.into_inner().status)
}

/// Polls `check` until it holds; fails the test after [`WITHIN`].
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < WITHIN, "{what}: not within {WITHIN:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_token_file_takes_effect_without_a_restart() {
    let (old, new, newer) = ("tok-alpha-7Qx", "tok-bravo-9Zk", "tok-charlie-3Mw");
    let dir = Dir::new("token-file");
    let file = dir.write("token", &format!("{old}\n"));
    let server = common::server(&["--services", "ranker", "--auth-token-file", path(&file)])
        .args(&["--file-recheck-ms", RECHECK_MS])
        .start()
        .await;
    let ch = connect(server.addr()).await;
    assert_eq!(rank(&ch, Some(old)).await, Code::Ok);
    assert_eq!(rank(&ch, Some(new)).await, Code::Unauthenticated);

    dir.write("token", &format!("{new}\n"));
    eventually("the new token is accepted", async || rank(&ch, Some(new)).await == Code::Ok).await;
    assert_eq!(rank(&ch, Some(old)).await, Code::Unauthenticated, "the replaced token still works");

    dir.write("token", &format!("\n  {old}  \n\n{new}\n"));
    eventually("the old token is accepted again", async || rank(&ch, Some(old)).await == Code::Ok).await;
    assert_eq!(rank(&ch, Some(new)).await, Code::Ok, "one token of two");

    let refuses_all = async |server: &ServerProcess, what: &str| {
        eventually(what, async || rank(&ch, Some(new)).await == Code::Unauthenticated).await;
        for token in [Some(old), Some(new), None] {
            assert_eq!(rank(&ch, token).await, Code::Unauthenticated, "{what}: {token:?}");
        }
        assert_eq!(health(&ch).await, Some(ServingStatus::Serving as i32), "{what}: health needs no token");
        assert!(server.log().contains("holds no valid token"), "{what}: no warning in the log");
    };
    dir.write("token", "");
    refuses_all(&server, "an emptied file").await;
    dir.write("token", &format!("{new}\n"));
    eventually("the restored token is accepted", async || rank(&ch, Some(new)).await == Code::Ok).await;
    std::fs::remove_file(&file).unwrap();
    refuses_all(&server, "a deleted file").await;
    dir.write("token", &format!("{newer}\n"));
    eventually("the recreated file's token is accepted", async || rank(&ch, Some(newer)).await == Code::Ok).await;
    assert_eq!(rank(&ch, Some(new)).await, Code::Unauthenticated);

    let log = server.log();
    assert_eq!(log.matches("holds no valid token").count(), 2, "one warning per bad change:\n{log}");
    for token in [old, new, newer] {
        assert!(!log.contains(token), "the log shows a token:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cascade_tier_follows_its_upstream_token_file_through_a_rotation() {
    let (old, new) = ("up-alpha-4Tn", "up-bravo-8Lp");
    let dir = Dir::new("upstream-token");
    let tiers_file = dir.write("tiers", &format!("{old}\n"));
    let cascade_file = dir.write("cascade", &format!("{old}\n"));
    let tier = |services: &str| {
        common::server(&["--services", services, "--auth-token-file", path(&tiers_file)])
            .args(&["--file-recheck-ms", RECHECK_MS])
            .env("RUST_LOG", "info")
            .spawn()
    };
    let (generator, ranker) = (tier("generator"), tier("ranker"));
    let (generator, ranker) = (generator.ready().await, ranker.ready().await);
    let tiers = [generator.addr(), ranker.addr()];
    let cascade = common::server(&[
        "--services",
        "cascade",
        "--generator-endpoint",
        &format!("http://{}", tiers[0]),
        "--ranker-endpoint",
        &format!("http://{}", tiers[1]),
        "--upstream-token-file",
        path(&cascade_file),
        "--upstream-check-interval-ms",
        "200",
        "--file-recheck-ms",
        RECHECK_MS,
    ])
    .env("RUST_LOG", "info")
    .start()
    .await;
    let mut client = CascadeClient::new(common::channel(cascade.addr()).await);
    let mut calls = 0;
    let mut caption = async || {
        calls += 1;
        let req = pb::CaptionRequest {
            image: png_image(draw_scene(&mut StdRng::seed_from_u64(calls)).png()),
            params: Some(pb::GenerationParams { num_candidates: Some(2), ..Default::default() }),
            top_k: Some(1),
            ..Default::default()
        };
        if let Err(status) = client.caption(req).await {
            panic!("call {calls} through the cascade failed: {status:?}");
        }
    };
    caption().await;
    let tiers_accept = async |token: &str| {
        let mut codes = Vec::new();
        for addr in tiers {
            codes.push(reflect(addr, token).await);
        }
        codes
    };
    let ok = vec![Code::Ok; 2];
    assert_eq!(tiers_accept(new).await, vec![Code::Unauthenticated; 2]);

    // The tiers accept both tokens, then the cascade sends the new one, then the tiers drop the old.
    dir.write("tiers", &format!("{old}\n{new}\n"));
    eventually("the tiers accept the new token", async || tiers_accept(new).await == ok).await;
    assert_eq!(tiers_accept(old).await, ok);
    caption().await;
    dir.write("cascade", &format!("{new}\n"));
    let reloaded = "upstream token file changed: reloaded";
    eventually("the cascade reads its new token", async || {
        caption().await;
        cascade.log().contains(reloaded)
    })
    .await;
    dir.write("tiers", &format!("{new}\n"));
    eventually("the tiers refuse the old token", async || tiers_accept(old).await == vec![Code::Unauthenticated; 2])
        .await;
    caption().await;

    // An emptied file keeps the last good token.
    dir.write("cascade", "");
    eventually("the cascade sees its file emptied", async || {
        caption().await;
        cascade.log().contains("still sending the last good one")
    })
    .await;
    caption().await;
    let log = cascade.log();
    assert!(!log.contains(old) && !log.contains(new), "the log shows a token:\n{log}");
    drop((generator, ranker));
}
