//! Validation of `spec.kubernetes` and of the sites' Kubernetes overrides:
//! what `skybridge join` writes onto every node must be right before any
//! node is touched, so every check here reports with its position.

use std::collections::BTreeMap;

use ipnet::Ipv4Net;

use super::{Checker, Claim, pos};
use crate::diag::Pos;
use crate::model::{
    Containerd, DEFAULT_API_SERVER_PORT, DEFAULT_CLUSTER_DOMAIN, DEFAULT_SANDBOX_IMAGE, Join,
    KubeVersion, Kubernetes, MIN_KUBERNETES_MINOR, Site,
};
use crate::spec::{ContainerdDoc, JoinDoc, KubernetesDoc, S, SiteDoc};

/// What the site checks need of `spec.kubernetes`, also when some other part
/// of it is wrong (so that one run still reports every problem).
pub(super) struct Parts {
    /// `None` when something is wrong (already reported).
    pub kubernetes: Option<Kubernetes>,
    pub containerd: Containerd,
    pub pod_cidr: Option<Ipv4Net>,
}

/// Checks `spec.kubernetes`; the service CIDR joins `claims` so that it may
/// overlap nothing else.
pub(super) fn cluster(c: &mut Checker, doc: &S<KubernetesDoc>, claims: &mut Vec<Claim>) -> Parts {
    let k = &doc.value;
    let version = version(c, &k.version);
    let api_server = api_server(c, &k.api_server);
    let service_cidr = c.cidr(&k.service_cidr, "kubernetes serviceCIDR");
    let pod_cidr = c.cidr(&k.pod_cidr, "kubernetes podCIDR");
    let cluster_dns = c.ipv4(&k.cluster_dns, "kubernetes clusterDNS");
    if let (Some(net), Some(dns)) = (service_cidr, cluster_dns)
        && !net.contains(&dns)
    {
        c.error(
            pos(&k.cluster_dns),
            format!("kubernetes clusterDNS {dns} is outside serviceCIDR {net}"),
            "clusterDNS is the cluster IP of the DNS service: take it from the serviceCIDR (usually its .10)",
        );
    }
    if let Some(net) = service_cidr {
        claims.push(Claim {
            net,
            owner: "kubernetes serviceCIDR".into(),
            pos: pos(&k.service_cidr),
        });
    }
    let cluster_domain = match &k.cluster_domain {
        None => Some(DEFAULT_CLUSTER_DOMAIN.to_owned()),
        Some(d) if is_dns_name(&d.value) => Some(d.value.clone()),
        Some(d) => {
            c.error(
                pos(d),
                format!("kubernetes clusterDomain '{}' is not a DNS domain", d.value),
                "leave it out for cluster.local, or use the domain the cluster was created with",
            );
            None
        }
    };
    let base = Containerd {
        sandbox_image: DEFAULT_SANDBOX_IMAGE.to_owned(),
        registry_mirrors: BTreeMap::new(),
        systemd_cgroup: true,
    };
    let containerd = match &k.containerd {
        Some(over) => containerd(c, &base, &over.value, "kubernetes containerd"),
        None => base,
    };
    let join = join(c, &k.join);
    let complete = || {
        Some(Kubernetes {
            version: version?,
            api_server: api_server?,
            cluster_dns: cluster_dns?,
            cluster_domain: cluster_domain?,
            service_cidr: service_cidr?,
            pod_cidr: pod_cidr?,
            containerd: containerd.clone(),
            join: join?,
        })
    };
    Parts {
        kubernetes: complete(),
        containerd: containerd.clone(),
        pod_cidr,
    }
}

/// Everything that depends on both `spec.kubernetes` and the sites: the
/// sites' effective containerd settings, zones, topology label values, and
/// the pod network against the site networks.
pub(super) fn sites(
    c: &mut Checker,
    docs: &[SiteDoc],
    sites: &mut [Site],
    kube: Option<&Parts>,
    kube_pos: Pos,
    other_networks: &[(Ipv4Net, String, Pos)],
) {
    for (sd, site) in docs.iter().zip(sites.iter_mut()) {
        site.zone = sd.zone.as_ref().map(|z| z.value.clone());
        for (nd, node) in sd.nodes.value.iter().zip(site.nodes.iter_mut()) {
            node.zone = nd.zone.as_ref().map(|z| z.value.clone());
        }
        let Some(kube) = kube else {
            if let Some(over) = &sd.kubernetes {
                c.error(
                    pos(over),
                    format!(
                        "site {}: kubernetes overrides without spec.kubernetes",
                        site.name
                    ),
                    "add spec.kubernetes (version, apiServer, clusterDNS, serviceCIDR, podCIDR, join) or remove the site's kubernetes section",
                );
            }
            continue;
        };
        site.containerd = Some(
            match sd
                .kubernetes
                .as_ref()
                .and_then(|k| k.value.containerd.as_ref())
            {
                Some(over) => containerd(
                    c,
                    &kube.containerd,
                    &over.value,
                    &format!("site {} kubernetes containerd", site.name),
                ),
                None => kube.containerd.clone(),
            },
        );
        let pod_net = kube.pod_cidr;
        // The values become node labels: topology.kubernetes.io/region and
        // zone, skybridge.dev/site and provider.
        label_value(c, &sd.provider, &format!("site {} provider", site.name));
        if let Some(r) = &sd.region {
            label_value(c, r, &format!("site {} region", site.name));
        }
        if let Some(z) = &sd.zone {
            label_value(c, z, &format!("site {} zone", site.name));
        }
        for nd in &sd.nodes.value {
            if let Some(z) = &nd.zone {
                label_value(c, z, &format!("node {} zone", nd.name.value));
            }
            if let Some(p) = &nd.pod_cidr
                && let Some(pod_net) = pod_net
                && let Ok(net) = p.value.trim().parse::<Ipv4Net>()
                && !pod_net.contains(&net)
            {
                c.error(
                    pos(p),
                    format!(
                        "node {}: podCIDR {net} is outside the cluster's podCIDR {}",
                        nd.name.value, pod_net
                    ),
                    "a node's pods get addresses from the cluster's pod network: pick a subnet of spec.kubernetes.podCIDR",
                );
            }
        }
    }
    if let Some(pod_net) = kube.and_then(|k| k.pod_cidr) {
        for (net, owner, at) in other_networks {
            if net.contains(&pod_net.network()) || pod_net.contains(&net.network()) {
                c.error(
                    kube_pos,
                    format!(
                        "kubernetes podCIDR {pod_net} overlaps {owner} {net} (line {})",
                        at.line
                    ),
                    "pods need an address range of their own that no VPC, tunnel pool or service network uses",
                );
            }
        }
    }
}

fn version(c: &mut Checker, v: &S<String>) -> Option<KubeVersion> {
    let text = v.value.trim();
    let parts: Option<Vec<u32>> = text
        .strip_prefix('v')
        .unwrap_or(text)
        .split('.')
        .map(|p| p.parse().ok())
        .collect();
    let Some([major, minor, patch]) = parts.as_deref().and_then(|p| <[u32; 3]>::try_from(p).ok())
    else {
        c.error(
            pos(v),
            format!("kubernetes version '{text}' is not a release version"),
            "write the control plane's version as vMAJOR.MINOR.PATCH, e.g. v1.30.4 (kubectl version)",
        );
        return None;
    };
    if major != 1 || minor < MIN_KUBERNETES_MINOR {
        c.error(
            pos(v),
            format!("kubernetes version {text} is not supported"),
            format!("skybridge join writes kubelet configuration for Kubernetes v1.{MIN_KUBERNETES_MINOR} or newer"),
        );
        return None;
    }
    Some(KubeVersion {
        major,
        minor,
        patch,
    })
}

fn api_server(c: &mut Checker, v: &S<String>) -> Option<String> {
    let text = v.value.trim();
    let hint = "write the API server's (or its load balancer's) address as the nodes reach it, e.g. https://192.168.0.10:6443";
    let Some(rest) = text.strip_prefix("https://") else {
        c.error(
            pos(v),
            format!("kubernetes apiServer '{text}' is not an https:// URL"),
            hint,
        );
        return None;
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => match p.parse::<u16>() {
            Ok(p) if p != 0 => (h, p),
            _ => {
                c.error(
                    pos(v),
                    format!("kubernetes apiServer '{text}' has an invalid port"),
                    hint,
                );
                return None;
            }
        },
        None => (rest, DEFAULT_API_SERVER_PORT),
    };
    if host.parse::<std::net::Ipv4Addr>().is_err() && !is_dns_name(host) {
        c.error(
            pos(v),
            format!(
                "kubernetes apiServer '{text}': '{host}' is neither an IPv4 address nor a host name"
            ),
            hint,
        );
        return None;
    }
    Some(format!("https://{host}:{port}"))
}

fn containerd(c: &mut Checker, base: &Containerd, doc: &ContainerdDoc, what: &str) -> Containerd {
    let mut out = base.clone();
    if let Some(img) = &doc.sandbox_image {
        let t = img.value.trim();
        if is_image_ref(t) {
            t.clone_into(&mut out.sandbox_image);
        } else {
            c.error(
                pos(img),
                format!("{what}: sandboxImage '{t}' is not an image reference"),
                "write registry/repository:tag from a registry every node of the site can reach, e.g. registry.k8s.io/pause:3.9",
            );
        }
    }
    if let Some(cg) = &doc.systemd_cgroup {
        out.systemd_cgroup = cg.value;
    }
    if let Some(mirrors) = &doc.registry_mirrors {
        for (registry, endpoints) in &mirrors.value {
            if !is_registry_host(registry) {
                c.error(
                    pos(mirrors),
                    format!("{what}: registryMirrors key '{registry}' is not a registry host"),
                    "use the registry's host name as images name it (docker.io, registry.k8s.io, quay.io, host:port), or _default for every registry",
                );
                continue;
            }
            if endpoints.value.is_empty() {
                c.error(
                    pos(endpoints),
                    format!("{what}: registryMirrors.{registry} lists no endpoint"),
                    "list mirror URLs such as https://mirror.example.com, or remove the registry",
                );
                continue;
            }
            let mut list = Vec::new();
            for e in &endpoints.value {
                let t = e.value.trim();
                let host = t
                    .strip_prefix("https://")
                    .or_else(|| t.strip_prefix("http://"));
                match host {
                    Some(h)
                        if !h.is_empty()
                            && !h.contains(char::is_whitespace)
                            && !h.contains('"') =>
                    {
                        list.push(t.trim_end_matches('/').to_owned());
                    }
                    _ => c.error(
                        pos(e),
                        format!(
                            "{what}: registry mirror '{t}' for {registry} is not an http(s) URL"
                        ),
                        "write the mirror's URL with its scheme, e.g. https://mirror.example.com",
                    ),
                }
            }
            out.registry_mirrors.insert(registry.clone(), list);
        }
    }
    out
}

fn join(c: &mut Checker, doc: &S<JoinDoc>) -> Option<Join> {
    let j = &doc.value;
    match (&j.kubeadm, &j.bootstrap) {
        (Some(_), Some(b)) => {
            c.error(
                pos(b),
                "kubernetes join names both kubeadm and bootstrap",
                "keep one: kubeadm (kubeadm join with token and caCertHash) or bootstrap (kubelet TLS bootstrapping)",
            );
            None
        }
        (None, None) => {
            c.error(
                pos(doc),
                "kubernetes join names neither kubeadm nor bootstrap",
                "add kubeadm: {token, caCertHash} or bootstrap: {token, caCertFile, binaries}",
            );
            None
        }
        (Some(k), None) => {
            let token = token(c, &k.value.token);
            let hash = k.value.ca_cert_hash.value.trim();
            let hash_ok = hash
                .strip_prefix("sha256:")
                .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
            if !hash_ok {
                c.error(
                    pos(&k.value.ca_cert_hash),
                    "kubernetes join.kubeadm caCertHash is not sha256:<64 hex digits>",
                    "copy it from `kubeadm token create --print-join-command` on a control-plane node",
                );
            }
            let binaries = match &k.value.binaries {
                Some(b) => abs_path(c, b, "kubernetes join.kubeadm binaries")?,
                None => "/usr/bin".to_owned(),
            };
            Some(Join::Kubeadm {
                token: token?,
                ca_cert_hash: hash_ok.then(|| hash.to_ascii_lowercase())?,
                binaries,
            })
        }
        (None, Some(b)) => {
            let token = token(c, &b.value.token);
            let binaries = abs_path(c, &b.value.binaries, "kubernetes join.bootstrap binaries");
            let ca = b.value.ca_cert_file.value.trim();
            if ca.is_empty() {
                c.error(
                    pos(&b.value.ca_cert_file),
                    "kubernetes join.bootstrap caCertFile is empty",
                    "name the cluster CA certificate (ca.crt, public part only), relative to the cluster file",
                );
                return None;
            }
            Some(Join::Bootstrap {
                token: token?,
                ca_cert_file: ca.to_owned(),
                binaries: binaries?,
            })
        }
    }
}

fn token(c: &mut Checker, t: &S<String>) -> Option<String> {
    let text = t.value.trim();
    let ok = text.split_once('.').is_some_and(|(id, secret)| {
        let lower = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        };
        id.len() == 6 && secret.len() == 16 && lower(id) && lower(secret)
    });
    if ok {
        Some(text.to_owned())
    } else {
        // Never echo the value, not even its source line: it is a credential.
        c.diags.push(
            crate::diag::Diagnostic::error(
                pos(t),
                "kubernetes join token is not a bootstrap token ([a-z0-9]{6}.[a-z0-9]{16})",
            )
            .with_hint(
                "create one on a control-plane node with `kubeadm token create` and paste it as is",
            )
            .concealing_source(),
        );
        None
    }
}

fn abs_path(c: &mut Checker, p: &S<String>, what: &str) -> Option<String> {
    let t = p.value.trim();
    if t.starts_with('/') && !t.contains(char::is_whitespace) {
        let trimmed = t.trim_end_matches('/');
        Some(if trimmed.is_empty() { "/" } else { trimmed }.to_owned())
    } else {
        c.error(
            pos(p),
            format!("{what} '{t}' is not an absolute path on the node"),
            "write the directory on the node that holds the binaries, e.g. /opt/kubernetes/bin",
        );
        None
    }
}

fn label_value(c: &mut Checker, v: &S<String>, what: &str) {
    let t = &v.value;
    let ok = t.len() <= 63
        && !t.is_empty()
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && t.as_bytes()[0].is_ascii_alphanumeric()
        && t.as_bytes()[t.len() - 1].is_ascii_alphanumeric();
    if !ok {
        c.error(
            pos(v),
            format!("{what} '{t}' cannot be a Kubernetes label value"),
            "use at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit: it becomes a node label",
        );
    }
}

pub(super) fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

fn is_registry_host(s: &str) -> bool {
    if s == "_default" {
        return true;
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    is_dns_name(host) && port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p != 0))
}

fn is_image_ref(s: &str) -> bool {
    !s.is_empty()
        && !s.contains("://")
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/' | b':' | b'@')
        })
        && s.as_bytes()[0].is_ascii_alphanumeric()
}

#[cfg(test)]
mod tests {
    use crate::model::Join;
    use crate::validate::load;

    const LAB: &str = include_str!("../../../../examples/lab.yaml");
    const SEED: &str = include_str!("../../../../examples/seed.yaml");

    fn errors(src: &str) -> Vec<String> {
        match load(src) {
            Ok(_) => vec![],
            Err(d) => d
                .iter()
                .filter(|d| d.is_error())
                .map(ToString::to_string)
                .collect(),
        }
    }

    #[test]
    fn site_overrides_merge_over_the_cluster_settings() {
        let c = load(LAB).unwrap().cluster;
        let k = c.kubernetes.as_ref().unwrap();
        assert_eq!(k.api_server, "https://192.168.0.10:6443");
        assert_eq!(k.version.to_string(), "v1.30.4");
        let hw = c.sites[0].containerd.as_ref().unwrap();
        assert_eq!(hw.sandbox_image, "registry.huawei.example/k8s/pause:3.9");
        // The site adds docker.io and keeps the cluster's registry.k8s.io mirror.
        assert_eq!(
            hw.registry_mirrors.keys().collect::<Vec<_>>(),
            ["docker.io", "registry.k8s.io"]
        );
        assert!(hw.systemd_cgroup);
        let tc = c.sites[2].containerd.as_ref().unwrap();
        assert_eq!(tc.sandbox_image, crate::model::DEFAULT_SANDBOX_IMAGE);
        assert_eq!(c.sites[0].zone.as_deref(), Some("cn-east-3a"));
        assert!(matches!(k.join, Join::Bootstrap { .. }));
        let seed = load(SEED).unwrap().cluster;
        assert!(matches!(
            seed.kubernetes.unwrap().join,
            Join::Kubeadm { ref binaries, .. } if binaries == "/usr/bin"
        ));
    }

    #[test]
    fn a_file_without_kubernetes_has_no_containerd_settings() {
        let end = SEED.find("      kubernetes:").unwrap();
        let c = load(&SEED[..end]).unwrap().cluster;
        assert!(c.kubernetes.is_none());
        assert!(c.sites.iter().all(|s| s.containerd.is_none()));
    }

    #[test]
    fn every_kubernetes_error_is_reported_at_once_with_its_line() {
        let src = LAB
            .replace("version: v1.30.4", "version: v1.22.0")
            .replace("https://192.168.0.10:6443", "192.168.0.10:6443")
            .replace("clusterDNS: 10.96.0.10", "clusterDNS: 10.0.0.10")
            .replace("podCIDR: 10.244.0.0/16", "podCIDR: 10.20.0.0/16")
            .replace("token: 07401b.f395accd246ae52d", "token: hunter2")
            .replace("binaries: /opt/kubernetes/bin", "binaries: opt/bin")
            .replace(
                "[https://docker-mirror.huawei.example]",
                "[docker-mirror.huawei.example]",
            )
            .replace("zone: cn-east-3a", "zone: 'cn east'");
        let e = errors(&src);
        let want = [
            "15:14: error: kubernetes version v1.22.0 is not supported",
            "16:16: error: kubernetes apiServer '192.168.0.10:6443' is not an https:// URL",
            "17:17: error: kubernetes clusterDNS 10.0.0.10 is outside serviceCIDR 10.96.0.0/12",
            "19:14: error: kubernetes podCIDR 10.20.0.0/16 overlaps site tencent 10.20.0.0/16",
            "26:16: error: kubernetes join token is not a bootstrap token",
            "28:19: error: kubernetes join.bootstrap binaries 'opt/bin' is not an absolute path",
            "33:13: error: site huawei zone 'cn east' cannot be a Kubernetes label value",
            "error: site huawei kubernetes containerd: registry mirror 'docker-mirror.huawei.example' for docker.io is not an http(s) URL",
        ];
        for w in want {
            assert!(e.iter().any(|m| m.contains(w)), "missing {w:?} in {e:#?}");
        }
        assert!(
            !e.iter().any(|m| m.contains("hunter2")),
            "a token must never be echoed: {e:#?}"
        );
    }

    #[test]
    fn join_needs_exactly_one_method() {
        let both = SEED.replace(
            "    join:\n      kubeadm:",
            "    join:\n      bootstrap: { token: abcdef.0123456789abcdef, caCertFile: ca.crt, binaries: /opt/bin }\n      kubeadm:",
        );
        let e = errors(&both);
        assert!(
            e.iter()
                .any(|m| m.contains("names both kubeadm and bootstrap")),
            "{e:?}"
        );
        let bad_hash = SEED.replace("caCertHash: sha256:8cb2", "caCertHash: md5:8cb2");
        let e = errors(&bad_hash);
        assert!(
            e.iter()
                .any(|m| m.contains("caCertHash is not sha256:<64 hex digits>")),
            "{e:?}"
        );
    }

    #[test]
    fn site_overrides_need_spec_kubernetes() {
        let start = SEED.find("  kubernetes:                 # for").unwrap();
        let e = errors(&SEED[..start]);
        assert!(
            e.iter()
                .any(|m| m.contains("site aliyun: kubernetes overrides without spec.kubernetes")),
            "{e:?}"
        );
    }

    #[test]
    fn service_network_may_not_overlap_a_site_and_pod_cidrs_nest() {
        let src = LAB
            .replace("serviceCIDR: 10.96.0.0/12", "serviceCIDR: 10.16.0.0/12")
            .replace("clusterDNS: 10.96.0.10", "clusterDNS: 10.16.0.10")
            .replace(
                "{ name: tc-worker, privateIP: 10.20.1.6,",
                "{ name: tc-worker, privateIP: 10.20.1.6, podCIDR: 10.245.1.0/24,",
            );
        let e = errors(&src);
        assert!(
            e.iter()
                .any(|m| m.contains("overlaps kubernetes serviceCIDR 10.16.0.0/12")),
            "{e:?}"
        );
        assert!(
            e.iter().any(|m| m
                .contains("node tc-worker: podCIDR 10.245.1.0/24 is outside the cluster's podCIDR 10.244.0.0/16")),
            "{e:?}"
        );
    }
}
