//! Metric families of client sessions' own state: pins (why clients keep
//! their server), the shared LISTEN hubs, and the classification cache
//! their statements go through.

use std::sync::atomic::Ordering::Relaxed;

use prometheus_client::encoding::DescriptorEncoder;

use super::{Labels, counter, gauge, labels};
use crate::client::Shared;

pub(super) fn encode(enc: &mut DescriptorEncoder, shared: &Shared) -> std::fmt::Result {
    let pins = shared.pins.totals();
    for (name, help, unpins) in [
        (
            "tidepool_pins",
            "Clients pinned to their server by session state, by reason",
            false,
        ),
        (
            "tidepool_unpins",
            "Pins that ended because their session state did (the reason is what was left last)",
            true,
        ),
    ] {
        let samples: Vec<(Labels, u64)> = pins
            .iter()
            .map(|(reason, p, u)| (labels(&[("reason", reason)]), if unpins { *u } else { *p }))
            .collect();
        counter(enc, name, help, &samples)?;
    }
    let listen = &shared.listen;
    for (name, help, v) in [
        (
            "tidepool_notifications_delivered",
            "Notifications queued for clients by the shared LISTEN connections (one per client reached)",
            &listen.delivered,
        ),
        (
            "tidepool_notification_overflows",
            "Clients closed because more notifications waited for them than max_queued_notifications",
            &listen.overflows,
        ),
        (
            "tidepool_listen_reconnects",
            "Shared LISTEN connections made again after a loss",
            &listen.reconnects,
        ),
    ] {
        counter(enc, name, help, &[(Labels::new(), v.load(Relaxed))])?;
    }
    let dbs = listen.databases();
    for (name, help, pick) in [
        (
            "tidepool_listen_clients",
            "Clients listening through the shared LISTEN connection",
            0usize,
        ),
        (
            "tidepool_listen_channels",
            "Channels the shared LISTEN connection listens on",
            1,
        ),
        (
            "tidepool_listen_connected",
            "1 while the database's shared LISTEN connection to the primary is up",
            2,
        ),
    ] {
        let samples: Vec<(Labels, i64)> = dbs
            .iter()
            .map(|(db, (clients, channels, up))| {
                let v = match pick {
                    0 => *clients as i64,
                    1 => *channels as i64,
                    _ => i64::from(*up),
                };
                (labels(&[("database", db)]), v)
            })
            .collect();
        gauge(enc, name, help, &samples)?;
    }
    let pinned: Vec<(Labels, i64)> = shared
        .pins
        .current()
        .iter()
        .map(|(reason, n)| (labels(&[("reason", reason)]), *n as i64))
        .collect();
    gauge(
        enc,
        "tidepool_pinned_clients",
        "Clients pinned to their server now, by reason",
        &pinned,
    )?;
    counter(
        enc,
        "tidepool_leaks",
        "Clients reported for holding a server unused past leak_warn_after",
        &[(Labels::new(), shared.leaks.reported.load(Relaxed))],
    )?;
    gauge(
        enc,
        "tidepool_leaking_clients",
        "Clients holding a server unused past leak_warn_after now (SHOW LEAKS)",
        &[(Labels::new(), shared.leaks.len() as i64)],
    )?;
    // Per application_name: the top 20 by transactions, the rest `other`.
    let apps = shared.apps.top(20);
    for (name, help, pick) in [
        (
            "tidepool_app_transactions",
            "Transactions by application_name (top 20, the rest as other)",
            0usize,
        ),
        (
            "tidepool_app_queries",
            "Queries by application_name (top 20, the rest as other)",
            1,
        ),
        (
            "tidepool_app_bytes",
            "Bytes received and sent by application_name (top 20, the rest as other)",
            2,
        ),
    ] {
        let samples: Vec<(Labels, u64)> = apps
            .iter()
            .map(|(app, t)| {
                let v = match pick {
                    0 => t.xacts,
                    1 => t.queries,
                    _ => t.bytes,
                };
                (labels(&[("application_name", app)]), v)
            })
            .collect();
        counter(enc, name, help, &samples)?;
    }
    let waits: Vec<(Labels, f64)> = apps
        .iter()
        .map(|(app, t)| (labels(&[("application_name", app)]), t.wait_us as f64 / 1e6))
        .collect();
    counter(
        enc,
        "tidepool_app_wait_seconds",
        "Time clients waited for a server, by application_name (top 20, the rest as other)",
        &waits,
    )?;
    let (hits, misses) = shared.settings().classifier.counts();
    for (name, help, v) in [
        (
            "tidepool_classifier_cache_hits",
            "Statements classified from the classification cache (texts keyed without their edge comments)",
            hits,
        ),
        (
            "tidepool_classifier_cache_misses",
            "Statements the classifier parsed (not in its cache)",
            misses,
        ),
    ] {
        counter(enc, name, help, &[(Labels::new(), v)])?;
    }
    Ok(())
}
