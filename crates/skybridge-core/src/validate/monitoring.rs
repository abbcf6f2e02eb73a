//! `spec.monitoring`: where the agents serve their metrics.

use std::net::SocketAddr;

use crate::model::Monitoring;
use crate::spec::MonitoringDoc;

use super::{Checker, pos};

pub(super) fn monitoring(c: &mut Checker, doc: &MonitoringDoc) -> Monitoring {
    let allow_remote = doc.metrics_allow_remote.as_ref().is_some_and(|a| a.value);
    let Some(listen) = &doc.metrics_listen else {
        return Monitoring::default();
    };
    let text = listen.value.trim();
    let Ok(addr) = text.parse::<SocketAddr>() else {
        c.error(
            pos(listen),
            format!("metricsListen '{text}' is not an ADDR:PORT"),
            "write an address and a TCP port, e.g. metricsListen: 127.0.0.1:9879",
        );
        return Monitoring::default();
    };
    if addr.port() == 0 {
        c.error(
            pos(listen),
            format!("metricsListen {addr} has port 0, which Prometheus cannot scrape"),
            "pick a fixed free TCP port, e.g. 127.0.0.1:9879",
        );
    } else if !addr.ip().is_loopback() && !allow_remote {
        c.error(
            pos(listen),
            format!(
                "metricsListen {addr} is not a loopback address: the metrics name every node and site of the cluster"
            ),
            "listen on 127.0.0.1 and scrape through a local agent, or add `metricsAllowRemote: true` under spec.monitoring to expose them to the monitoring network",
        );
    }
    Monitoring {
        metrics_listen: Some(addr),
    }
}
