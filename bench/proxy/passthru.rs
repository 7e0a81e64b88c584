//! The floor: an HTTP/1.1 proxy that does nothing but pass requests and responses through (no parsing, no
//! translation), built from the same hyper and tokio as llmctl, on one thread. What it adds over direct access
//! is what any separate proxy process costs on this machine (two more socket hops, two more wake-ups).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::sync::Mutex;

type Upstream = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn forward(up: Arc<Mutex<Upstream>>, req: Request<Incoming>) -> Result<Response<Incoming>> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    let req = Request::from_parts(parts, Full::new(body));
    let mut up = up.lock().await;
    up.ready().await?;
    Ok(up.send_request(req).await?)
}

/// Serves until killed: each client connection gets its own kept-alive upstream connection.
pub fn serve(listen: SocketAddr, upstream: SocketAddr) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        loop {
            let (sock, _) = listener.accept().await?;
            let _ = sock.set_nodelay(true);
            tokio::spawn(async move {
                let Ok(up) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = up.set_nodelay(true);
                let Ok((sender, conn)) =
                    hyper::client::conn::http1::handshake(TokioIo::new(up)).await
                else {
                    return;
                };
                tokio::spawn(conn);
                let sender = Arc::new(Mutex::new(sender));
                let svc = hyper::service::service_fn(move |req| forward(sender.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(sock), svc)
                    .await;
            });
        }
    })
}
