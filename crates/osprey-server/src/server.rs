//! Binding both protocols to injected listeners, and shutting down without dropping work.
//!
//! Shutdown timeline:
//!
//! ```text
//! signal ─┬─> both servers stop accepting; idle connections close; open ones finish their
//!         │   request (at most 2 × grace: a client that never closes cannot hold us)
//!         └─> gateway drains: new requests 503, admitted ones run (at most the grace,
//!             `[limits] drain_timeout_ms`)
//!             -> agents stop (remote agents' streams end) -> both done -> return
//! ```

use crate::gateway::Gateway;
use crate::grpc::InferenceService;
use crate::pb::grpc_inference_service_server::GrpcInferenceServiceServer;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub struct Listeners {
    pub http: TcpListener,
    pub grpc: TcpListener,
    /// TLS for both; `None`: plaintext.
    pub tls: Option<crate::tls::ServerTls>,
}

/// Serves HTTP and gRPC until `shutdown` completes, then drains.
pub async fn serve(
    listeners: Listeners,
    gw: Arc<Gateway>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = tx.send(true);
    });
    let wait = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let app = crate::http::router(gw.clone());
    let http =
        crate::listener::serve_http(listeners.http, app, gw.clone(), listeners.tls.clone(), rx.clone());
    let limit = gw.limits.max_body_bytes;
    let svc = GrpcInferenceServiceServer::new(InferenceService::new(gw.clone()))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(usize::MAX);
    let svc = tonic::service::interceptor::InterceptedService::new(svc, crate::grpc::interceptor(gw.clone()));
    // `serve_with_incoming` ignores tonic's own TCP_NODELAY setting, so set it per connection.
    use tokio_stream::StreamExt;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listeners.grpc).map(|conn| {
        conn.inspect(|tcp| {
            let _ = tcp.set_nodelay(true);
        })
    });
    let agents = crate::agent_pb::agent_gateway_server::AgentGatewayServer::new(
        crate::cluster::AgentService::new(gw.cluster.clone(), gw.join_token.clone()),
    )
    .max_decoding_message_size(limit);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &listeners.tls {
        builder = builder.tls_config(tls.tonic()).map_err(std::io::Error::other)?;
    }
    let grpc = builder
        // Dead peers (a cable pulled, a node powered off) are found by pings, not left open.
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .max_concurrent_streams(Some(1024))
        .add_service(svc)
        .add_service(agents)
        .serve_with_incoming_shutdown(incoming, wait(rx.clone()));
    let servers = async { tokio::join!(http, grpc) };
    let drain_grace = std::time::Duration::from_millis(gw.limits.drain_timeout_ms);
    let grace = async {
        wait(rx.clone()).await;
        tokio::time::sleep(drain_grace * 2).await;
    };
    let bounded = async {
        tokio::select! {
            (h, g) = servers => h.and(g.map_err(std::io::Error::other)),
            _ = grace => {
                tracing::warn!("connections still open {:?} after shutdown began; closing them", drain_grace * 2);
                Ok(())
            }
        }
    };
    // In parallel with the servers' graceful shutdown: refuse new admissions at once, let the
    // admitted finish, then stop the agents (which also ends remote agents' streams, so that
    // the gRPC server is not held open by them).
    let drain = async {
        wait(rx.clone()).await;
        let left = gw.drain_within(drain_grace).await;
        if left > 0 {
            tracing::warn!(
                "{left} admitted request(s) still unanswered after the grace period; stopping anyway"
            );
        }
    };
    let (result, ()) = tokio::join!(bounded, drain);
    result
}
