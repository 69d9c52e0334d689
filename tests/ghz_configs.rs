//! The ghz load-test configs in bench/ghz/ work against the server as shipped: each is a ghz JSON
//! config (ghz's own field names and types), uses server reflection (no proto file), names a
//! method the running server's reflection lists, and its `data` payload — parsed as ghz parses it,
//! protobuf JSON against the descriptors reflection returns — is answered by a real call.
//!
//! ghz itself is not installed here: the call goes through Python's protobuf JSON parser and
//! grpcio (the .venv that `make test` sets up for tests/python_client.rs), with message classes
//! built from the reflected descriptors, as ghz builds its dynamic messages.
//!
//! The configs that send many different images hold scenes drawn here from fixed seeds, checked
//! image for image; `cargo test --test ghz_configs -- --ignored write_many_image_configs` writes
//! them again.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write,
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
};

use common::{channel, scenes::draw_scene};
use prost::Message;
use prost_types::{FileDescriptorProto, FileDescriptorSet};
use rand::{rngs::StdRng, SeedableRng};
use serde_json::Value;
use tonic::transport::Channel;
use tonic_reflection::pb::v1::{
    server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
    server_reflection_response::MessageResponse, ServerReflectionRequest,
};

/// Every key a ghz JSON config may have (the json tags of ghz's runner.Config), space-separated.
const GHZ_KEYS: &str = "\
    proto protoset call cacert cert key count-errors skipTLS skipFirst cname authority insecure total async \
    concurrency concurrency-schedule concurrency-start concurrency-end concurrency-step concurrency-step-duration \
    concurrency-max-duration connections rps duration duration-stop max-duration timeout data data-file \
    binary-file metadata metadata-file stream-interval stream-call-duration stream-call-count \
    stream-dynamic-messages output format connect-timeout keepalive cpus import-paths name tags reflect-metadata \
    debug host enable-compression load-schedule load-start load-end load-step load-step-duration load-max-duration \
    lb-strategy max-recv-message-size max-send-message-size disable-template-functions disable-template-data";
/// Keys whose values are Go durations ("500ms", "30s", "1m30s"), space-separated.
const DURATION_KEYS: &str = "\
    duration max-duration timeout connect-timeout keepalive stream-interval stream-call-duration \
    concurrency-step-duration concurrency-max-duration load-step-duration load-max-duration";
/// Keys whose values are non-negative integers, space-separated.
const COUNT_KEYS: &str = "\
    total concurrency connections rps skipFirst cpus concurrency-start concurrency-end stream-call-count \
    load-start load-end";
/// The unary methods the configs must cover, one config each.
const METHODS: &[&str] = &["caption.v1.Cascade/Caption", "caption.v1.Generator/Generate", "caption.v1.Ranker/Rank"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// bench/ghz/*.json, by file name.
fn configs() -> BTreeMap<String, Value> {
    let dir = root().join("bench/ghz");
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path).unwrap();
            let value: Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()));
            out.insert(path.file_name().unwrap().to_string_lossy().into_owned(), value);
        }
    }
    out
}

/// ghz's `call`, "pkg.Service.Method" or "pkg.Service/Method", as (service, method).
fn split_call(call: &str) -> (String, String) {
    let cut = call.rfind(['/', '.']).unwrap_or_else(|| panic!("call {call:?} names no method"));
    (call[..cut].to_string(), call[cut + 1..].to_string())
}

/// A Go duration as time.ParseDuration takes it: one or more <number><unit>.
fn is_go_duration(s: &str) -> bool {
    let mut rest = s;
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(rest.len());
        if digits == 0 || rest[..digits].parse::<f64>().is_err() {
            return false;
        }
        rest = &rest[digits..];
        let unit =
            ["ns", "us", "µs", "ms", "s", "m", "h"].iter().filter(|u| rest.starts_with(**u)).max_by_key(|u| u.len());
        match unit {
            Some(u) => rest = &rest[u.len()..],
            None => return false,
        }
    }
    true
}

/// A config whose `data` is an array of requests, each with an image of its own: ghz sends them
/// round-robin, so a load test decodes and computes many images instead of one.
struct ManyImages {
    file: &'static str,
    name: &'static str,
    images: usize,
    seed: u64,
    concurrency: u64,
    total: u64,
}

const MANY: [ManyImages; 2] = [
    ManyImages {
        file: "caption-many.json",
        name: "Cascade.Caption over 32 different images in turn: decoding once per image, then the image cache and the models",
        images: 32,
        seed: 1000,
        concurrency: 8,
        total: 400,
    },
    ManyImages {
        file: "caption-cold.json",
        name: "Cascade.Caption, every call a new image: a cold image cache, every call fetched, decoded and computed",
        images: 96,
        seed: 2000,
        concurrency: 8,
        total: 96,
    },
];

impl ManyImages {
    fn config(&self) -> Value {
        let mut rng = StdRng::seed_from_u64(self.seed);
        let data: Vec<Value> = (0..self.images)
            .map(|_| {
                serde_json::json!({
                    "image": {"data": base64_encode(&draw_scene(&mut rng).png())},
                    "params": {"num_candidates": 10, "decoding": "DECODING_SAMPLE"},
                    "top_k": 3,
                })
            })
            .collect();
        serde_json::json!({
            "name": self.name,
            "call": "caption.v1.Cascade.Caption",
            "host": "localhost:50051",
            "insecure": true,
            "concurrency": self.concurrency,
            "connections": 2,
            "total": self.total,
            "timeout": "30s",
            "connect-timeout": "10s",
            "data": data,
        })
    }
}

#[test]
#[ignore = "writes bench/ghz/caption-many.json and caption-cold.json"]
fn write_many_image_configs() {
    for many in &MANY {
        let text = serde_json::to_string_pretty(&many.config()).unwrap() + "\n";
        std::fs::write(root().join("bench/ghz").join(many.file), text).unwrap();
    }
}

#[test]
fn many_image_configs_hold_the_scenes_they_name() {
    let configs = configs();
    for many in &MANY {
        let config = configs.get(many.file).unwrap_or_else(|| panic!("bench/ghz/{} is missing", many.file));
        assert!(*config == many.config(), "{}: not what write_many_image_configs writes", many.file);
        let images: BTreeSet<&str> =
            config["data"].as_array().unwrap().iter().map(|d| d["image"]["data"].as_str().unwrap()).collect();
        assert_eq!(images.len(), many.images, "{}: every image differs", many.file);
    }
    // The cold config never sends an image twice.
    assert!(MANY[1].total as usize <= MANY[1].images);
}

fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn base64_decode(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes() {
        let v = ALPHABET.iter().position(|&a| a == c).unwrap_or_else(|| panic!("{c:?} is not standard base64")) as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

#[test]
fn configs_are_ghz_json_with_an_example_image() {
    let configs = configs();
    let mut covered = BTreeSet::new();
    let examples: Vec<(String, Vec<u8>)> = std::fs::read_dir(root().join("examples/images"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    for (name, config) in &configs {
        let obj = config.as_object().unwrap_or_else(|| panic!("{name}: not a JSON object"));
        for key in obj.keys() {
            assert!(GHZ_KEYS.split_whitespace().any(|k| k == key), "{name}: {key:?} is not a ghz config key");
        }
        // Reflection: neither a proto file nor a protoset.
        for key in ["proto", "protoset", "import-paths"] {
            assert!(!obj.contains_key(key), "{name}: has {key:?}; the configs use server reflection");
        }
        for key in DURATION_KEYS.split_whitespace() {
            if let Some(v) = obj.get(key) {
                assert!(v.as_str().is_some_and(is_go_duration), "{name}: {key} {v} is not a Go duration");
            }
        }
        for key in COUNT_KEYS.split_whitespace() {
            if let Some(v) = obj.get(key) {
                assert!(v.is_u64(), "{name}: {key} {v} is not a non-negative integer");
            }
        }
        let call = obj["call"].as_str().unwrap_or_else(|| panic!("{name}: call is not a string"));
        let (service, method) = split_call(call);
        covered.insert(format!("{service}/{method}"));
        let host = obj["host"].as_str().unwrap_or_else(|| panic!("{name}: host is not a string"));
        assert!(host.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()), "{name}: host {host:?}");
        assert_eq!(obj.get("insecure"), Some(&Value::Bool(true)), "{name}: the server's default port is plaintext");
        let concurrency = obj["concurrency"].as_u64().unwrap_or_else(|| panic!("{name}: concurrency"));
        assert!(concurrency >= 1, "{name}: concurrency {concurrency}");
        match (obj.get("total"), obj.get("duration")) {
            (Some(total), _) => assert!(total.as_u64().unwrap() >= concurrency, "{name}: total below concurrency"),
            (None, Some(_)) => {}
            (None, None) => panic!("{name}: neither total nor duration: ghz would send its default 200"),
        }
        if let Some(c) = obj.get("connections") {
            assert!((1..=concurrency).contains(&c.as_u64().unwrap()), "{name}: connections {c} not in 1..=concurrency");
        }
        // ghz applies Go templates to the payload: none of the data may look like one by accident.
        assert!(!serde_json::to_string(&obj["data"]).unwrap().contains("{{"), "{name}: data holds a template");
        // One request, or an array ghz sends round-robin.
        let requests: Vec<&Value> = match &obj["data"] {
            Value::Array(items) => items.iter().collect(),
            one => vec![one],
        };
        assert!(!requests.is_empty(), "{name}: no data");
        for data in requests {
            let data = data.as_object().unwrap_or_else(|| panic!("{name}: data is not an object"));
            // Inline image, base64 (protobuf JSON's bytes): one of examples/images/, or a drawn scene.
            let b64 =
                data["image"]["data"].as_str().unwrap_or_else(|| panic!("{name}: data.image.data is not a string"));
            let bytes = base64_decode(b64);
            let is_example = examples.iter().any(|(_, e)| *e == bytes);
            assert!(
                is_example || MANY.iter().any(|m| m.file == name),
                "{name}: data.image.data is not an examples/images file"
            );
            assert!(bytes.starts_with(b"\x89PNG") || bytes.starts_with(&[0xff, 0xd8]), "{name}: not a PNG or JPEG");
        }
    }
    let want: BTreeSet<String> = METHODS.iter().map(|m| m.to_string()).collect();
    assert_eq!(covered, want, "one config per method");
}

/// Ends the server when the test ends, also when it fails.
/// One reflection request, its one answer.
async fn reflect(client: &mut ServerReflectionClient<Channel>, request: MessageRequest) -> MessageResponse {
    let req = ServerReflectionRequest { host: String::new(), message_request: Some(request) };
    let mut answers = client.server_reflection_info(tokio_stream::iter([req])).await.unwrap().into_inner();
    let answer = answers.message().await.unwrap().expect("a reflection answer");
    match answer.message_response.expect("a reflection message") {
        MessageResponse::ErrorResponse(e) => panic!("reflection error {}: {}", e.error_code, e.error_message),
        other => other,
    }
}

/// The files reflection gives for `symbol`, with every file they import (as ghz resolves them).
async fn descriptors(client: &mut ServerReflectionClient<Channel>, symbol: &str) -> Vec<FileDescriptorProto> {
    let mut files: BTreeMap<String, FileDescriptorProto> = BTreeMap::new();
    let mut pending = vec![MessageRequest::FileContainingSymbol(symbol.to_string())];
    while let Some(request) = pending.pop() {
        let MessageResponse::FileDescriptorResponse(resp) = reflect(client, request).await else {
            panic!("reflection did not answer with file descriptors")
        };
        for bytes in resp.file_descriptor_proto {
            let file = FileDescriptorProto::decode(bytes.as_slice()).unwrap();
            for dep in &file.dependency {
                if !files.contains_key(dep) {
                    pending.push(MessageRequest::FileByFilename(dep.clone()));
                }
            }
            files.insert(file.name().to_string(), file);
        }
        pending.retain(|r| !matches!(r, MessageRequest::FileByFilename(n) if files.contains_key(n)));
    }
    files.into_values().collect()
}

/// Parses `data` into `input` with protobuf's JSON parser (unknown fields refused) using the
/// descriptors in `fds`, calls `path` on `addr` with it, and returns the answer as JSON.
const CALL_PY: &str = r#"
import json, sys
import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

addr, path, input_type, output_type, fds_file = sys.argv[1:6]
data = json.load(sys.stdin)
fds = descriptor_pb2.FileDescriptorSet.FromString(open(fds_file, "rb").read())
pool = descriptor_pool.DescriptorPool()
files = {f.name: f for f in fds.file}
added = set()
def add(name):
    if name in added:
        return
    for dep in files[name].dependency:
        add(dep)
    pool.AddSerializedFile(files[name].SerializeToString())
    added.add(name)
for name in files:
    add(name)
request_class = message_factory.GetMessageClass(pool.FindMessageTypeByName(input_type))
response_class = message_factory.GetMessageClass(pool.FindMessageTypeByName(output_type))
request = json_format.ParseDict(data, request_class())
channel = grpc.insecure_channel(addr)
call = channel.unary_unary(path, request_serializer=request_class.SerializeToString,
                           response_deserializer=response_class.FromString)
try:
    response = call(request, timeout=120)
except grpc.RpcError as e:
    sys.exit(f"{path}: {e.code().name}: {e.details()}")
print(json_format.MessageToJson(response, preserving_proto_field_name=True))
"#;

fn call_with_python(addr: SocketAddr, path: &str, input: &str, output: &str, fds: &[u8], data: &Value) -> Value {
    let root = root();
    let python = root.join(".venv/bin/python");
    let fds_file = std::env::temp_dir().join(format!("cc-ghz-{}-{}.protoset", std::process::id(), input));
    std::fs::write(&fds_file, fds).unwrap();
    let mut child = Command::new(&python)
        .args(["-c", CALL_PY, &addr.to_string(), path, input, output, fds_file.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e} (make test installs tests/clients/requirements.txt)", python.display()));
    child.stdin.take().unwrap().write_all(data.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let _ = std::fs::remove_file(&fds_file);
    assert!(out.status.success(), "{path} with the config's data failed:\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configs_call_methods_the_server_reflects_and_their_data_is_accepted() {
    let server = common::spawn_server(&[], &[]).await;
    let addr = server.addr();
    let mut reflection = ServerReflectionClient::new(channel(addr).await);

    let MessageResponse::ListServicesResponse(list) =
        reflect(&mut reflection, MessageRequest::ListServices(String::new())).await
    else {
        panic!("reflection did not list the services")
    };
    let listed: BTreeSet<String> = list.service.into_iter().map(|s| s.name).collect();

    for (name, config) in configs() {
        let (service, method) = split_call(config["call"].as_str().unwrap());
        assert!(listed.contains(&service), "{name}: reflection lists no {service}, only {listed:?}");
        let files = descriptors(&mut reflection, &service).await;
        let package_of = |f: &FileDescriptorProto| f.package().to_string();
        let rpc = files
            .iter()
            .flat_map(|f| f.service.iter().map(move |s| (package_of(f), s)))
            .find(|(pkg, s)| format!("{pkg}.{}", s.name()) == service)
            .and_then(|(_, s)| s.method.iter().find(|m| m.name() == method))
            .unwrap_or_else(|| panic!("{name}: reflection's {service} has no method {method}"))
            .clone();
        assert!(!rpc.client_streaming() && !rpc.server_streaming(), "{name}: {method} is not unary");
        let (input, output) = (rpc.input_type().trim_start_matches('.'), rpc.output_type().trim_start_matches('.'));
        let fds = FileDescriptorSet { file: files.clone() }.encode_to_vec();
        let path = format!("/{service}/{method}");
        // The first of an array stands for the others, which the checks above compare image for image.
        let data = match &config["data"] {
            Value::Array(items) => items[0].clone(),
            one => one.clone(),
        };
        let answer = tokio::task::spawn_blocking({
            let (input, output) = (input.to_string(), output.to_string());
            move || call_with_python(addr, &path, &input, &output, &fds, &data)
        })
        .await
        .unwrap();

        // The answers the payload asks for.
        let data = match &config["data"] {
            Value::Array(items) => &items[0],
            one => one,
        };
        match method.as_str() {
            "Caption" => {
                let top_k = data["top_k"].as_u64().unwrap_or(3) as usize;
                let captions = answer["captions"].as_array().unwrap_or_else(|| panic!("{name}: {answer}"));
                assert!(!captions.is_empty() && captions.len() <= top_k, "{name}: {answer}");
                let n = data["params"]["num_candidates"].as_u64().unwrap_or(10) as usize;
                assert_eq!(answer["candidates"].as_array().unwrap().len(), n, "{name}: {answer}");
            }
            "Generate" => {
                let n = data["params"]["num_candidates"].as_u64().unwrap_or(10) as usize;
                assert_eq!(answer["candidates"].as_array().unwrap().len(), n, "{name}: {answer}");
            }
            "Rank" => {
                let sent = data["captions"].as_array().unwrap();
                let ranked = answer["captions"].as_array().unwrap_or_else(|| panic!("{name}: {answer}"));
                assert_eq!(ranked.len(), sent.len(), "{name}: {answer}");
                // The sample's true caption is listed first in the payload and ranks first.
                assert_eq!(ranked[0]["text"], sent[0], "{name}: {answer}");
            }
            other => panic!("{name}: no check for {other}"),
        }
        assert!(answer["key"].as_str().unwrap().starts_with("sha256:"), "{name}: {answer}");
    }
}
