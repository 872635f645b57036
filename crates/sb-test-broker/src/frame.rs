//! AMQP 1.0 framing (part 2.3) and the SASL exchange, on `fe2o3-amqp-types` codecs.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fe2o3_amqp_types::performatives::Performative;
use fe2o3_amqp_types::primitives::{Array, Symbol};
use fe2o3_amqp_types::sasl::{SaslCode, SaslInit, SaslMechanisms, SaslOutcome};
use serde::{Deserialize, Serialize};
use serde_amqp::de::Deserializer;
use serde_amqp::read::IoReader;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const AMQP_HEADER: [u8; 8] = *b"AMQP\x00\x01\x00\x00";
pub const SASL_HEADER: [u8; 8] = *b"AMQP\x03\x01\x00\x00";
const FRAME_TYPE_AMQP: u8 = 0;
const FRAME_TYPE_SASL: u8 = 1;
/// SASL frames are small; refuse larger ones before the AMQP max-frame-size applies.
const MAX_SASL_FRAME_SIZE: u32 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("codec: {0}")]
    Codec(#[from] serde_amqp::Error),
    #[error("protocol: {0}")]
    Protocol(String),
}

/// One decoded AMQP frame; `None` performative is a heartbeat.
#[derive(Debug)]
pub struct Frame {
    pub channel: u16,
    pub performative: Option<Performative>,
    pub payload: Bytes,
}

async fn read_raw<R: AsyncRead + Unpin>(
    r: &mut R,
    max_frame_size: u32,
) -> Result<(u8, u16, BytesMut), FrameError> {
    let size = r.read_u32().await?;
    if !(8..=max_frame_size).contains(&size) {
        return Err(FrameError::Protocol(format!(
            "frame of {size} bytes is outside 8..={max_frame_size} (the max-frame-size)"
        )));
    }
    let mut rest = vec![0u8; size as usize - 4];
    r.read_exact(&mut rest).await?;
    let doff = rest[0] as usize * 4;
    if doff < 8 || doff > size as usize {
        return Err(FrameError::Protocol(format!("bad data offset {doff}")));
    }
    let ftype = rest[1];
    let channel = u16::from_be_bytes([rest[2], rest[3]]);
    let mut body = BytesMut::from(&rest[..]);
    body.advance(doff - 4);
    Ok((ftype, channel, body))
}

pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max_frame_size: u32,
) -> Result<Frame, FrameError> {
    let (ftype, channel, body) = read_raw(r, max_frame_size).await?;
    if ftype != FRAME_TYPE_AMQP {
        return Err(FrameError::Protocol(format!(
            "unexpected frame type {ftype}"
        )));
    }
    if body.is_empty() {
        return Ok(Frame {
            channel,
            performative: None,
            payload: Bytes::new(),
        });
    }
    let mut reader = body.reader();
    let performative = {
        let mut de = Deserializer::new(IoReader::new(&mut reader));
        Performative::deserialize(&mut de)?
    };
    let payload = reader.into_inner().freeze();
    Ok(Frame {
        channel,
        performative: Some(performative),
        payload,
    })
}

pub fn encode_frame(dst: &mut BytesMut, ftype: u8, channel: u16, body: &[u8], payload: &[u8]) {
    dst.put_u32((8 + body.len() + payload.len()) as u32);
    dst.put_u8(2);
    dst.put_u8(ftype);
    dst.put_u16(channel);
    dst.put_slice(body);
    dst.put_slice(payload);
}

pub fn encode_amqp(
    dst: &mut BytesMut,
    channel: u16,
    p: &Performative,
    payload: &[u8],
) -> Result<(), FrameError> {
    let body = serde_amqp::to_vec(p)?;
    encode_frame(dst, FRAME_TYPE_AMQP, channel, &body, payload);
    Ok(())
}

pub fn encode_heartbeat(dst: &mut BytesMut) {
    encode_frame(dst, FRAME_TYPE_AMQP, 0, &[], &[]);
}

fn encode_sasl<T: Serialize>(value: &T) -> Result<BytesMut, FrameError> {
    let body = serde_amqp::to_vec(value)?;
    let mut out = BytesMut::new();
    encode_frame(&mut out, FRAME_TYPE_SASL, 0, &body, &[]);
    Ok(out)
}

/// The protocol-header exchange, with SASL ANONYMOUS/PLAIN (any credentials
/// accepted: authorization is CBS's job, as in Service Bus). Returns the
/// SASL mechanism used, if any.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
) -> Result<Option<String>, FrameError> {
    let mut header = [0u8; 8];
    s.read_exact(&mut header).await?;
    let mut mechanism = None;
    if header == SASL_HEADER {
        s.write_all(&SASL_HEADER).await?;
        let offer = SaslMechanisms {
            sasl_server_mechanisms: Array(vec![
                Symbol::from("ANONYMOUS"),
                Symbol::from("PLAIN"),
                Symbol::from("MSSBCBS"),
            ]),
        };
        s.write_all(&encode_sasl(&offer)?).await?;
        let (ftype, _, body) = read_raw(s, MAX_SASL_FRAME_SIZE).await?;
        if ftype != FRAME_TYPE_SASL {
            return Err(FrameError::Protocol("expected sasl-init".into()));
        }
        let init: SaslInit = serde_amqp::from_slice(&body)?;
        mechanism = Some(init.mechanism.0.clone());
        let outcome = SaslOutcome {
            code: SaslCode::Ok,
            additional_data: None,
        };
        s.write_all(&encode_sasl(&outcome)?).await?;
        s.read_exact(&mut header).await?;
    }
    if header != AMQP_HEADER {
        s.write_all(&AMQP_HEADER).await?;
        return Err(FrameError::Protocol(format!(
            "unsupported protocol header {header:?}"
        )));
    }
    s.write_all(&AMQP_HEADER).await?;
    Ok(mechanism)
}
