//! The node's telemetry at the top of the crate: installs the Prometheus recorder with every
//! module's metric descriptions, and lists every metric (for `docs/metrics.md`'s test). Each module
//! names its own metrics; only this one knows them all.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Every metric of the node (gateway, store and cluster) with its kind, as listed in
/// `docs/metrics.md`.
pub fn catalog() -> impl Iterator<Item = (&'static str, &'static str)> {
    crate::metrics::CATALOG
        .iter()
        .chain(crate::store::CATALOG)
        .chain(crate::cluster::metrics::CATALOG)
        .chain(crate::delivery::CATALOG)
        .chain(crate::logging::CATALOG)
        .chain(crate::recipients::CATALOG)
        .copied()
}

const LATENCY_BUCKETS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Installs the process-wide Prometheus recorder (once; later calls share it) and returns the
/// handle that renders `/metrics`.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets(LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(crate::store::metric::BATCH_ROWS.to_owned()),
                        crate::store::BATCH_ROWS_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(crate::store::metric::FLUSH_SECONDS.to_owned()),
                        crate::store::FLUSH_SECONDS_BUCKETS,
                    )
                })
                .expect("buckets are not empty")
                .install_recorder()
                .expect("no other metrics recorder is installed");
            crate::metrics::describe();
            crate::store::describe_metrics();
            crate::cluster::metrics::describe();
            crate::delivery::describe_metrics();
            crate::recipients::describe_metrics();
            handle
        })
        .clone()
}
