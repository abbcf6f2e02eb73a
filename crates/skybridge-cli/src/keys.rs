//! WireGuard key generation for `render --generate-keys`.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use skybridge_core::Cluster;
use x25519_dalek::{PublicKey, StaticSecret};

/// A fresh key pair, base64 as `wg genkey` / `wg pubkey` print them.
pub fn generate() -> (String, String) {
    let secret = StaticSecret::random_from_rng(rand_core::OsRng);
    let public = PublicKey::from(&secret);
    (
        STANDARD.encode(secret.to_bytes()),
        STANDARD.encode(public.as_bytes()),
    )
}

/// One key pair per node: (private keys, public keys) by node name.
pub fn generate_for(cluster: &Cluster) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let mut private = BTreeMap::new();
    let mut public = BTreeMap::new();
    for (_, node) in cluster.nodes() {
        let (sk, pk) = generate();
        private.insert(node.name.clone(), sk);
        public.insert(node.name.clone(), pk);
    }
    (private, public)
}
