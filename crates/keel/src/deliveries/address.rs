//! Where keel may send a webhook: the address a URL resolves to is checked before keel
//! connects. Loopback, private, shared (CGNAT), link-local (the cloud metadata address
//! 169.254.169.254 included), unspecified, broadcast, multicast and documentation addresses
//! are refused unless `notifications.allowed_networks` lists a network that holds them.
//!
//! The check sits in the HTTP client's resolver ([`CheckedResolver`]), so the address checked
//! is the address connected to (a name that resolves to a public address when checked and to a
//! private one when connecting cannot slip through); a URL whose host is an address literal is
//! checked by [`AddressPolicy::check_url`], since the client does not resolve those.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Which addresses webhooks may reach.
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    allowed: Vec<IpNet>,
}

/// Why a destination is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The address is not public and no allowed network holds it.
    #[error("{0} is not a public address (allow it with notifications.allowed_networks)")]
    NotPublic(IpAddr),
    /// The URL is not http(s) with a host.
    #[error("only http and https URLs with a host are delivered to")]
    Scheme,
}

impl AddressPolicy {
    /// A policy allowing, besides public addresses, the `allowed` networks (`127.0.0.1`,
    /// `10.0.0.0/8`, `::1`); `Err` names the first that does not parse.
    pub fn new(allowed: &[String]) -> Result<Self, String> {
        let allowed = allowed
            .iter()
            .map(|text| {
                IpNet::from_str(text)
                    .or_else(|_| IpAddr::from_str(text).map(IpNet::from))
                    .map_err(|_| text.clone())
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { allowed })
    }

    /// Whether keel may connect to `ip`.
    pub fn permits(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            // An IPv4 address written as IPv6 is judged as the IPv4 address.
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        is_public(ip) || self.allowed.iter().any(|net| net.contains(&ip))
    }

    /// Checks a URL before a send: http(s) with a host, and a literal address host permitted.
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), Refused> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Refused::Scheme);
        }
        match url.host() {
            Some(url::Host::Ipv4(v4)) => self.check(IpAddr::V4(v4)),
            Some(url::Host::Ipv6(v6)) => self.check(IpAddr::V6(v6)),
            Some(url::Host::Domain(_)) => Ok(()),
            None => Err(Refused::Scheme),
        }
    }

    fn check(&self, ip: IpAddr) -> Result<(), Refused> {
        if self.permits(ip) {
            Ok(())
        } else {
            Err(Refused::NotPublic(ip))
        }
    }
}

fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                // 100.64.0.0/10, shared address space (carrier-grade NAT).
                || (a == 100 && (64..128).contains(&b))
                // 0.0.0.0/8, "this network".
                || a == 0
                // 192.0.0.0/24, protocol assignments.
                || (a == 192 && b == 0 && c == 0)
                // 198.18.0.0/15, benchmarking.
                || (a == 198 && (b == 18 || b == 19))
                // 240.0.0.0/4, reserved.
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            let segments = v6.segments();
            let [first, second, third, fourth, fifth, sixth, seventh, eighth] = segments;
            // An IPv4 address carried inside an IPv6 one is judged as that IPv4 address:
            // NAT64 (64:ff9b::/96) and 6to4 (2002::/16) reach it through a gateway.
            let embedded = |high: u16, low: u16| {
                let [h1, h2] = high.to_be_bytes();
                let [l1, l2] = low.to_be_bytes();
                IpAddr::V4(std::net::Ipv4Addr::new(h1, h2, l1, l2))
            };
            if first == 0x64 && second == 0xff9b && [third, fourth, fifth, sixth] == [0; 4] {
                return is_public(embedded(seventh, eighth));
            }
            if first == 0x2002 {
                return is_public(embedded(second, third));
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                // 64:ff9b:1::/48, local-use NAT64.
                || (first == 0x64 && second == 0xff9b && third == 1)
                // fc00::/7, unique local.
                || (first & 0xfe00) == 0xfc00
                // fe80::/10, link-local; fec0::/10, the former site-local.
                || (first & 0xffc0) == 0xfe80
                || (first & 0xffc0) == 0xfec0
                // 2001:db8::/32, documentation.
                || (first == 0x2001 && second == 0x0db8))
        }
    }
}

/// The webhook client's resolver: the system's resolution, keeping only permitted addresses.
#[derive(Debug, Clone)]
pub struct CheckedResolver {
    policy: Arc<AddressPolicy>,
}

impl CheckedResolver {
    /// A resolver that applies `policy`.
    pub fn new(policy: Arc<AddressPolicy>) -> Self {
        Self { policy }
    }
}

impl Resolve for CheckedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let permitted = policy.resolve(&host, 0).await?;
            Ok(Box::new(permitted.into_iter()) as Addrs)
        })
    }
}

impl AddressPolicy {
    /// Resolves `host` (a name or a literal address) with the system's resolver, keeping only
    /// the permitted addresses; an error when none is left. A connection then goes to one of
    /// these addresses, never to a second resolution of the name.
    pub async fn resolve(
        &self,
        host: &str,
        port: u16,
    ) -> Result<Vec<SocketAddr>, Box<dyn std::error::Error + Send + Sync>> {
        let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
        let permitted: Vec<SocketAddr> = resolved
            .iter()
            .copied()
            .filter(|addr| self.permits(addr.ip()))
            .collect();
        match (permitted.is_empty(), resolved.first()) {
            (false, _) => Ok(permitted),
            (true, Some(refused)) => Err(Box::new(Refused::NotPublic(refused.ip()))),
            (true, None) => Err(format!("{host} resolves to no address").into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_unless_allowed() {
        let strict = AddressPolicy::default();
        for refused in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "255.255.255.255",
            "198.18.0.1",
            "240.0.0.1",
            "192.0.0.8",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::1",
            "2002:a9fe:a9fe::1",
            "2002:7f00:1::1",
            "fec0::1",
            "2001:db8::1",
        ] {
            assert!(!strict.permits(refused.parse().unwrap()), "{refused}");
        }
        for public in [
            "93.184.216.34",
            "1.1.1.1",
            "2606:4700::1111",
            "64:ff9b::101:101",
            "2002:101:101::1",
        ] {
            assert!(strict.permits(public.parse().unwrap()), "{public}");
        }
        let allowing =
            AddressPolicy::new(&["127.0.0.1".to_owned(), "10.0.0.0/8".to_owned()]).unwrap();
        assert!(allowing.permits("127.0.0.1".parse().unwrap()));
        assert!(allowing.permits("10.9.9.9".parse().unwrap()));
        assert!(!allowing.permits("127.0.0.2".parse().unwrap()));
        assert!(!allowing.permits("169.254.169.254".parse().unwrap()));
        assert_eq!(
            AddressPolicy::new(&["nope".to_owned()]).unwrap_err(),
            "nope"
        );
    }

    #[test]
    fn urls_are_checked() {
        let strict = AddressPolicy::default();
        let url = |s: &str| reqwest::Url::parse(s).unwrap();
        assert!(strict.check_url(&url("http://127.0.0.1:8080/x")).is_err());
        assert!(strict.check_url(&url("http://[::1]/x")).is_err());
        assert!(strict.check_url(&url("https://example.com/x")).is_ok());
        assert_eq!(
            strict.check_url(&url("ftp://example.com/x")),
            Err(Refused::Scheme)
        );
    }

    #[tokio::test]
    async fn the_resolver_drops_refused_addresses() {
        let strict = CheckedResolver::new(Arc::new(AddressPolicy::default()));
        let refused = strict.resolve("localhost".parse().unwrap()).await;
        assert!(refused.is_err());
        let allowing = CheckedResolver::new(Arc::new(
            AddressPolicy::new(&["127.0.0.0/8".to_owned(), "::1".to_owned()]).unwrap(),
        ));
        let addrs: Vec<_> = allowing
            .resolve("localhost".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert!(!addrs.is_empty());
    }
}
