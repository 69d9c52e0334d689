//! The protobuf codec of every `caption.v1` call, on both sides: prost's encoding, with a message
//! that does not decode (a string that is not UTF-8, a malformed field) answered as the fault of
//! whoever sent it. A request is the caller's input, so INVALID_ARGUMENT naming what was wrong
//! (gRPC's own codecs say INTERNAL for every side); an answer is the server's, so INTERNAL. Each
//! carries an ErrorInfo (reason `UNDECODABLE_REQUEST` or `UNDECODABLE_ANSWER`, and the message's
//! type) like every other status the server makes.

use std::marker::PhantomData;

use prost::Message;
use tonic::{
    codec::{BufferSettings, DecodeBuf, Decoder},
    Code, Status,
};
use tonic_prost::ProstEncoder;

/// Which side sent a message, and so who is at fault when it does not decode.
pub trait Sent {
    fn undecodable(error: prost::DecodeError) -> Status;
}

macro_rules! sent_by {
    ($why:literal, $code:ident, $reason:literal: $($message:ident),+) => {$(
        impl Sent for super::$message {
            fn undecodable(error: prost::DecodeError) -> Status {
                let message = format!(concat!("the ", $why, " does not decode: {}"), located(&error));
                let kind = ("message", stringify!($message).to_string());
                super::status::detailed(Code::$code, message, $reason, &[kind], None)
            }
        }
    )+};
}

sent_by!("request", InvalidArgument, "UNDECODABLE_REQUEST": GenerateRequest, RankRequest, CaptionRequest, CaptionStreamRequest);
sent_by!("answer", Internal, "UNDECODABLE_ANSWER": GenerateResponse, RankResponse, CaptionResponse, CaptionStreamResponse);

/// prost's error with the field it names written from the outermost message in:
/// `CaptionRequest.params.prompt: invalid string value: …`, which prost writes innermost first.
fn located(error: &prost::DecodeError) -> String {
    let text = error.to_string();
    let text = text.strip_prefix("failed to decode Protobuf message: ").unwrap_or(&text);
    let mut fields = Vec::new();
    let mut rest = text;
    while let Some((part, after)) = rest.split_once(": ") {
        match part.split_once('.') {
            Some((message, field)) if !part.contains(' ') && !message.is_empty() && !field.is_empty() => {
                fields.push((message, field));
                rest = after;
            }
            _ => break,
        }
    }
    let Some((outermost, _)) = fields.last() else { return text.to_string() };
    let path: Vec<&str> = std::iter::once(*outermost).chain(fields.iter().rev().map(|(_, f)| *f)).collect();
    format!("{}: {rest}", path.join("."))
}

/// Encodes `T` and decodes `U`, as the generated services and clients of `caption.v1` name it.
pub struct Codec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Sent + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = SentDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        SentDecoder(PhantomData)
    }
}

pub struct SentDecoder<U>(PhantomData<U>);

impl<U: Message + Default + Sent> Decoder for SentDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(U::undecodable)
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use tonic::Code;
    use tonic_types::StatusExt;

    use super::Sent;
    use crate::pb;

    /// `Image.url` (field 1 of `Image`, itself field 1 of the request) set to bytes that are not UTF-8.
    const BAD_URL: &[u8] = &[0x0a, 0x04, 0x0a, 0x02, 0xff, 0xfe];

    #[test]
    fn an_undecodable_request_is_the_callers_fault_and_an_answer_the_servers() {
        let error = pb::CaptionRequest::decode(BAD_URL).unwrap_err();
        let status = pb::CaptionRequest::undecodable(error);
        assert_eq!(status.code(), Code::InvalidArgument);
        let info = status.get_details_error_info().expect("an ErrorInfo");
        assert_eq!((info.reason.as_str(), info.domain.as_str()), ("UNDECODABLE_REQUEST", pb::status::DOMAIN));
        assert_eq!(info.metadata["message"], "CaptionRequest");
        assert_eq!(
            status.message(),
            "the request does not decode: CaptionRequest.image.source: invalid string value: data is not UTF-8 encoded"
        );
        let error = pb::CaptionResponse::decode(&[0x0a, 0x02, 0xff, 0xfe][..]).unwrap_err();
        assert_eq!(pb::CaptionResponse::undecodable(error).code(), Code::Internal);
    }
}
