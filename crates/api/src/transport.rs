//! hyper answers a request it cannot parse — a URI past 64 KiB, a head past its buffer, a
//! malformed request line — by itself, with an empty body, before any of backvault's code
//! runs. Connections from [`ProblemListener`] rewrite exactly those automatic answers
//! into problem+json, so that every error a client meets has the same shape and a code.
//! [`PeerAddr`] tells requests which peer their connection came from.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A listener whose connections answer hyper's automatic errors in problem+json.
pub struct ProblemListener<L>(pub L);

/// The address of a connection's peer, for `into_make_service_with_connect_info`: axum
/// gives `SocketAddr` only for its own listeners, and [`ProblemListener`] is not one.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

impl<L: Listener<Addr = SocketAddr>> Connected<IncomingStream<'_, ProblemListener<L>>>
    for PeerAddr
{
    fn connect_info(stream: IncomingStream<'_, ProblemListener<L>>) -> Self {
        PeerAddr(*stream.remote_addr())
    }
}

impl<L: Listener> Listener for ProblemListener<L> {
    type Io = ProblemIo<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = self.0.accept().await;
        (
            ProblemIo {
                inner: io,
                pending: Vec::new(),
                sent: 0,
            },
            addr,
        )
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// A connection that replaces an automatic error response of hyper as it is written.
pub struct ProblemIo<T> {
    inner: T,
    /// A replacement response still to be written, and how much of it was.
    pending: Vec<u8>,
    sent: usize,
}

impl<T: AsyncWrite + Unpin> ProblemIo<T> {
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(rest) = self.pending.get(self.sent..).filter(|r| !r.is_empty()) {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, rest))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent = self.sent.saturating_add(n);
        }
        self.pending.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ProblemIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ProblemIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_pending(cx))?;
        if let Some(replacement) = problem_for_automatic_response(buf) {
            self.pending = replacement;
            // Whatever does not go out now goes out on the next write, flush or shutdown.
            if let Poll::Ready(Err(e)) = self.poll_pending(cx) {
                return Poll::Ready(Err(e));
            }
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The problem+json response for `head` if it is one of hyper's automatic answers to an
/// unparsable request: one of these statuses, with no body and no content type. backvault
/// itself never answers an error without a problem body, so nothing else matches.
fn problem_for_automatic_response(head: &[u8]) -> Option<Vec<u8>> {
    const AUTOMATIC: [(&str, &str, &str); 3] = [
        (
            "400 Bad Request",
            "malformed_request",
            "the request line or a header is not valid HTTP/1.1",
        ),
        (
            "414 URI Too Long",
            "uri_too_long",
            "the request URI is at most 8 KiB",
        ),
        (
            "431 Request Header Fields Too Large",
            "headers_too_large",
            "the request's headers are larger than the server accepts",
        ),
    ];
    let text = std::str::from_utf8(head).ok()?;
    let (status_line, rest) = text.split_once("\r\n")?;
    let (version, status) = status_line.split_once(' ')?;
    let (reason, code, detail) = AUTOMATIC.iter().find(|(reason, ..)| *reason == status)?;
    let headers = rest
        .strip_suffix("\r\n\r\n")
        .or_else(|| rest.strip_suffix("\r\n"))?;
    let headers = headers.to_ascii_lowercase();
    let empty = headers.lines().any(|h| h.trim() == "content-length: 0");
    if !empty || headers.contains("content-type:") {
        return None;
    }
    let status_code = reason.split(' ').next()?;
    let body = serde_json::json!({
        "type": format!("urn:backvault:problem:{code}"),
        "title": reason.split_once(' ').map_or(*reason, |(_, title)| title),
        "status": status_code.parse::<u16>().ok()?,
        "detail": detail,
        "code": code,
    })
    .to_string();
    Some(
        format!(
            "{version} {reason}\r\ncontent-type: application/problem+json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypers_automatic_answers_become_problems() {
        let automatic = b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\ndate: Mon, 30 Nov 2026 14:00:00 GMT\r\n\r\n";
        let rewritten =
            String::from_utf8(problem_for_automatic_response(automatic).unwrap()).unwrap();
        assert!(rewritten.starts_with("HTTP/1.1 414 URI Too Long\r\n"));
        assert!(rewritten.contains("content-type: application/problem+json\r\n"));
        let body: serde_json::Value =
            serde_json::from_str(rewritten.split_once("\r\n\r\n").unwrap().1).unwrap();
        assert_eq!(body["code"], "uri_too_long");
        assert_eq!(body["status"], 414);
        assert_eq!(body["title"], "URI Too Long");
        let headers = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
        assert!(problem_for_automatic_response(headers).is_some());
    }

    #[test]
    fn the_applications_own_answers_pass_untouched() {
        for head in [
            &b"HTTP/1.1 414 URI Too Long\r\ncontent-type: application/problem+json\r\ncontent-length: 120\r\n\r\n"[..],
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/problem+json\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
            b"{\"items\": []}",
        ] {
            assert_eq!(problem_for_automatic_response(head), None);
        }
    }
}
