//! Requests sent as the protobuf bytes given, which no generated client can send (a string that is
//! not UTF-8, a malformed field), with answers decoded as usual.

use std::marker::PhantomData;

use bytes::BufMut;
use prost::Message;
use tonic::{
    codec::{BufferSettings, Codec, EncodeBuf, Encoder},
    Status,
};
use tonic_prost::ProstCodec;

/// Sends `Vec<u8>` as it is and decodes answers as `U`.
pub struct Raw<U>(PhantomData<U>);

impl<U> Raw<U> {
    pub fn new() -> Self {
        Self(PhantomData)
    }
}

impl<U: Message + Default + Send + 'static> Codec for Raw<U> {
    type Encode = Vec<u8>;
    type Decode = U;
    type Encoder = RawEncoder;
    type Decoder = <ProstCodec<(), U> as Codec>::Decoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<(), U>::raw_decoder(BufferSettings::default())
    }
}

pub struct RawEncoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

/// A length-delimited protobuf field: tag, length, bytes.
pub fn field(number: u32, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::encode_key(number, prost::encoding::WireType::LengthDelimited, &mut out);
    prost::encoding::encode_varint(bytes.len() as u64, &mut out);
    out.extend_from_slice(bytes);
    out
}
