//! The HTTP application: binds its own listener, serves the API's routes.

use crate::api::{self, ApiState};
use actix_web::{
    App, HttpServer,
    dev::Server,
    middleware::{Condition, from_fn},
    web,
};
use anyhow::Context;
use std::net::TcpListener;

/// The HTTP API, bound and ready to run.
pub struct Application {
    port: u16,
    server: Server,
}

impl Application {
    pub fn build(state: ApiState) -> anyhow::Result<Application> {
        let addr = state.settings.http_addr;
        let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        Self::build_with_listener(state, listener)
    }

    pub fn build_with_listener(
        state: ApiState,
        listener: TcpListener,
    ) -> anyhow::Result<Application> {
        Self::build_routes(state, listener, api::configure, true)
    }

    /// Only health and metrics (for `rtpd processor`'s probes).
    pub fn build_health_only(state: ApiState) -> anyhow::Result<Application> {
        let addr = state.settings.http_addr;
        let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        Self::build_routes(state, listener, api::configure_health, false)
    }

    fn build_routes(
        state: ApiState,
        listener: TcpListener,
        routes: fn(&mut web::ServiceConfig, web::Data<ApiState>),
        ingest: bool,
    ) -> anyhow::Result<Application> {
        let port = listener.local_addr()?.port();
        // A slow request head is cut off by actix (408); a slow body by
        // `ingest::read_body`, with the same allowance.
        let head_timeout = state.settings.request_timeout();
        let state = web::Data::new(state);
        let server = HttpServer::new(move || {
            App::new()
                .wrap(from_fn(api::limits::guard))
                // Outside the guard, so its refusals are counted too; only
                // where the route is served (not `rtpd processor`'s probes).
                .wrap(Condition::new(ingest, from_fn(api::count_ingest)))
                .configure(|cfg| routes(cfg, state.clone()))
        })
        .client_request_timeout(head_timeout)
        .client_disconnect_timeout(std::time::Duration::from_secs(1))
        .listen(listener)?
        .disable_signals()
        .shutdown_timeout(10)
        .run();
        Ok(Application { port, server })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn handle(&self) -> actix_web::dev::ServerHandle {
        self.server.handle()
    }

    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.server.await
    }
}
