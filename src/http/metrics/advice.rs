//! Metric families of pool sizing: each pool's utilization over the last
//! `stats_period` and the `default_pool_size` SHOW ADVICE recommends.

use prometheus_client::encoding::DescriptorEncoder;

use super::{Labels, gauge, labels};
use crate::admin::show::{advise, backend_name};
use crate::client::Shared;

pub(super) fn encode(enc: &mut DescriptorEncoder, shared: &Shared) -> std::fmt::Result {
    let counts = crate::snapshot::pool_clients(&crate::snapshot::clients(shared));
    let advice = advise(shared, &counts);
    let key = |a: &crate::admin::show::Advice| {
        let db = backend_name(&a.database, a.backend);
        labels(&[
            ("database", db.as_str()),
            ("user", a.user.as_str()),
            (
                "backend_role",
                if a.backend == 0 { "primary" } else { "replica" },
            ),
        ])
    };
    let utilization: Vec<(Labels, f64)> = advice.iter().map(|a| (key(a), a.utilization)).collect();
    gauge(
        enc,
        "tidepool_pool_utilization",
        "Busy server-seconds over pool size x seconds in the last stats_period (0-1; alert above 0.8)",
        &utilization,
    )?;
    let recommended: Vec<(Labels, i64)> = advice
        .iter()
        .filter_map(|a| a.recommended.map(|r| (key(a), i64::from(r))))
        .collect();
    gauge(
        enc,
        "tidepool_pool_recommended_size",
        "default_pool_size SHOW ADVICE recommends for the observed load (Little's law, bounded by max_connections / instances)",
        &recommended,
    )
}
