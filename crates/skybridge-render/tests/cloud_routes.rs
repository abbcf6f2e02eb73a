//! `render --format cloud-routes`: one snapshot per provider of what an
//! `intraSite: vpc-routes` site's VPC must hold, and what no other site gets.

use skybridge_core::{ClusterPlan, State, load, plan, plan_with};
use skybridge_render::{Format, render};

const ZONES: &str = include_str!("../../../examples/zones.yaml");

/// examples/zones.yaml with its multi-zone site on `provider`, in vpc-routes mode.
fn vpc_routes(provider: &str) -> String {
    ZONES
        .replace("intraSite: tunnel", "intraSite: vpc-routes")
        .replace("provider: aws", &format!("provider: {provider}"))
}

fn plan_of(src: &str) -> ClusterPlan {
    plan(&load(src).expect("valid").cluster, &State::default())
}

#[test]
fn every_provider_gets_its_own_commands() {
    for provider in [
        "aws",
        "alibabacloud",
        "huaweicloud",
        "tencentcloud",
        "gcp",
        "azure",
        "hetzner",
    ] {
        let files = render(&plan_of(&vpc_routes(provider)), Format::CloudRoutes, None).unwrap();
        assert_eq!(files.len(), 1, "{provider}: one vpc-routes site");
        assert_eq!(files[0].path, "aws/cloud-routes.sh");
        assert_eq!(files[0].mode, 0o644);
        insta::assert_snapshot!(format!("cloud_routes_{provider}"), files[0].contents);
    }
}

#[test]
fn the_entries_follow_the_active_gateway() {
    let v = load(&vpc_routes("aws")).unwrap();
    let actives = [("aws".to_owned(), "aws-gw-b".to_owned())].into();
    let p = plan_with(&v.cluster, &State::default(), &actives);
    let text = &render(&p, Format::CloudRoutes, None).unwrap()[0].contents;
    assert!(
        text.contains(
            "--destination-cidr-block 10.20.0.0/16 --instance-id \"$GW_AWS_GW_B_INSTANCE\""
        ),
        "{text}"
    );
    assert!(!text.contains("create-route --route-table-id \"$ROUTE_TABLE\" --destination-cidr-block 10.20.0.0/16 --instance-id \"$GW_AWS_GW_A"), "{text}");
}

#[test]
fn a_region_from_the_file_cannot_reach_the_shell_as_code() {
    let src = vpc_routes("aws").replace("region: eu-central-1", "region: \"x'; reboot; '\"");
    let text = &render(&plan_of(&src), Format::CloudRoutes, None).unwrap()[0].contents;
    assert!(text.contains(r"--region 'x'\''; reboot; '\'''"), "{text}");
    // And the script parses as sh.
    let out = std::process::Command::new("sh")
        .args(["-n", "-c", text])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn tunnel_sites_get_no_route_table_and_their_nodes_render_in_every_format() {
    let p = plan_of(ZONES);
    assert!(render(&p, Format::CloudRoutes, None).unwrap().is_empty());
    for (format, needle) in [
        (Format::Script, "sb-in-"),
        (Format::Networkd, "sb-in-"),
        (Format::Nftables, "udp dport 4789"),
    ] {
        let files = render(&p, format, None).unwrap();
        assert!(
            files
                .iter()
                .any(|f| f.path.starts_with("aws-c1/") && f.contents.contains(needle)),
            "{format:?}: {:?}",
            files.iter().map(|f| &f.path).collect::<Vec<_>>()
        );
    }
}
