//! `cloud-routes` format: what the VPC of an `intraSite: vpc-routes` site
//! must hold, which Skybridge cannot create itself (it never calls a
//! provider's API): every route-table entry (another site's network to the
//! active gateway) and the instance settings that let every gateway
//! candidate forward, as the provider's own command line.
//!
//! One file per such site, `<site>/cloud-routes.sh`, meant to be read and
//! then run: the IDs Skybridge does not know (route table, instances) are
//! shell variables the script refuses to run without. Every value it holds
//! from the cluster file is an address, a network or a validated name,
//! except the region, which is quoted.

use std::net::Ipv4Addr;

use skybridge_core::ClusterPlan;
use skybridge_core::layout::marks::{IFACE_PREFIX, RENDER_HEADER};
use skybridge_core::plan::{CloudRoute, CloudRoutes, SitePlan};

use crate::File;
use crate::common::{PUBLIC, Text};

pub(crate) const FILE_NAME: &str = "cloud-routes.sh";

/// The providers with their own command line, as the site's `provider` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Provider {
    Aws,
    Alibaba,
    Huawei,
    Tencent,
    Gcp,
    Azure,
    Generic,
}

impl Provider {
    fn of(name: &str) -> Provider {
        match name.trim().to_ascii_lowercase().as_str() {
            "aws" | "amazon" => Provider::Aws,
            "alibabacloud" | "aliyun" | "alibaba" => Provider::Alibaba,
            "huaweicloud" | "huawei" => Provider::Huawei,
            "tencentcloud" | "tencent" => Provider::Tencent,
            "gcp" | "google" | "gce" => Provider::Gcp,
            "azure" => Provider::Azure,
            _ => Provider::Generic,
        }
    }

    /// The provider's command-line tool.
    fn tool(self) -> Option<&'static str> {
        Some(match self {
            Provider::Aws => "aws",
            Provider::Alibaba => "aliyun",
            Provider::Huawei => "hcloud",
            Provider::Tencent => "tccli",
            Provider::Gcp => "gcloud",
            Provider::Azure => "az",
            Provider::Generic => return None,
        })
    }

    /// What the script needs to be told: (variable, what it is).
    fn route_table_variables(self, subnets: &str) -> Vec<(&'static str, String)> {
        let table = (
            "ROUTE_TABLE",
            format!("ID of the route table of the subnets {subnets}"),
        );
        match self {
            Provider::Gcp => vec![("NETWORK", "name of the VPC network".to_owned())],
            Provider::Azure => vec![
                ("RESOURCE_GROUP", "the resource group".to_owned()),
                (
                    "ROUTE_TABLE",
                    format!("name of the route table of the subnets {subnets}"),
                ),
            ],
            Provider::Generic => Vec::new(),
            _ => vec![table],
        }
    }

    /// What names one gateway instance in the provider's API: (variable
    /// suffix, what it is).
    fn instance_variables(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Provider::Aws | Provider::Alibaba => &[("INSTANCE", "instance ID")],
            Provider::Huawei => &[
                ("INSTANCE", "ECS instance ID"),
                ("PORT", "ID of the network interface (port)"),
            ],
            Provider::Gcp => &[("INSTANCE", "instance name")],
            Provider::Azure => &[("NIC", "network interface name")],
            Provider::Tencent | Provider::Generic => &[],
        }
    }
}

/// A string as one shell word, whatever it holds.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The shell variable holding a gateway's ID: node names are DNS labels,
/// which may start with a digit, hence the prefix.
fn variable(node: &str, suffix: &str) -> String {
    format!(
        "GW_{}_{suffix}",
        node.to_ascii_uppercase().replace('-', "_")
    )
}

/// A route's name where the provider wants one (GCP, Azure): stable, and
/// distinct per site and destination.
fn route_name(site: &str, e: &CloudRoute) -> String {
    let dest = e.destination.to_string().replace(['.', '/'], "-");
    format!("{IFACE_PREFIX}{site}-{dest}")
}

pub(crate) fn render(plan: &ClusterPlan) -> Vec<File> {
    plan.sites
        .iter()
        .filter_map(|s| {
            let routes = s.cloud_routes.as_ref()?;
            Some(File {
                path: format!("{}/{FILE_NAME}", s.name),
                mode: PUBLIC,
                contents: site_file(plan, s, routes),
            })
        })
        .collect()
}

fn site_file(plan: &ClusterPlan, site: &SitePlan, routes: &CloudRoutes) -> String {
    let provider = Provider::of(&routes.provider);
    let mut t = Text::default();
    t.line("#!/bin/sh");
    t.comment(format!(
        "{RENDER_HEADER} from cluster {} for site {}. Do not edit by hand:",
        plan.cluster, site.name
    ));
    t.comment("change the cluster file and render again.");
    t.comment("");
    t.comment(format!(
        "Site {} (provider {}{}) uses intraSite: vpc-routes: its nodes outside the",
        site.name,
        routes.provider,
        routes
            .region
            .as_ref()
            .map(|r| format!(", region {r}"))
            .unwrap_or_default()
    ));
    t.comment("active gateway's subnet reach other sites through the VPC's route table,");
    t.comment("which Skybridge cannot change itself. Review, set the variables, then run.");
    t.comment("");
    t.comment("Route-table entries (destination -> next hop):");
    for e in &routes.entries {
        t.comment(format!(
            "  {:<18} -> {} ({})  {}",
            e.destination.to_string(),
            e.next_hop,
            e.next_hop_ip,
            e.to
        ));
    }
    t.comment("Every gateway candidate must forward traffic that is not its own");
    t.comment("(source/destination check off, IP forwarding on), so that a failover only");
    t.comment("moves the entries: the site's onFailover command must point them at");
    t.comment("$SKYBRIDGE_NEW_GATEWAY (its private IP is in $SKYBRIDGE_NEW_GATEWAY_IP).");
    for i in &routes.instances {
        t.comment(format!(
            "  {} ({}){}",
            i.node,
            i.private_ip,
            if i.active { ", active" } else { "" }
        ));
    }
    let Some(tool) = provider.tool() else {
        t.comment("");
        t.comment(format!(
            "Skybridge knows no command line for provider {}: create the entries",
            routes.provider
        ));
        t.comment("above in the provider's console or API.");
        return t.finish();
    };
    t.blank();
    t.line("set -eu");
    let subnets = routes
        .subnets
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    for (var, what) in provider.route_table_variables(&subnets) {
        t.line(format!(": \"${{{var}:?{what}}}\""));
    }
    for (suffix, what) in provider.instance_variables() {
        for i in &routes.instances {
            t.line(format!(
                ": \"${{{}:?{what} of {} ({})}}\"",
                variable(&i.node, suffix),
                i.node,
                i.private_ip
            ));
        }
    }
    let region = routes.region.as_deref().map(quote);
    t.blank();
    t.comment("The gateway candidates forward traffic that is not their own.");
    for i in &routes.instances {
        instance_settings(&mut t, provider, region.as_deref(), &i.node, i.private_ip);
    }
    t.blank();
    t.comment(format!(
        "The route-table entries ({tool}); they follow the active gateway."
    ));
    for e in &routes.entries {
        t.line(entry(provider, region.as_deref(), &site.name, e));
    }
    t.finish()
}

/// ` --flag value`, or ` --flag=value` for a flag written with its `=`.
fn region_flag(flag: &str, quoted: &str) -> String {
    if flag.ends_with('=') {
        format!(" {flag}{quoted}")
    } else {
        format!(" {flag} {quoted}")
    }
}

fn instance_settings(
    t: &mut Text,
    provider: Provider,
    region: Option<&str>,
    node: &str,
    ip: Ipv4Addr,
) {
    let reg = |flag: &str| region.map(|r| region_flag(flag, r)).unwrap_or_default();
    match provider {
        Provider::Aws => t.line(format!(
            "aws ec2 modify-instance-attribute{} --instance-id \"${}\" --no-source-dest-check",
            reg("--region"),
            variable(node, "INSTANCE")
        )),
        Provider::Alibaba => {
            t.comment(format!(
                "{node} ({ip}): Alibaba Cloud hands a route entry's traffic to an ECS next hop as it"
            ));
            t.comment("is (turn off a source/destination check if you enabled one on its interface);");
            t.comment("the agent turns on IP forwarding in the node's kernel.");
        }
        Provider::Huawei => {
            t.comment(format!(
                "{node} ({ip}): allow any source on its port (Huawei Cloud's way to turn the check off)."
            ));
            t.line(format!(
                "hcloud VPC UpdatePort{} --port_id=\"${}\" --port.allowed_address_pairs.1.ip_address=1.1.1.1/0",
                reg("--cli-region="),
                variable(node, "PORT")
            ));
        }
        Provider::Tencent => {
            t.comment(format!(
                "{node} ({ip}): a CVM next hop is named by its private IP (turn off a"
            ));
            t.comment("source/destination check if you enabled one on its interface); the agent");
            t.comment("turns on IP forwarding in the node's kernel.");
        }
        Provider::Gcp => {
            t.comment(format!(
                "{node} ({ip}): IP forwarding is fixed when an instance is created (--can-ip-forward);"
            ));
            t.comment("this stops the script if it is off.");
            t.line(format!(
                "test \"$(gcloud compute instances describe \"${}\" --format='value(canIpForward)')\" = True",
                variable(node, "INSTANCE")
            ));
        }
        Provider::Azure => t.line(format!(
            "az network nic update --resource-group \"$RESOURCE_GROUP\" --name \"${}\" --ip-forwarding true",
            variable(node, "NIC")
        )),
        Provider::Generic => {}
    }
}

fn entry(provider: Provider, region: Option<&str>, site: &str, e: &CloudRoute) -> String {
    let reg = |flag: &str| region.map(|r| region_flag(flag, r)).unwrap_or_default();
    let (dest, gw, ip) = (e.destination, &e.next_hop, e.next_hop_ip);
    match provider {
        Provider::Aws => format!(
            "aws ec2 create-route{} --route-table-id \"$ROUTE_TABLE\" --destination-cidr-block {dest} --instance-id \"${}\"",
            reg("--region"),
            variable(gw, "INSTANCE")
        ),
        Provider::Alibaba => format!(
            "aliyun vpc CreateRouteEntry{} --RouteTableId \"$ROUTE_TABLE\" --DestinationCidrBlock {dest} --NextHopType Instance --NextHopId \"${}\"",
            reg("--RegionId"),
            variable(gw, "INSTANCE")
        ),
        Provider::Huawei => format!(
            "hcloud VPC UpdateRouteTable{} --routetable_id=\"$ROUTE_TABLE\" --routetable.routes.add.1.type=ecs --routetable.routes.add.1.destination={dest} --routetable.routes.add.1.nexthop=\"${}\"",
            reg("--cli-region="),
            variable(gw, "INSTANCE")
        ),
        Provider::Tencent => format!(
            "tccli vpc CreateRoutes{} --RouteTableId \"$ROUTE_TABLE\" --Routes '[{{\"DestinationCidrBlock\":\"{dest}\",\"GatewayType\":\"NORMAL_CVM\",\"GatewayId\":\"{ip}\"}}]'",
            reg("--region")
        ),
        Provider::Gcp => format!(
            "gcloud compute routes create {} --network=\"$NETWORK\" --destination-range={dest} --next-hop-address={ip} --priority=100",
            route_name(site, e)
        ),
        Provider::Azure => format!(
            "az network route-table route create --resource-group \"$RESOURCE_GROUP\" --route-table-name \"$ROUTE_TABLE\" --name {} --address-prefix {dest} --next-hop-type VirtualAppliance --next-hop-ip-address {ip}",
            route_name(site, e)
        ),
        Provider::Generic => format!("# {dest} -> {gw} ({ip})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_region_is_one_shell_word_whatever_it_holds() {
        assert_eq!(quote("eu-central-1"), "'eu-central-1'");
        assert_eq!(quote("x'; reboot; '"), r"'x'\''; reboot; '\'''");
    }

    #[test]
    fn provider_names_pick_their_tool_and_anything_else_is_generic() {
        for (name, tool) in [
            ("aws", Some("aws")),
            ("alibabacloud", Some("aliyun")),
            ("huaweicloud", Some("hcloud")),
            ("tencentcloud", Some("tccli")),
            ("gcp", Some("gcloud")),
            ("azure", Some("az")),
            ("hetzner", None),
        ] {
            assert_eq!(Provider::of(name).tool(), tool, "{name}");
        }
    }

    #[test]
    fn gateway_variables_are_shell_names_even_for_a_leading_digit() {
        assert_eq!(variable("1gw-a", "INSTANCE"), "GW_1GW_A_INSTANCE");
    }
}
