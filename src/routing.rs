//! The route table: picks the first route whose host, path prefix and method match a request.
//! Routes are tried in configuration order; a request no route matches gets a 404 from the proxy.
//! Paths are matched in their resolved form (`path::routing_path`), as NGINX matches locations.

use http::Method;

use crate::config::{HostPattern, MatchConfig};

/// What a route requires of a request. Every part is optional; an empty matcher matches all.
#[derive(Debug, Clone, Default)]
pub struct RouteMatch {
    host: Option<HostPattern>,
    /// In resolved form, like the paths it is matched against.
    path_prefix: Option<Vec<u8>>,
    methods: Option<Vec<Method>>,
}

impl RouteMatch {
    pub fn from_config(config: &MatchConfig) -> Self {
        RouteMatch {
            host: config.host.clone(),
            path_prefix: config.path_prefix.as_ref().map(|p| p.resolved().to_vec()),
            methods: config
                .methods
                .as_ref()
                .map(|ms| ms.iter().map(|m| m.0.clone()).collect()),
        }
    }

    /// `host` is the request's host name, lower case, without a port; `path` is resolved
    /// (`path::routing_path`).
    pub fn matches(&self, host: &str, path: &[u8], method: &Method) -> bool {
        let host_ok = match &self.host {
            None => true,
            Some(HostPattern::Exact(name)) => host == name,
            // `*.example.com` matches sub.example.com but not example.com itself.
            Some(HostPattern::Suffix(suffix)) => {
                host.len() > suffix.len() && host.ends_with(suffix.as_str())
            }
        };
        host_ok
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|prefix| path.starts_with(prefix))
            && self.methods.as_ref().is_none_or(|ms| ms.contains(method))
    }
}

/// An ordered list of matchers, each with a payload (the route it stands for).
#[derive(Debug)]
pub struct Router<T> {
    routes: Vec<(RouteMatch, T)>,
}

impl<T> Router<T> {
    pub fn new(routes: Vec<(RouteMatch, T)>) -> Self {
        Router { routes }
    }

    /// The first route that matches, in configuration order.
    pub fn find(&self, host: &str, path: &[u8], method: &Method) -> Option<&T> {
        self.routes
            .iter()
            .find(|(m, _)| m.matches(host, path, method))
            .map(|(_, route)| route)
    }
}

/// The host a request is for: the Host header (or HTTP/2 authority), lower case, port removed.
/// Borrowed when it is already lower case, as it nearly always is: no allocation per request.
pub fn request_host(header: &pingora_http::RequestHeader) -> std::borrow::Cow<'_, str> {
    let raw = header
        .headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| header.uri.authority().map(|a| a.as_str()))
        .unwrap_or("");
    let host = bare_host_name(raw);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(host.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(host)
    }
}

/// The host name without its port, and without the trailing dot of a fully
/// qualified name (`example.com.` is `example.com`, as NGINX matches server names).
fn bare_host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // IPv6 literal: [::1]:8080
        return rest.split(']').next().unwrap_or(rest);
    }
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    name.strip_suffix('.').unwrap_or(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::routing_path;

    fn matcher(yaml: &str) -> RouteMatch {
        RouteMatch::from_config(&serde_yaml::from_str(yaml).expect("valid match"))
    }

    #[test]
    fn empty_match_matches_everything() {
        assert!(matcher("{}").matches("any", b"/x", &Method::DELETE));
    }

    #[test]
    fn wildcard_host_matches_subdomains_only() {
        let m = matcher("{ host: \"*.example.com\" }");
        assert!(m.matches("api.example.com", b"/", &Method::GET));
        assert!(m.matches("a.b.example.com", b"/", &Method::GET));
        assert!(!m.matches("example.com", b"/", &Method::GET));
        assert!(!m.matches("badexample.com", b"/", &Method::GET));
    }

    #[test]
    fn prefix_and_methods_both_apply() {
        let m = matcher("{ path_prefix: /api, methods: [GET, POST] }");
        assert!(m.matches("h", b"/api/users", &Method::POST));
        assert!(!m.matches("h", b"/web", &Method::GET));
        assert!(!m.matches("h", b"/api", &Method::DELETE));
    }

    #[test]
    fn first_match_wins() {
        let router = Router::new(vec![
            (matcher("{ path_prefix: /api }"), "api"),
            (matcher("{}"), "default"),
        ]);
        assert_eq!(router.find("h", b"/api/x", &Method::GET), Some(&"api"));
        assert_eq!(router.find("h", b"/other", &Method::GET), Some(&"default"));
    }

    #[test]
    fn prefixes_match_resolved_paths() {
        let api = matcher("{ path_prefix: /api }");
        let matches = |path| api.matches("h", &routing_path(path).unwrap(), &Method::GET);
        assert!(matches("/api/x"));
        assert!(matches("/%61pi/x"));
        assert!(!matches("/api/../admin"));
        assert!(matches("//admin/../api/x"));
    }

    #[test]
    fn request_host_is_lower_case_without_port() {
        let mut req = pingora_http::RequestHeader::build("GET", b"/", None).unwrap();
        req.insert_header("host", "API.Example.com:8080").unwrap();
        assert_eq!(request_host(&req), "api.example.com");
        req.insert_header("host", "api.example.com").unwrap();
        assert!(matches!(
            request_host(&req),
            std::borrow::Cow::Borrowed("api.example.com")
        ));
    }

    #[test]
    fn host_port_and_trailing_dot_are_stripped() {
        assert_eq!(bare_host_name("Example.com:8080"), "Example.com");
        assert_eq!(bare_host_name("[::1]:8080"), "::1");
        assert_eq!(bare_host_name("example.com"), "example.com");
        assert_eq!(bare_host_name("Example.com.:8080"), "Example.com");
        assert_eq!(bare_host_name("example.com."), "example.com");
    }
}
