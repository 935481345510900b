//! The `ModelStreamInfer` route with a decoder that never ends the stream over one bad message:
//! a request message that does not decode, or is larger than `--max-message-size`, becomes
//! [`StreamMessage::Refused`] (answered in-band by the stream loop), and the messages after it
//! are read and answered as usual. `ModelInfer` goes to [`super::unary_route`]; every other RPC
//! of the inference service goes to the generated server unchanged.

use std::task::{Context, Poll};

use bytes::Buf;
use futures::FutureExt;
use prost::Message;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EnabledCompressionEncodings};
use tonic::codegen::{Body, BoxFuture, Service, StdError, http};
use tonic::{Status, Streaming};

use super::inference::InferenceService;
use crate::proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use crate::proto::inference::{ModelInferRequest, ModelStreamInferResponse};

/// The path of the streaming inference RPC.
const STREAM_PATH: &str = "/inference.GRPCInferenceService/ModelStreamInfer";

/// Request messages up to this multiple of `--max-message-size` are read whole and refused
/// in-band; a larger one cannot be skipped without buffering it, so it ends the stream
/// (OUT_OF_RANGE).
pub(crate) const STREAM_SKIP_FACTOR: usize = 2;

/// One message read from a `ModelStreamInfer` stream.
#[derive(Debug)]
pub(crate) enum StreamMessage {
    /// A request.
    Request(Box<ModelInferRequest>),
    /// A message that is not one (undecodable, or over the size limit): why.
    Refused(String),
}

/// Decodes stream messages, turning a bad one into [`StreamMessage::Refused`].
#[derive(Debug, Clone)]
struct LenientDecoder {
    max_message_size: usize,
}

impl Decoder for LenientDecoder {
    type Item = StreamMessage;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<StreamMessage>, Status> {
        let len = buf.remaining();
        if len > self.max_message_size {
            buf.advance(len);
            return Ok(Some(StreamMessage::Refused(format!(
                "request message of {len} bytes exceeds the limit of {} bytes (--max-message-size); it was not executed",
                self.max_message_size
            ))));
        }
        let bytes = buf.copy_to_bytes(len);
        Ok(Some(match ModelInferRequest::decode(bytes) {
            Ok(r) => StreamMessage::Request(Box::new(r)),
            Err(e) => StreamMessage::Refused(format!(
                "request message of {len} bytes is not a ModelInferRequest ({e}); it was not executed"
            )),
        }))
    }

    fn buffer_settings(&self) -> tonic::codec::BufferSettings {
        Default::default()
    }
}

/// The codec of the stream route: responses as prost encodes them, requests through
/// [`LenientDecoder`].
#[derive(Debug, Clone)]
struct StreamCodec {
    max_message_size: usize,
}

impl Codec for StreamCodec {
    type Encode = ModelStreamInferResponse;
    type Decode = StreamMessage;
    type Encoder = tonic_prost::ProstEncoder<ModelStreamInferResponse>;
    type Decoder = LenientDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        Default::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        LenientDecoder { max_message_size: self.max_message_size }
    }
}

/// The streaming handler behind the route.
struct StreamHandler(InferenceService);

impl tonic::server::StreamingService<StreamMessage> for StreamHandler {
    type Response = ModelStreamInferResponse;
    type ResponseStream = super::stream_infer::ResponseStream;
    type Future = BoxFuture<tonic::Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: tonic::Request<Streaming<StreamMessage>>) -> Self::Future {
        let core = self.0.clone();
        Box::pin(async move {
            let session = super::inference::session_header(request.metadata())?;
            Ok(tonic::Response::new(core.serve_stream(request.into_inner(), session)))
        })
    }
}

/// The inference service with its `ModelStreamInfer` route replaced (see the module doc).
#[derive(Clone)]
pub(crate) struct InferenceRoutes {
    generated: GrpcInferenceServiceServer<InferenceService>,
    core: InferenceService,
    max_message_size: usize,
}

impl InferenceRoutes {
    /// Routes over `core`; `generated` serves every other RPC.
    pub(crate) fn new(
        core: InferenceService,
        generated: GrpcInferenceServiceServer<InferenceService>,
        max_message_size: usize,
    ) -> InferenceRoutes {
        InferenceRoutes { generated, core, max_message_size }
    }
}

impl<B> Service<http::Request<B>> for InferenceRoutes
where
    B: Body + Send + 'static,
    B::Data: bytes::Buf + Send,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if super::unary_route::serves(&req) {
            return Box::pin(super::unary_route::answer(self.core.clone(), req, self.max_message_size).map(Ok));
        }
        if req.uri().path() != STREAM_PATH {
            return self.generated.call(req);
        }
        let (core, max) = (self.core.clone(), self.max_message_size);
        Box::pin(async move {
            let mut accept = EnabledCompressionEncodings::default();
            accept.enable(CompressionEncoding::Gzip);
            accept.enable(CompressionEncoding::Deflate);
            let mut grpc = tonic::server::Grpc::new(StreamCodec { max_message_size: max })
                .apply_compression_config(accept, EnabledCompressionEncodings::default())
                .apply_max_message_size_config(Some(max.saturating_mul(STREAM_SKIP_FACTOR)), Some(max));
            Ok(grpc.streaming(StreamHandler(core), req).await)
        })
    }
}

impl tonic::server::NamedService for InferenceRoutes {
    const NAME: &'static str = "inference.GRPCInferenceService";
}
