//! The namespace's interface addresses, re-read periodically: they tell an inbound connection
//! (to one of them) from an outbound one, and a pod's address may appear after the proxy started.

use std::{sync::Arc, time::Duration};

use crate::data::{inbound::LocalAddrs, Proxy};

/// How often the addresses are re-read.
const REFRESH: Duration = Duration::from_secs(5);

/// Re-reads the addresses every 5 s into `proxy`, for as long as the process runs.
pub async fn refresh(proxy: Arc<Proxy>) {
    loop {
        tokio::time::sleep(REFRESH).await;
        match LocalAddrs::discover() {
            Ok(l) => proxy.local_addrs.store(Arc::new(l)),
            Err(e) => tracing::warn!(error = %e, "re-reading interface addresses"),
        }
    }
}
