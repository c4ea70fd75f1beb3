//! Per-request overhead of keel's lifecycle layer (request id, span, timeout, panic isolation,
//! error shape, access record, metrics) against bare axum, in the same run.
//!
//! `cargo bench -p keel --bench middleware`
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::Request;
use axum::middleware;
use axum::routing::get;
use criterion::{Criterion, criterion_group, criterion_main};
use keel::http::lifecycle::{Lifecycle, lifecycle};
use tower::ServiceExt;

fn routes() -> Router {
    Router::new().route("/hello", get(|| async { "hello" }))
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let logs = tempfile::tempdir().unwrap();
    // Every record to one JSON file, as in production, but not to stdout (it would mix with
    // criterion's report).
    let mut config = keel_log::LogConfig::production();
    config.dir = logs.path().to_path_buf();
    config.sinks = vec![keel_log::SinkConfig {
        name: "file".to_owned(),
        kind: keel_log::SinkKind::File,
        streams: keel_log::Stream::ALL.to_vec(),
        format: keel_log::Format::Json,
        file: Some(keel_log::FileConfig::new("bench.log")),
    }];
    let (logger, layer) = keel_log::build(&config).unwrap();
    let subscriber = {
        use tracing_subscriber::layer::SubscriberExt;
        tracing_subscriber::registry().with(layer)
    };
    let _default = tracing::subscriber::set_default(subscriber);
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .unwrap();

    let bare = routes();
    let keel = routes().layer(middleware::from_fn_with_state(
        Lifecycle {
            timeout: Duration::from_secs(30),
            body_limit: 1024 * 1024,
        },
        lifecycle,
    ));

    let mut group = c.benchmark_group("request");
    for (name, router) in [("bare_axum", bare), ("keel_lifecycle", keel)] {
        group.bench_function(name, |b| {
            b.iter(|| {
                runtime.block_on(async {
                    let request = Request::get("/hello").body(Body::empty()).unwrap();
                    let response = router.clone().oneshot(request).await.unwrap();
                    assert!(response.status().is_success());
                })
            })
        });
    }
    group.finish();
    logger.shutdown(Duration::from_secs(5));
}

criterion_group!(benches, bench);
criterion_main!(benches);
