//! What the admin endpoint shows of a server: readiness, metrics and the status document.

use crate::registry::Entry;
use crate::state::State;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tether_endpoint::admin::{AdminSource, NotReady};
use tether_endpoint::status::{
    CaStatus, ContestedAddress, NodeStatus, RefusedAddress, RotationStatus, ServerStatus, Service,
    Status, Upstream,
};
use tether_process::units::unix_seconds;

fn ca_status(s: &State) -> CaStatus {
    let trust = s.trust.borrow().clone();
    let rotation = s.rotation.read().unwrap_or_else(|p| p.into_inner()).clone();
    CaStatus {
        issuer: trust.issuer().to_string(),
        trusted: trust.hashes(),
        rotation: rotation.map(|r| RotationStatus {
            old: r.old,
            new: r.new,
            started: r.started,
            finished: r.finished,
        }),
        nodes_on_old_ca: crate::ca::pending(s),
    }
}

/// The admin endpoint's view of a server.
pub(crate) struct AdminView(pub(crate) Arc<State>);

impl AdminSource for AdminView {
    /// Ready while the upstream answers. An unreachable etcd does not make a server unready:
    /// it keeps serving from the last state it read, and the line says so.
    fn ready(&self) -> Result<String, NotReady> {
        if self.0.draining.load(Ordering::Relaxed) {
            Err(NotReady::Draining)
        } else if self.0.upstream.is_healthy() {
            if self.0.metrics.datastore.available() {
                Ok("ok".into())
            } else {
                Ok("ok (datastore unavailable: serving from the last state read; joins and renewals are refused)".into())
            }
        } else {
            Err(NotReady::UpstreamUnreachable(
                self.0.upstream.addr().to_string(),
            ))
        }
    }

    fn metrics(&self) -> String {
        self.0.metrics.render(&self.0.peers, &self.0.registry)
    }

    fn status(&self) -> Status {
        let s = &self.0;
        let nodes = s
            .registry
            .snapshot()
            .into_iter()
            .map(|(name, tunnels)| {
                let newest = tunnels.iter().max_by_key(|e| e.since);
                let sum = |f: fn(&Entry) -> u64| tunnels.iter().map(f).sum::<u64>();
                NodeStatus {
                    name,
                    address: newest.map(|e| e.remote.to_string()),
                    addresses: newest.map(|e| e.addresses.clone()).unwrap_or_default(),
                    refused_addresses: newest
                        .map(|e| {
                            e.refused
                                .iter()
                                .map(|(address, owner)| RefusedAddress {
                                    address: address.clone(),
                                    owner: owner.clone(),
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                    transport: newest.map(|e| e.tunnel.kind().to_string()),
                    key_exchange: newest
                        .and_then(|e| e.tunnel.key_exchange())
                        .map(String::from),
                    tunnels: tunnels.len(),
                    streams: sum(|e| e.streams.load(Ordering::Relaxed) as u64),
                    bytes_from_node: sum(|e| e.meter.from_tunnel.load(Ordering::Relaxed)),
                    bytes_to_node: sum(|e| e.meter.to_tunnel.load(Ordering::Relaxed)),
                    connected_since: tunnels.iter().map(|e| unix_seconds(e.since)).min(),
                    certificate_expiry: newest.map(|e| e.cert_not_after),
                    capabilities: newest.map(|e| e.capabilities.names()).unwrap_or_default(),
                    ca: newest.and_then(|e| e.issuer.clone()),
                }
            })
            .collect();
        let expiry = s.metrics.shared.cert_expiry.get();
        Status::Server(ServerStatus {
            version: tether_process::VERSION.into(),
            instance: s.instance_id.clone(),
            listen: s.endpoint.local_addr().map(|a| a.to_string()).ok(),
            advertise: s.announcer.advertise().map(String::from),
            draining: s.draining.load(Ordering::Relaxed),
            upstream: Upstream {
                address: s.upstream.addr().to_string(),
                healthy: s.upstream.is_healthy(),
            },
            services: s
                .config
                .services
                .iter()
                .map(|(name, address)| Service {
                    name: name.clone(),
                    address: address.clone(),
                })
                .collect(),
            certificate_expiry: (expiry > 0).then_some(expiry),
            nodes,
            contested_addresses: s
                .authority
                .contested()
                .into_iter()
                .map(|(address, nodes)| ContestedAddress {
                    address: address.to_string(),
                    nodes,
                })
                .collect(),
            configured_peers: s.config.peers.clone(),
            peers: s.peers.all().into_iter().map(|l| l.status()).collect(),
            datastore: tether_endpoint::status::Datastore {
                kind: s.config.datastore.name().into(),
                available: s.metrics.datastore.available(),
                revision: s.metrics.datastore.revision.load(Ordering::Relaxed),
                endpoints: s
                    .authority
                    .store()
                    .etcd()
                    .map(|e| e.endpoints())
                    .unwrap_or_default(),
            },
            ca: ca_status(s),
        })
    }
}
