//! Fault injection (Istio's `HTTPFaultInjection`): before a request of the rule is forwarded, a
//! delay for a share of them, then an abort — an answer the proxy makes, the upstream never asked
//! — for a share of them. As in Envoy, the rule's timeout does not include the delay.

use http::{Response, StatusCode};

use super::{
    access_log::AccessLog,
    body::{grpc_response, local_response, ProxyBody},
};
use crate::{config::AbortStatus, data::policy::FaultInjection};

/// Envoy's body for an injected abort.
const ABORT_BODY: &str = "fault filter abort";

/// Waits for the delay this request draws, if any; then answers with the abort it draws, if any
/// (`Err`), else hands the log line back to go on with.
pub(super) async fn inject(
    fault: &FaultInjection,
    grpc: bool,
    log: AccessLog,
) -> Result<AccessLog, Response<ProxyBody>> {
    if let Some(d) = fault.delay() {
        tokio::time::sleep(d).await;
    }
    let Some(abort) = fault.abort() else { return Ok(log) };
    Err(match abort {
        // An HTTP status reaches a gRPC client as the gRPC status it maps to, like every local answer.
        AbortStatus::Http(s) => {
            let status = StatusCode::from_u16(s).expect("validated: 200-599");
            log.local(status, "fault injected: abort", ABORT_BODY);
            local_response(grpc, status, ABORT_BODY)
        }
        AbortStatus::Grpc(code) => {
            log.local(StatusCode::OK, "fault injected: abort (gRPC status)", ABORT_BODY);
            grpc_response(u16::from(code.0), ABORT_BODY)
        }
    })
}
