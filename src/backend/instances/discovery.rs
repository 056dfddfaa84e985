//! Where a pool's instances are. Each configured target is a base URL: an
//! address literal is one instance; a host name is one instance per
//! address it resolves to (a Kubernetes headless Service, DNS round-robin),
//! resolved again at every discovery. HTTPS targets stay one instance by
//! name, since their certificates name the host, not its addresses.

use async_trait::async_trait;
use reqwest::Url;

/// Finds the instances' endpoints.
#[async_trait]
pub trait Discover: Send + Sync + 'static {
    /// Every instance's endpoint now. An error keeps the instances found
    /// last time: a resolver's hiccup is no reason to drain a pool.
    async fn endpoints(&self) -> Result<Vec<String>, String>;
}

/// Targets found by DNS.
pub struct Dns {
    targets: Vec<Url>,
}

impl Dns {
    /// Targets from base URLs; an unparsable one is an error naming it.
    pub fn new(urls: &[String]) -> Result<Self, String> {
        let targets = urls
            .iter()
            .map(|url| Url::parse(url).map_err(|error| format!("{url:?}: {error}")))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(hostless) = targets.iter().find(|url| url.host().is_none()) {
            return Err(format!("{hostless} names no host"));
        }
        Ok(Self { targets })
    }

    async fn resolve(target: &Url) -> Result<Vec<String>, String> {
        let name = target.host_str().unwrap_or_default();
        let literal = name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok();
        if literal || target.scheme() == "https" {
            return Ok(vec![endpoint(target)]);
        }
        let port = target.port_or_known_default().unwrap_or(80);
        let addresses = tokio::net::lookup_host((name, port))
            .await
            .map_err(|error| format!("resolving {name}: {error}"))?;
        let mut endpoints = Vec::new();
        for address in addresses {
            let mut instance = target.clone();
            // Cannot fail: the URL already has a host.
            let _ = instance.set_ip_host(address.ip());
            let instance = endpoint(&instance);
            if !endpoints.contains(&instance) {
                endpoints.push(instance);
            }
        }
        Ok(endpoints)
    }
}

/// A URL as an endpoint: without the trailing slash `Url` adds to a bare
/// host, as the backends take base URLs.
fn endpoint(url: &Url) -> String {
    url.as_str().trim_end_matches('/').to_owned()
}

#[async_trait]
impl Discover for Dns {
    async fn endpoints(&self) -> Result<Vec<String>, String> {
        let mut endpoints = Vec::new();
        for target in &self.targets {
            for instance in Self::resolve(target).await? {
                if !endpoints.contains(&instance) {
                    endpoints.push(instance);
                }
            }
        }
        Ok(endpoints)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn literals_are_one_instance_and_names_one_per_address() {
        let dns = Dns::new(&[
            "http://127.0.0.1:11434".to_owned(),
            "http://[::1]:8080/v1".to_owned(),
            "http://127.0.0.1:11434/".to_owned(),
            "https://localhost:8443/v1".to_owned(),
        ])
        .unwrap();
        assert_eq!(
            dns.endpoints().await.unwrap(),
            [
                "http://127.0.0.1:11434",
                "http://[::1]:8080/v1",
                "https://localhost:8443/v1"
            ]
        );
        let named = Dns::new(&["http://localhost:9000/v1".to_owned()]).unwrap();
        let found = named.endpoints().await.unwrap();
        let resolved: Vec<String> = tokio::net::lookup_host(("localhost", 9000))
            .await
            .unwrap()
            .map(|address| match address {
                std::net::SocketAddr::V4(v4) => format!("http://{}:9000/v1", v4.ip()),
                std::net::SocketAddr::V6(v6) => format!("http://[{}]:9000/v1", v6.ip()),
            })
            .collect();
        assert!(!found.is_empty());
        for instance in &found {
            assert!(
                resolved.contains(instance),
                "{instance} not in {resolved:?}"
            );
        }
        assert!(Dns::new(&["not a url".to_owned()]).is_err());
    }
}
