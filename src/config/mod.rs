//! The configuration file: one YAML file holds Pingora's server keys and shadowgate's sections.
//! `load` parses every value into its runtime type (`values`) inside the section structs
//! (`schema`), then checks rules across fields (`validate`): what `-t` accepts, the server can build.

mod error;
mod runtime_dir;
mod schema;
mod validate;
mod values;

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;

use pingora_core::server::configuration::ServerConf;

use error::from_yaml_text;
use runtime_dir::{apply_private_runtime_dir, apply_runtime_defaults};
use schema::{SHADOWGATE_KEYS, Sections};

pub use crate::access_log::AccessLogConfig;
pub use crate::tls::TlsConfig;
pub use error::ConfigError;
pub use runtime_dir::{current_uid, default_runtime_dir, prepare_runtime_dirs};
pub use schema::*;
pub use values::*;

/// The whole, validated configuration.
#[derive(Debug)]
pub struct Config {
    /// Pingora's own server settings (threads, pid_file, upgrade_sock, grace periods, ...).
    pub server: ServerConf,
    pub listeners: Vec<ListenerConfig>,
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    pub routes: Vec<RouteConfig>,
    pub metrics: Option<MetricsConfig>,
    /// Ceiling on the shadow bytes queued in the whole process at once.
    pub mirror_budget_bytes: u64,
    /// Worker threads for shadow sessions; 0 runs them on the proxy's threads.
    pub mirror_threads: u32,
    /// One JSON line per request; off when absent.
    pub access_log: Option<AccessLogConfig>,
}

impl FromStr for Config {
    type Err = ConfigError;

    /// Parse and validate the text of a configuration file.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let document: serde_yaml::Value = from_yaml_text(text)?;
        let mapping = match &document {
            serde_yaml::Value::Mapping(m) => m.clone(),
            serde_yaml::Value::Null => serde_yaml::Mapping::new(),
            _ => {
                return Err(ConfigError::new(
                    "",
                    "the file must be a YAML mapping of keys such as listeners, upstreams and routes",
                ));
            }
        };
        check_top_level_keys(&mapping)?;
        // Parse from the text, not the Value, so errors keep their line and column.
        let server: ServerConf = if mapping.is_empty() {
            ServerConf::default()
        } else {
            from_yaml_text(text)?
        };
        // Pingora's own checks of its keys.
        let server = server
            .validate()
            .map_err(|e| ConfigError::new("", e.to_string()))?;
        let sections: Sections = if mapping.is_empty() {
            from_yaml_text("{}")?
        } else {
            from_yaml_text(text)?
        };
        let mut config = Config {
            server,
            listeners: sections.listeners,
            upstreams: sections.upstreams,
            routes: sections.routes,
            metrics: sections.metrics,
            mirror_budget_bytes: sections.mirror_budget_bytes,
            mirror_threads: sections.mirror_threads,
            access_log: sections.access_log,
        };
        apply_private_runtime_dir(&mut config.server, &mapping);
        apply_runtime_defaults(&mut config.server, &mapping);
        config.validate()?;
        Ok(config)
    }
}

impl Config {
    /// Read, parse and validate a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(
                "",
                format!("cannot read configuration file {}: {e}", path.display()),
            )
        })?;
        text.parse()
    }
}

/// Top-level keys must be shadowgate's sections or Pingora's server keys, so a typo is caught.
fn check_top_level_keys(mapping: &serde_yaml::Mapping) -> Result<(), ConfigError> {
    let pingora_keys = match serde_yaml::to_value(ServerConf::default()) {
        Ok(serde_yaml::Value::Mapping(m)) => m,
        _ => serde_yaml::Mapping::new(),
    };
    for key in mapping.keys() {
        let Some(name) = key.as_str() else {
            return Err(ConfigError::new(
                "",
                format!("top-level key {key:?} is not a string"),
            ));
        };
        if !SHADOWGATE_KEYS.contains(&name) && !pingora_keys.contains_key(name) {
            let known = SHADOWGATE_KEYS
                .iter()
                .copied()
                .chain(pingora_keys.keys().filter_map(|k| k.as_str()));
            let hint = closest(name, known)
                .map(|k| format!("did you mean {k:?}? "))
                .unwrap_or_default();
            return Err(ConfigError::new(
                name,
                format!(
                    "unknown key; {hint}shadowgate's sections are {} and Pingora's server keys include threads, pid_file, upgrade_sock, grace_period_seconds",
                    SHADOWGATE_KEYS.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// The known key nearest to a misspelt one, if it is close (edit distance ≤ 2).
fn closest<'a>(key: &str, known: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    known
        .map(|k| (edit_distance(key, k), k))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(above + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) const MINIMAL: &str = r#"
listeners: [{ address: "127.0.0.1:8080" }]
upstreams:
  app: { servers: [{ address: "127.0.0.1:9000" }] }
routes:
  - { name: all, upstream: app }
"#;

    pub(super) fn parse(text: &str) -> Result<Config, ConfigError> {
        text.parse()
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let config = parse(MINIMAL).expect("minimal config parses");
        let app = &config.upstreams["app"];
        assert_eq!(app.selection, Selection::RoundRobin);
        assert_eq!(app.servers[0].weight, 1);
        assert_eq!(config.mirror_budget_bytes, DEFAULT_MIRROR_BUDGET_BYTES);
        assert!(config.metrics.is_none());
        assert!(!config.server.upgrade_sock.starts_with("/tmp/pingora"));
    }

    #[test]
    fn one_thread_runs_without_work_stealing_unless_asked() {
        let one = parse(&format!("threads: 1\n{MINIMAL}")).unwrap();
        assert!(!one.server.work_stealing);
        let asked = parse(&format!("threads: 1\nwork_stealing: true\n{MINIMAL}")).unwrap();
        assert!(asked.server.work_stealing);
        let two = parse(&format!("threads: 2\n{MINIMAL}")).unwrap();
        assert!(
            two.server.work_stealing,
            "Pingora's default stays with more threads"
        );
    }

    #[test]
    fn unknown_top_level_key_is_an_error() {
        let err = parse(&format!("{MINIMAL}\nlistener: []\n")).unwrap_err();
        assert!(
            err.to_string().starts_with("listener: unknown key"),
            "{err}"
        );
    }

    #[test]
    fn pingora_keys_are_accepted_at_top_level() {
        let config = parse(&format!("{MINIMAL}\nthreads: 3\ngrace_period_seconds: 2\n")).unwrap();
        assert_eq!(config.server.threads, 3);
        assert_eq!(config.server.grace_period_seconds, Some(2));
    }

    #[test]
    fn wrong_type_carries_path_and_line() {
        let text = MINIMAL.replace(
            "{ address: \"127.0.0.1:9000\" }",
            "{ address: \"127.0.0.1:9000\", weight: heavy }",
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("upstreams.app.servers[0].weight"), "{err}");
        assert!(err.contains("line 4"), "{err}");
    }

    #[test]
    fn misspelt_top_level_keys_get_a_suggestion() {
        let err = parse(&format!("{MINIMAL}\nlistener: []\n")).unwrap_err();
        assert!(err.message.contains("did you mean \"listeners\"?"), "{err}");
        assert_eq!(edit_distance("routs", "routes"), 1);
        assert_eq!(closest("zzzzzz", ["routes"].into_iter()), None);
    }

    #[test]
    fn custom_value_errors_name_the_field() {
        let text = MINIMAL.replace("127.0.0.1:8080", "localhost:8080");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.path, "listeners[0].address");
        assert!(err.message.starts_with("cannot parse"), "{err}");
    }

    #[test]
    fn errors_stay_on_one_line() {
        let err = parse(&format!("{MINIMAL}\n\"list\\ners\": []\n")).unwrap_err();
        assert!(!err.to_string().contains('\n'), "{err}");
    }
}
