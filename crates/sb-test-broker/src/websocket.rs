//! AMQP over WebSockets, as Service Bus serves it on 443: an HTTP upgrade on
//! `/$servicebus/websocket` with the `amqp` subprotocol (Microsoft's .NET and
//! Python SDKs ask for `AMQPWSB10`, which the service also accepts), then
//! AMQP frames in binary messages.

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};

pub const PATH: &str = "/$servicebus/websocket";
const SUBPROTOCOLS: [&str; 2] = ["amqp", "AMQPWSB10"];
const PROTOCOL_HEADER: &str = "Sec-WebSocket-Protocol";

fn refuse(status: StatusCode, why: &str) -> ErrorResponse {
    let mut r = ErrorResponse::new(Some(why.to_string()));
    *r.status_mut() = status;
    r
}

/// Accept the upgrade and return a byte stream carrying the AMQP connection.
pub async fn accept<S>(stream: S) -> std::io::Result<DuplexStream>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // The callback's signature is tungstenite's, large error type included.
    #[allow(clippy::result_large_err)]
    let check = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        if req.uri().path() != PATH {
            return Err(refuse(StatusCode::NOT_FOUND, "not a Service Bus endpoint"));
        }
        let offered: Vec<String> = req
            .headers()
            .get_all(PROTOCOL_HEADER)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(',').map(|p| p.trim().to_string()))
            .collect();
        let Some(chosen) = offered
            .iter()
            .find(|p| SUBPROTOCOLS.iter().any(|s| s.eq_ignore_ascii_case(p)))
        else {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "the amqp WebSocket subprotocol is required",
            ));
        };
        let value = HeaderValue::from_str(chosen)
            .map_err(|_| refuse(StatusCode::BAD_REQUEST, "bad subprotocol"))?;
        resp.headers_mut().insert(PROTOCOL_HEADER, value);
        Ok(resp)
    };
    let ws = tokio_tungstenite::accept_hdr_async(stream, check)
        .await
        .map_err(std::io::Error::other)?;
    let (ours, theirs) = tokio::io::duplex(256 * 1024);
    tokio::spawn(bridge(ws, theirs));
    Ok(ours)
}

/// Binary WebSocket messages in, bytes out, and back.
async fn bridge<S>(ws: tokio_tungstenite::WebSocketStream<S>, io: DuplexStream)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut sink, mut stream) = ws.split();
    let (mut reader, mut writer) = tokio::io::split(io);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            message = stream.next() => match message {
                Some(Ok(Message::Binary(bytes))) => {
                    if writer.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
            read = reader.read(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    let _ = sink.send(Message::Close(None)).await;
                    break;
                }
                Ok(n) => {
                    if sink.send(Message::binary(buf[..n].to_vec())).await.is_err() {
                        break;
                    }
                }
            },
        }
    }
}
