//! `isola pod port-forward`: what `kubectl port-forward` does on a node,
//! through CRI. Each connection to the local port gets its own
//! `PortForward` call for the pod's sandbox; the URL it returns (containerd's
//! streaming server) is opened as a WebSocket with `?port=PORT` and the
//! subprotocol `v4.channel.k8s.io`. Every message starts with its channel,
//! 0 for data and 1 for errors, and the first message of each channel is
//! the port (two bytes, little-endian). The protocol has no half-close:
//! the local side's EOF ends nothing, the pod side's end closes the
//! connection, as with kubectl.

use anyhow::{anyhow, bail, Context, Result};
use futures::{SinkExt, StreamExt};
use k8s_cri::v1 as api;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

use super::cri::Cri;

/// The WebSocket subprotocol of port forwarding.
pub const PROTOCOL: &str = "v4.channel.k8s.io";
/// Bytes read from the local connection per message.
const CHUNK: usize = 32 * 1024;

/// `[LOCAL:]REMOTE`: the local port (default: the remote one) and the
/// pod's port.
pub fn parse_ports(spec: &str) -> Result<(u16, u16)> {
    let port = |s: &str, what: &str| -> Result<u16> {
        s.parse::<u16>()
            .ok()
            .filter(|p| *p != 0 || what == "local")
            .ok_or_else(|| anyhow!("{spec:?}: the {what} port {s:?} is not a port number"))
    };
    match spec.split_once(':') {
        Some((local, remote)) => Ok((port(local, "local")?, port(remote, "pod")?)),
        None => {
            let p = port(spec, "pod")?;
            Ok((p, p))
        }
    }
}

/// Listens on 127.0.0.1:`local` and forwards each connection to `port` of
/// sandbox `sandbox` until interrupted. Prints `Forwarding from ADDR ->
/// PORT` once listening.
pub async fn run(cri: &Cri, sandbox: &str, local: u16, port: u16) -> Result<i32> {
    let listener = TcpListener::bind(("127.0.0.1", local))
        .await
        .with_context(|| format!("listening on 127.0.0.1:{local}"))?;
    let addr = listener.local_addr()?;
    println!("Forwarding from {addr} -> {port}");
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        let (conn, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of descriptors, say: the next one may do.
                    eprintln!("isola pod port-forward: accepting on {addr}: {err}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut interrupted => return Ok(0),
        };
        let (cri, sandbox) = (cri.clone(), sandbox.to_string());
        tokio::spawn(async move {
            if let Err(err) = forward(&cri, &sandbox, port, conn).await {
                eprintln!("isola pod port-forward: {peer} -> {port}: {err:#}");
            }
        });
    }
}

async fn forward(cri: &Cri, sandbox: &str, port: u16, conn: TcpStream) -> Result<()> {
    let url = cri
        .runtime
        .clone()
        .port_forward(api::PortForwardRequest {
            pod_sandbox_id: sandbox.to_string(),
            port: vec![i32::from(port)],
        })
        .await
        .map_err(|s| anyhow!("PortForward: {}", s.message()))?
        .into_inner()
        .url;
    let ws_url = websocket_url(&url, port)?;
    let mut request = ws_url
        .as_str()
        .into_client_request()
        .with_context(|| format!("the streaming URL {url}"))?;
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(PROTOCOL));
    let (ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .with_context(|| format!("opening {ws_url}"))?;
    pump(conn, ws, port).await
}

/// containerd's `http://HOST:PORT/portforward/TOKEN` as a WebSocket URL
/// asking for `port`.
pub fn websocket_url(url: &str, port: u16) -> Result<String> {
    let Some(rest) = url.strip_prefix("http://") else {
        bail!(
            "streaming URL {url:?}: only plain http:// is supported (enable_tls_streaming = false)"
        );
    };
    let sep = if rest.contains('?') { '&' } else { '?' };
    Ok(format!("ws://{rest}{sep}port={port}"))
}

/// What one message from the pod side means.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Bytes for the local connection.
    Data(&'a [u8]),
    /// The pod side's error text (the forward failed).
    Error(&'a [u8]),
    /// A channel's first message, the port: nothing to pass on.
    Port,
}

/// Reads one binary message; `seen` records which channels sent their
/// port message already.
pub fn frame<'a>(message: &'a [u8], seen: &mut [bool; 2], port: u16) -> Result<Frame<'a>> {
    let Some((&channel, body)) = message.split_first() else {
        return Ok(Frame::Data(&[]));
    };
    let index = usize::from(channel);
    if index > 1 {
        bail!("message on channel {channel}: only 0 (data) and 1 (error) exist");
    }
    if !seen[index] {
        seen[index] = true;
        let said = <[u8; 2]>::try_from(body)
            .map(u16::from_le_bytes)
            .map_err(|_| anyhow!("channel {channel}'s first message is not a port"))?;
        if said != port {
            bail!("channel {channel} is for port {said}, not {port}");
        }
        return Ok(Frame::Port);
    }
    Ok(if index == 0 {
        Frame::Data(body)
    } else {
        Frame::Error(body)
    })
}

async fn pump<S>(conn: TcpStream, ws: S, port: u16) -> Result<()>
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
        + futures::Sink<Message, Error = tokio_tungstenite::tungstenite::Error>
        + Send
        + 'static,
{
    let (mut sink, mut stream) = ws.split();
    let (mut reader, mut writer) = conn.into_split();
    let up = tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK + 1];
        loop {
            // Channel 0, then the bytes.
            let n = reader.read(&mut buf[1..]).await?;
            if n == 0 {
                return Ok::<_, anyhow::Error>(());
            }
            sink.send(Message::Binary(buf[..=n].to_vec().into()))
                .await?;
        }
    });
    let mut seen = [false; 2];
    let result = async {
        while let Some(message) = stream.next().await {
            let data = match message.context("reading the stream")? {
                Message::Binary(data) => data,
                Message::Close(_) => break,
                _ => continue,
            };
            match frame(&data, &mut seen, port)? {
                Frame::Data(bytes) => writer.write_all(bytes).await?,
                Frame::Error(text) if !text.is_empty() => {
                    bail!("{}", String::from_utf8_lossy(text).trim())
                }
                Frame::Error(_) | Frame::Port => {}
            }
        }
        writer.shutdown().await?;
        Ok(())
    }
    .await;
    up.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_local_colon_remote_or_one_for_both() {
        assert_eq!(parse_ports("8080").unwrap(), (8080, 8080));
        assert_eq!(parse_ports("18080:80").unwrap(), (18080, 80));
        assert_eq!(parse_ports("0:80").unwrap(), (0, 80), "0: any free port");
        for bad in ["", "0", "80:0", "x", "1:2:3", "65536", ":80"] {
            assert!(parse_ports(bad).is_err(), "{bad:?}");
        }
        assert!(parse_ports("80:http")
            .unwrap_err()
            .to_string()
            .contains("pod port \"http\""));
    }

    #[test]
    fn the_streaming_url_becomes_a_websocket_url_with_the_port() {
        assert_eq!(
            websocket_url("http://127.0.0.1:42123/portforward/AbC", 8080).unwrap(),
            "ws://127.0.0.1:42123/portforward/AbC?port=8080"
        );
        assert_eq!(
            websocket_url("http://h:1/p?x=1", 80).unwrap(),
            "ws://h:1/p?x=1&port=80"
        );
        assert!(websocket_url("https://h/p", 80).is_err());
    }

    #[test]
    fn frames_start_with_the_port_then_carry_data_or_errors() {
        let mut seen = [false; 2];
        assert_eq!(
            frame(&[0, 0x90, 0x1f], &mut seen, 8080).unwrap(),
            Frame::Port
        );
        assert_eq!(
            frame(&[1, 0x90, 0x1f], &mut seen, 8080).unwrap(),
            Frame::Port
        );
        assert_eq!(
            frame(b"\0hello", &mut seen, 8080).unwrap(),
            Frame::Data(b"hello")
        );
        assert_eq!(
            frame(b"\x01refused", &mut seen, 8080).unwrap(),
            Frame::Error(b"refused")
        );
        assert_eq!(frame(&[], &mut seen, 8080).unwrap(), Frame::Data(&[]));
        assert!(frame(&[2, 0], &mut seen, 8080).is_err(), "channel 2");
        let mut fresh = [false; 2];
        assert!(frame(&[0, 0x50, 0], &mut fresh, 8080).is_err(), "port 80");
        let mut fresh = [false; 2];
        assert!(
            frame(&[0, 1, 2, 3], &mut fresh, 8080).is_err(),
            "not a port"
        );
    }
}
