//! A request that does not decode is the caller's fault: a string that is not UTF-8 in any field
//! (an image URL, a prompt, a caption to rank) is answered INVALID_ARGUMENT naming the field, on
//! every service, and a stream item that does not decode ends the stream with INVALID_ARGUMENT
//! once the items read before it are answered. Requests are sent as raw protobuf bytes, which no
//! generated client can produce.

mod common;

use caption_cascade::pb;
use common::{
    png_image,
    raw::{field, Raw},
    scenes::draw_scene,
    shared_channel,
};
use prost::Message;
use rand::{rngs::StdRng, SeedableRng};
use tonic::{transport::Channel, Code, Status};
use tonic_types::StatusExt;

async fn unary<U: Message + Default + Send + 'static>(ch: &Channel, path: &'static str, body: Vec<u8>) -> Status {
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready().await.unwrap();
    let uri = http::uri::PathAndQuery::from_static(path);
    match grpc.unary(tonic::Request::new(body), uri, Raw::<U>::new()).await {
        Ok(_) => panic!("{path} answered a request that does not decode"),
        Err(status) => status,
    }
}

const NOT_UTF8: &[u8] = b"caf\xe9 \xff";

fn expect_invalid(status: &Status, field: &str) {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains(field) && status.message().contains("UTF-8"), "{}", status.message());
    // The reason a program reads, as on every other status the server makes.
    let info = status.get_details_error_info().unwrap_or_else(|| panic!("no ErrorInfo: {status:?}"));
    assert_eq!((info.reason.as_str(), info.domain.as_str()), ("UNDECODABLE_REQUEST", "caption.v1"));
    let message = field.split('.').next().unwrap();
    assert!(info.metadata["message"].ends_with(message), "{field}: {:?}", info.metadata);
}

#[tokio::test]
async fn a_string_that_is_not_utf8_is_invalid_argument_on_every_service() {
    let ch = shared_channel().await;
    let png = draw_scene(&mut StdRng::seed_from_u64(5)).png();
    let image = png_image(png.clone()).unwrap().encode_to_vec();

    let bad_url = field(1, &field(1, NOT_UTF8));
    let status = unary::<pb::CaptionResponse>(&ch, "/caption.v1.Cascade/Caption", bad_url.clone()).await;
    expect_invalid(&status, "Request.image.source:");
    let status = unary::<pb::GenerateResponse>(&ch, "/caption.v1.Generator/Generate", bad_url.clone()).await;
    expect_invalid(&status, "Request.image.source:");
    let status = unary::<pb::RankResponse>(&ch, "/caption.v1.Ranker/Rank", bad_url).await;
    expect_invalid(&status, "Request.image.source:");

    // A valid image with a prompt (GenerationParams field 10) that is not UTF-8.
    let prompt = [field(1, &image), field(2, &field(10, NOT_UTF8))].concat();
    let status = unary::<pb::CaptionResponse>(&ch, "/caption.v1.Cascade/Caption", prompt.clone()).await;
    expect_invalid(&status, "Request.params.prompt:");
    let status = unary::<pb::GenerateResponse>(&ch, "/caption.v1.Generator/Generate", prompt).await;
    expect_invalid(&status, "Request.params.prompt:");
    // A valid image with a caption to rank that is not UTF-8.
    let captions = [field(1, &image), field(2, b"a red circle"), field(2, NOT_UTF8)].concat();
    let status = unary::<pb::RankResponse>(&ch, "/caption.v1.Ranker/Rank", captions).await;
    expect_invalid(&status, "RankRequest.captions:");
}

#[tokio::test]
async fn a_stream_item_that_does_not_decode_ends_the_stream_as_invalid_argument() {
    let ch = shared_channel().await;
    let png = draw_scene(&mut StdRng::seed_from_u64(6)).png();
    let params = pb::GenerationParams { num_candidates: Some(2), max_length: Some(8), ..Default::default() };
    let good = pb::CaptionStreamRequest {
        id: "good".into(),
        request: Some(pb::CaptionRequest { image: png_image(png), params: Some(params), ..Default::default() }),
    }
    .encode_to_vec();
    let bad = [field(1, b"bad"), field(2, &field(1, &field(1, NOT_UTF8)))].concat();

    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/caption.v1.Cascade/CaptionStream");
    let items = tokio_stream::iter([good, bad]);
    let mut answers = grpc
        .streaming(tonic::Request::new(items), path, Raw::<pb::CaptionStreamResponse>::new())
        .await
        .unwrap()
        .into_inner();
    let first = answers.message().await.unwrap().expect("the item before the bad one is answered");
    assert_eq!(first.id, "good");
    assert!(matches!(first.result, Some(pb::caption_stream_response::Result::Response(_))), "{first:?}");
    let end = answers.message().await.unwrap_err();
    expect_invalid(&end, "CaptionStreamRequest.request.image.source:");
}
