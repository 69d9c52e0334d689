//! Where http(s) image fetches may connect: the egress policy deciding per IP address, and its
//! enforcement on reqwest's connections (a resolver that hands out only allowed addresses and a
//! redirect policy that re-checks every hop), so a caller cannot turn the server against its
//! own network.

use std::{
    error::Error as StdError,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::{Host, Url};

/// Redirects followed per fetch. Each hop is another destination to check and another chance to
/// stall the fetch; real image hosts need one or two.
pub const MAX_REDIRECTS: usize = 3;

const fn v4(a: u8, b: u8, c: u8, d: u8, len: u8) -> IpNet {
    IpNet::new_assert(IpAddr::V4(Ipv4Addr::new(a, b, c, d)), len)
}

#[allow(clippy::too_many_arguments)]
const fn v6(a: u16, b: u16, c: u16, d: u16, e: u16, f: u16, g: u16, h: u16, len: u8) -> IpNet {
    IpNet::new_assert(IpAddr::V6(Ipv6Addr::new(a, b, c, d, e, f, g, h)), len)
}

/// The ranges `--fetch-allow-private` opens: where in-cluster object stores live.
const PRIVATE: &[IpNet] =
    &[v4(10, 0, 0, 0, 8), v4(172, 16, 0, 0, 12), v4(192, 168, 0, 0, 16), v6(0xfc00, 0, 0, 0, 0, 0, 0, 0, 7)];

/// Instance metadata and host-agent endpoints, which hand out credentials to whoever asks from
/// inside the machine. Two sit inside the private ranges (AWS and GCP over IPv6) and one in
/// public space (Azure's WireServer), so `--fetch-allow-private` must not open them and the
/// public default must not either; only an explicit `--fetch-allow` does.
const METADATA: &[IpNet] = &[
    v4(169, 254, 169, 254, 32),
    v4(100, 100, 100, 200, 32),
    v4(168, 63, 129, 16, 32),
    v6(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254, 128),
    v6(0xfd20, 0x00ce, 0, 0, 0, 0, 0, 0x0254, 128),
];

/// Everything that is not ordinary public unicast space: this host, the local networks, ranges
/// no image host lives in, and the IPv6 forms that carry an IPv4 address (they would reach the
/// IPv4 destination they embed while looking like IPv6). Public space is allowed.
const DEFAULT_DENY: &[IpNet] = &[
    // "This network", including the unspecified 0.0.0.0, which connects to this host.
    v4(0, 0, 0, 0, 8),
    v4(10, 0, 0, 0, 8),
    // Carrier-grade NAT: the provider's side of the network (Alibaba's metadata lives here).
    v4(100, 64, 0, 0, 10),
    v4(127, 0, 0, 0, 8),
    v4(169, 254, 0, 0, 16),
    v4(172, 16, 0, 0, 12),
    // IETF protocol assignments (Oracle's metadata, 192.0.0.192, is one).
    v4(192, 0, 0, 0, 24),
    v4(192, 0, 2, 0, 24),
    // The deprecated 6to4 relay anycast: it forwards into 6to4 tunnels, wherever they lead.
    v4(192, 88, 99, 0, 24),
    v4(192, 168, 0, 0, 16),
    v4(198, 18, 0, 0, 15),
    v4(198, 51, 100, 0, 24),
    v4(203, 0, 113, 0, 24),
    v4(224, 0, 0, 0, 4),
    // Reserved, up to and including the broadcast address 255.255.255.255.
    v4(240, 0, 0, 0, 4),
    v6(0, 0, 0, 0, 0, 0, 0, 0, 128),
    v6(0, 0, 0, 0, 0, 0, 0, 1, 128),
    // IPv4-compatible (deprecated; contains :: and ::1 too) and IPv4-mapped addresses.
    v6(0, 0, 0, 0, 0, 0, 0, 0, 96),
    v6(0, 0, 0, 0, 0, 0xffff, 0, 0, 96),
    // NAT64, well-known and local-use prefixes.
    v6(0x64, 0xff9b, 0, 0, 0, 0, 0, 0, 96),
    v6(0x64, 0xff9b, 1, 0, 0, 0, 0, 0, 48),
    // Discard-only.
    v6(0x100, 0, 0, 0, 0, 0, 0, 0, 64),
    // IETF protocol assignments: Teredo (2001::/32, which tunnels to an embedded IPv4 address),
    // benchmarking and ORCHID; no image host lives there.
    v6(0x2001, 0, 0, 0, 0, 0, 0, 0, 23),
    v6(0x2001, 0, 0, 0, 0, 0, 0, 0, 32),
    v6(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0, 32),
    // 6to4: tunnels to the IPv4 address in bits 16..48.
    v6(0x2002, 0, 0, 0, 0, 0, 0, 0, 16),
    // Documentation (RFC 9637).
    v6(0x3fff, 0, 0, 0, 0, 0, 0, 0, 20),
    // Segment-routing identifiers (RFC 9602): network functions, not hosts.
    v6(0x5f00, 0, 0, 0, 0, 0, 0, 0, 16),
    v6(0xfc00, 0, 0, 0, 0, 0, 0, 0, 7),
    v6(0xfe80, 0, 0, 0, 0, 0, 0, 0, 10),
    // Site-local: deprecated, still routed as private in older networks.
    v6(0xfec0, 0, 0, 0, 0, 0, 0, 0, 10),
    v6(0xff00, 0, 0, 0, 0, 0, 0, 0, 8),
];

/// Which addresses http(s) image fetches may connect to.
///
/// Precedence, first match wins: `--fetch-deny`, then `--fetch-allow`, then the cloud metadata
/// endpoints (denied), then `--fetch-allow-private`, then the default deny list; anything else
/// (public unicast) is allowed. An IPv4-mapped or NAT64 address must pass both as itself and as
/// the IPv4 address it carries, so no IPv6 spelling reaches an IPv4 destination the policy
/// refuses.
#[derive(Debug, Clone)]
pub struct EgressPolicy {
    /// `None`: every address is allowed.
    rules: Option<Arc<Rules>>,
}

/// The defaults alone: what a server without `--fetch-*` flags enforces.
impl Default for EgressPolicy {
    fn default() -> Self {
        Self::new(Vec::new(), Vec::new(), false)
    }
}

#[derive(Debug)]
struct Rules {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
    allow_private: bool,
}

impl EgressPolicy {
    /// The server's policy: the defaults, with the operator's additions.
    pub fn new(allow: Vec<IpNet>, deny: Vec<IpNet>, allow_private: bool) -> Self {
        Self { rules: Some(Arc::new(Rules { allow, deny, allow_private })) }
    }

    /// No checks at all: for a process acting with its own user's rights (the in-process CLI),
    /// which could reach any of these addresses itself.
    pub fn unrestricted() -> Self {
        Self { rules: None }
    }

    pub fn is_unrestricted(&self) -> bool {
        self.rules.is_none()
    }

    pub fn allows(&self, ip: IpAddr) -> bool {
        let Some(rules) = &self.rules else { return true };
        match ip {
            IpAddr::V4(_) => rules.allows(ip),
            IpAddr::V6(v6) => rules.allows(ip) && embedded_v4(v6).is_none_or(|v4| rules.allows(IpAddr::V4(v4))),
        }
    }

    /// Checks a URL whose host is an IP literal. reqwest connects to those without asking a
    /// resolver, so this is the only check they get; names are checked by [`PolicyResolver`].
    pub fn check_url_host(&self, url: &Url) -> Result<(), Denied> {
        let ip = match url.host() {
            Some(Host::Ipv4(ip)) => IpAddr::V4(ip),
            Some(Host::Ipv6(ip)) => IpAddr::V6(ip),
            // The url crate turns every IPv4 spelling into Host::Ipv4 for http(s); a name that
            // still parses as an address would be connected to as one, so it is checked as one.
            Some(Host::Domain(name)) => match name.parse::<IpAddr>() {
                Ok(ip) => ip,
                Err(_) => return Ok(()),
            },
            None => return Ok(()),
        };
        if self.allows(ip) {
            Ok(())
        } else {
            tracing::debug!(%ip, "egress policy refused an address");
            Err(Denied)
        }
    }
}

impl Rules {
    fn allows(&self, ip: IpAddr) -> bool {
        let hit = |nets: &[IpNet]| nets.iter().any(|n| n.contains(&ip));
        if hit(&self.deny) {
            return false;
        }
        if hit(&self.allow) {
            return true;
        }
        if hit(METADATA) {
            return false;
        }
        if self.allow_private && hit(PRIVATE) {
            return true;
        }
        !hit(DEFAULT_DENY)
    }
}

/// The IPv4 destination an IPv6 address reaches by translation: IPv4-mapped addresses on this
/// host's own dual-stack sockets, NAT64 ones through the network's translator.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = ip.segments();
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let [.., a, b, c, d] = ip.octets();
        return Some(Ipv4Addr::new(a, b, c, d));
    }
    None
}

/// The policy refused the destination. Travels inside reqwest's error chain, where the fetcher
/// finds it by type; its text is all a caller ever learns.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("destination not allowed")]
pub struct Denied;

/// A host name had no addresses at all (as opposed to none allowed).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("could not resolve the host name")]
pub struct Unresolved;

/// Why a redirect was not followed.
#[derive(Debug, Clone, Copy, thiserror::Error)]
pub enum RedirectRefused {
    #[error("too many redirects (at most {MAX_REDIRECTS} are followed)")]
    TooMany,
    #[error("redirected to a URL with credentials")]
    Credentials,
    #[error("redirected to a scheme other than http or https")]
    Scheme,
}

/// Resolves names for reqwest and hands out only the addresses the policy allows, so the
/// address checked is the address connected to: no second lookup a rebinding DNS server could
/// answer differently.
#[derive(Debug)]
pub struct PolicyResolver {
    policy: EgressPolicy,
}

impl PolicyResolver {
    pub fn new(policy: EgressPolicy) -> Self {
        Self { policy }
    }
}

impl Resolve for PolicyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            // The system resolver (getaddrinfo) on a blocking thread, as reqwest's own does;
            // port 0 is replaced by the URL's port.
            let found: Vec<SocketAddr> = match tokio::net::lookup_host((host.as_str(), 0)).await {
                Ok(addrs) => addrs.collect(),
                Err(_) => Vec::new(),
            };
            if found.is_empty() {
                return Err(Box::new(Unresolved) as Box<dyn StdError + Send + Sync>);
            }
            let allowed: Vec<SocketAddr> = found.iter().copied().filter(|a| policy.allows(a.ip())).collect();
            if allowed.is_empty() {
                tracing::debug!(%host, addrs = ?found, "egress policy refused every address of a host");
                return Err(Box::new(Denied) as Box<dyn StdError + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// Follows at most [`MAX_REDIRECTS`] redirects, each to http(s) without credentials. An
/// IP-literal target is checked here, since no resolver will see it; a name goes through the
/// [`PolicyResolver`] again when reqwest connects to it.
pub fn redirect_policy(policy: EgressPolicy) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        // `previous` holds the original URL and every hop followed so far.
        if attempt.previous().len() > MAX_REDIRECTS {
            return attempt.error(RedirectRefused::TooMany);
        }
        let next = attempt.url();
        if !matches!(next.scheme(), "http" | "https") {
            return attempt.error(RedirectRefused::Scheme);
        }
        if !next.username().is_empty() || next.password().is_some() {
            return attempt.error(RedirectRefused::Credentials);
        }
        match policy.check_url_host(next) {
            Ok(()) => attempt.follow(),
            Err(denied) => attempt.error(denied),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], deny: &[&str], allow_private: bool) -> EgressPolicy {
        let nets = |s: &[&str]| s.iter().map(|n| n.parse().unwrap()).collect();
        EgressPolicy::new(nets(allow), nets(deny), allow_private)
    }

    /// The policy's answer for the host of `url`, parsed as the fetcher parses it.
    fn allows_url(p: &EgressPolicy, url: &str) -> bool {
        let url = Url::parse(url).unwrap();
        p.check_url_host(&url).is_ok()
    }

    fn allows(p: &EgressPolicy, ip: &str) -> bool {
        p.allows(ip.parse().unwrap())
    }

    #[test]
    fn every_spelling_of_loopback_is_an_address_and_denied() {
        let p = EgressPolicy::default();
        for url in [
            "http://127.0.0.1/a.png",
            "http://127.1/a.png",
            "http://2130706433/a.png",
            "http://0x7f000001/a.png",
            "http://0177.0.0.1/a.png",
            "http://0x7f.0.0.1/a.png",
            "http://127.0.0.1./a.png",
            "http://[::1]/a.png",
            "http://[::ffff:127.0.0.1]/a.png",
            "http://[::ffff:7f00:1]/a.png",
            "http://[::127.0.0.1]/a.png",
            "http://[64:ff9b::127.0.0.1]/a.png",
            "https://[0:0:0:0:0:0:0:1]:8443/a.png",
            "http://0.0.0.0/a.png",
            "http://0/a.png",
            "http://[::]/a.png",
        ] {
            let host = Url::parse(url).unwrap().host().map(|h| h.to_owned());
            assert!(!matches!(host, Some(Host::Domain(_))), "{url} is an address, not a name: {host:?}");
            assert!(!allows_url(&p, url), "{url} must be denied");
        }
    }

    #[test]
    fn metadata_private_link_local_and_special_ranges_are_denied_by_default() {
        let p = EgressPolicy::default();
        for url in [
            "http://169.254.169.254/latest/meta-data/",
            "http://10.1.2.3/a.png",
            "http://172.16.0.1/a.png",
            "http://172.31.255.255/a.png",
            "http://192.168.1.1/a.png",
            "http://100.64.0.1/a.png",
            "http://100.100.100.200/a.png",
            "http://168.63.129.16/a.png",
            "http://192.0.0.192/a.png",
            "http://192.0.2.1/a.png",
            "http://198.18.0.1/a.png",
            "http://198.51.100.7/a.png",
            "http://203.0.113.9/a.png",
            "http://224.0.0.1/a.png",
            "http://240.0.0.1/a.png",
            "http://255.255.255.255/a.png",
            "http://[fe80::1]/a.png",
            "http://[fc00::1]/a.png",
            "http://[fd00:ec2::254]/a.png",
            "http://[fec0::1]/a.png",
            "http://[ff02::1]/a.png",
            "http://[::ffff:169.254.169.254]/a.png",
            "http://[::ffff:8.8.8.8]/a.png",
            "http://[64:ff9b::a9fe:a9fe]/a.png",
            "http://[2002:7f00:1::]/a.png",
            "http://[2001::1]/a.png",
            "http://[2001:db8::1]/a.png",
            "http://[3fff::1]/a.png",
            "http://[100::1]/a.png",
        ] {
            assert!(!allows_url(&p, url), "{url} must be denied");
        }
    }

    #[test]
    fn public_addresses_and_names_are_allowed() {
        let p = EgressPolicy::default();
        for url in [
            "http://93.184.215.14/a.png",
            "https://8.8.8.8/a.png",
            "http://172.32.0.1/a.png",
            "http://100.128.0.1/a.png",
            "http://[2606:4700::1]/a.png",
            "http://[2a00:1450:4001::1]/a.png",
        ] {
            assert!(allows_url(&p, url), "{url} must be allowed");
        }
        // Names are the resolver's to check, against the addresses they resolve to.
        assert!(allows_url(&p, "http://example.com/a.png"));
        assert!(allows_url(&p, "http://localhost/a.png"));
    }

    #[test]
    fn deny_beats_allow_beats_allow_private_beats_the_defaults() {
        let sidecar = policy(&["127.0.0.1/32"], &[], false);
        assert!(allows(&sidecar, "127.0.0.1"));
        assert!(!allows(&sidecar, "127.0.0.2"), "only what was allowed");
        assert!(!allows(&sidecar, "::1"));
        assert!(!allows(&sidecar, "::ffff:127.0.0.1"), "the mapped form is allowed only if allowed itself");
        assert!(!allows(&sidecar, "10.0.0.1"));

        let both = policy(&["127.0.0.0/8", "::ffff:0:0/96"], &["127.0.0.2/32", "203.0.113.0/24"], false);
        assert!(allows(&both, "127.0.0.1"));
        assert!(!allows(&both, "127.0.0.2"), "deny beats allow");
        assert!(allows(&both, "::ffff:127.0.0.1"));
        assert!(!allows(&both, "::ffff:127.0.0.2"), "a deny of the IPv4 address covers its mapped form");
        assert!(!allows(&both, "::ffff:169.254.169.254"), "an allowed mapped range still checks what it carries");
        assert!(allows(&both, "93.184.215.14"), "public space stays allowed");
        assert!(!allows(&both, "203.0.113.5"));

        let denied_public = policy(&[], &["93.184.215.0/24"], false);
        assert!(!allows(&denied_public, "93.184.215.14"), "extra denies apply to public space");
        assert!(allows(&denied_public, "93.184.216.1"));

        let private = policy(&[], &[], true);
        for ip in ["10.1.2.3", "172.16.5.4", "192.168.1.1", "fd12:3456::1"] {
            assert!(allows(&private, ip), "{ip} under --fetch-allow-private");
        }
        for ip in ["127.0.0.1", "::1", "169.254.169.254", "100.64.0.1", "fe80::1", "fd00:ec2::254", "fd20:ce::254"] {
            assert!(!allows(&private, ip), "{ip} stays denied under --fetch-allow-private");
        }
        let private_but = policy(&[], &["10.9.0.0/16"], true);
        assert!(!allows(&private_but, "10.9.1.1"), "deny beats allow-private");
        assert!(allows(&private_but, "10.8.1.1"));

        let metadata = policy(&["169.254.169.254/32"], &[], false);
        assert!(allows(&metadata, "169.254.169.254"), "an explicit allow opens even a metadata address");
        assert!(!allows(&metadata, "169.254.169.253"));
    }

    #[test]
    fn unrestricted_allows_everything() {
        let p = EgressPolicy::unrestricted();
        assert!(p.is_unrestricted());
        for ip in ["127.0.0.1", "::1", "169.254.169.254", "10.0.0.1", "::ffff:127.0.0.1"] {
            assert!(allows(&p, ip), "{ip}");
        }
        assert!(!EgressPolicy::default().is_unrestricted(), "the default is the server's policy");
    }

    #[tokio::test]
    async fn the_resolver_drops_denied_addresses_and_fails_when_none_is_left() {
        // Only `localhost`: /etc/hosts answers it, so no query leaves the machine.
        let denied = PolicyResolver::new(EgressPolicy::default());
        let r = denied.resolve("localhost".parse().unwrap()).await;
        let err = r.err().expect("localhost is loopback");
        assert!(err.downcast_ref::<Denied>().is_some(), "{err}");

        let sidecar = PolicyResolver::new(policy(&["127.0.0.1/32"], &[], false));
        let addrs: Vec<SocketAddr> = sidecar.resolve("localhost".parse().unwrap()).await.unwrap().collect();
        assert!(!addrs.is_empty());
        assert!(addrs.iter().all(|a| a.ip() == IpAddr::V4(Ipv4Addr::LOCALHOST)), "{addrs:?}");
    }
}
