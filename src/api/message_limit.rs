//! The largest request message, enforced on the request body as it streams in. tonic's own check
//! answers OUT_OF_RANGE; gRPC's convention for a message over the receiver's limit is
//! RESOURCE_EXHAUSTED, and checking each message's length prefix refuses it before it is buffered.

use std::{
    pin::Pin,
    task::{ready, Context, Poll},
};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

pin_project_lite::pin_project! {
    /// A request body that fails with RESOURCE_EXHAUSTED as soon as a gRPC message's
    /// length prefix exceeds `limit`.
    pub struct MessageLimit<B> {
        #[pin]
        body: B,
        limit: usize,
        // Bytes of the current 5-byte message prefix seen so far, and the prefix itself.
        prefix_seen: usize,
        prefix: [u8; 5],
        // Bytes of the current message still to come.
        remaining: u64,
    }
}

impl<B> MessageLimit<B> {
    pub fn new(body: B, limit: usize) -> Self {
        Self { body, limit, prefix_seen: 0, prefix: [0; 5], remaining: 0 }
    }
}

impl<B> Body for MessageLimit<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let frame = match ready!(this.body.poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
            None => return Poll::Ready(None),
        };
        if let Some(data) = frame.data_ref() {
            let mut rest = data.clone();
            while rest.has_remaining() {
                if *this.remaining > 0 {
                    let skip = (*this.remaining).min(rest.len() as u64) as usize;
                    rest.advance(skip);
                    *this.remaining -= skip as u64;
                    continue;
                }
                this.prefix[*this.prefix_seen] = rest.get_u8();
                *this.prefix_seen += 1;
                if *this.prefix_seen == 5 {
                    *this.prefix_seen = 0;
                    let len = u32::from_be_bytes([this.prefix[1], this.prefix[2], this.prefix[3], this.prefix[4]]);
                    if len as u64 > *this.limit as u64 {
                        let status = super::error::message_too_large(len, *this.limit);
                        return Poll::Ready(Some(Err(Box::new(status))));
                    }
                    *this.remaining = len as u64;
                }
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use tonic::Status;

    fn message(len: usize) -> Vec<u8> {
        let mut m = vec![0u8];
        m.extend_from_slice(&(len as u32).to_be_bytes());
        m.extend(std::iter::repeat_n(7u8, len));
        m
    }

    /// Feeds `bytes` in chunks of `chunk` and says whether the body was refused.
    async fn refused(bytes: Vec<u8>, chunk: usize, limit: usize) -> Option<Status> {
        let frames: Vec<Result<Frame<Bytes>, std::io::Error>> =
            bytes.chunks(chunk).map(|c| Ok(Frame::data(Bytes::copy_from_slice(c)))).collect();
        let body = MessageLimit::new(StreamBody::new(futures::stream::iter(frames)), limit);
        match body.collect().await {
            Ok(_) => None,
            Err(e) => Some(*e.downcast::<Status>().expect("a status")),
        }
    }

    #[tokio::test]
    async fn each_message_is_checked_across_chunk_boundaries() {
        for chunk in [1, 2, 3, 5, 7, 4096] {
            let ok = [message(10), message(0), message(10)].concat();
            assert!(refused(ok, chunk, 10).await.is_none(), "chunk {chunk}");
            let over = [message(10), message(11)].concat();
            let status = refused(over, chunk, 10).await.expect("refused");
            assert_eq!(status.code(), tonic::Code::ResourceExhausted);
            assert!(status.message().contains("11 bytes") && status.message().contains("limit of 10"));
        }
        // A 4 GiB claim is refused from its prefix alone.
        let mut huge = vec![0u8];
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(refused(huge, 5, 1 << 20).await.is_some());
    }
}
