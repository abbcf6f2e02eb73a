//! Kernel prerequisites of a Kubernetes node, persisted the distribution way:
//! modules in /etc/modules-load.d, sysctls in /etc/sysctl.d, swap entries of
//! /etc/fstab commented out (kubelet refuses to run with swap on).

/// Loaded at boot by systemd-modules-load.
pub const MODULES_PATH: &str = "/etc/modules-load.d/skybridge-kubernetes.conf";
/// Applied at boot by systemd-sysctl (after the modules above).
pub const SYSCTL_PATH: &str = "/etc/sysctl.d/90-skybridge-kubernetes.conf";
pub const FSTAB_PATH: &str = "/etc/fstab";

/// overlay for containerd's snapshotter; br_netfilter so that bridged pod
/// traffic passes iptables (kube-proxy's service rules).
pub const MODULES: [&str; 2] = ["overlay", "br_netfilter"];

pub const SYSCTLS: [(&str, &str); 3] = [
    ("net.bridge.bridge-nf-call-iptables", "1"),
    ("net.bridge.bridge-nf-call-ip6tables", "1"),
    ("net.ipv4.ip_forward", "1"),
];

/// Marks the fstab lines join commented out, so that an operator sees why.
pub const FSTAB_MARK: &str = "# swap off for kubelet (skybridge join): ";

pub fn modules_file(header: &str) -> String {
    let mut out = format!("{header}: kernel modules a Kubernetes node needs.\n");
    for m in MODULES {
        out.push_str(m);
        out.push('\n');
    }
    out
}

pub fn sysctl_file(header: &str) -> String {
    let mut out = format!("{header}: kernel settings a Kubernetes node needs.\n");
    for (k, v) in SYSCTLS {
        out.push_str(&format!("{k} = {v}\n"));
    }
    out
}

/// `/proc/sys` path of a sysctl.
pub fn proc_path(key: &str) -> String {
    format!("/proc/sys/{}", key.replace('.', "/"))
}

/// fstab with every active swap entry commented out; everything else as it was.
pub fn fstab_without_swap(fstab: &str) -> String {
    let mut out = String::with_capacity(fstab.len());
    for line in fstab.split_inclusive('\n') {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let is_swap = !line.trim_start().starts_with('#') && fields.get(2) == Some(&"swap");
        if is_swap {
            out.push_str(FSTAB_MARK);
        }
        out.push_str(line);
    }
    out
}

/// Whether `/proc/swaps` lists an active swap area.
pub fn swap_active(proc_swaps: &str) -> bool {
    proc_swaps.lines().skip(1).any(|l| !l.trim().is_empty())
}

/// `/sys/module/<name>` exists for a loaded or built-in module.
pub fn sys_module_path(module: &str) -> String {
    format!("/sys/module/{module}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_active_swap_lines_are_commented_out() {
        let fstab = "# /etc/fstab\nUUID=abc / ext4 errors=remount-ro 0 1\n/swapfile none swap sw 0 0\n# /old none swap sw 0 0\nUUID=def none  swap  sw  0 0";
        let out = fstab_without_swap(fstab);
        assert_eq!(
            out,
            format!(
                "# /etc/fstab\nUUID=abc / ext4 errors=remount-ro 0 1\n{FSTAB_MARK}/swapfile none swap sw 0 0\n# /old none swap sw 0 0\n{FSTAB_MARK}UUID=def none  swap  sw  0 0"
            )
        );
        assert_eq!(
            fstab_without_swap(&out),
            out,
            "a second pass changes nothing"
        );
    }

    #[test]
    fn proc_files_are_read() {
        assert!(!swap_active(
            "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
        ));
        assert!(swap_active(
            "Filename Type Size Used Priority\n/swapfile file 1048572 0 -2\n"
        ));
        assert_eq!(
            proc_path("net.ipv4.ip_forward"),
            "/proc/sys/net/ipv4/ip_forward"
        );
    }
}
