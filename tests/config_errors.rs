//! `shadowgate -t` on broken configurations: each class of mistake exits non-zero with
//! one line on stderr that names the offending field, so an operator can fix it at once.

// Not every helper in tests/common is used here.
#[allow(unused_imports)]
mod common;

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::proxy::{binary, finish, free_port, private_dir};

/// A valid configuration; every broken variant below changes exactly one thing in it.
/// `RUNTIME` stands for the test's private directory.
const VALID: &str = r#"threads: 2
pid_file: RUNTIME/shadowgate.pid
upgrade_sock: RUNTIME/upgrade.sock
grace_period_seconds: 1
listeners:
  - address: "127.0.0.1:18080"
upstreams:
  app:
    servers:
      - { address: "127.0.0.1:9001", weight: 1 }
      - { address: "127.0.0.1:9002" }
    selection: round_robin
  app-v2:
    servers:
      - { address: "127.0.0.1:9003" }
routes:
  - name: api
    match: { path_prefix: /api }
    upstream: app
    mirrors:
      - { upstream: app-v2, percentage: 25 }
  - name: default
    upstream: app
metrics:
  address: "127.0.0.1:19091"
"#;

/// One broken variant of `VALID`: `from` (which occurs exactly once) becomes `to`.
struct Break {
    name: &'static str,
    from: &'static str,
    to: &'static str,
}

/// Every broken variant the tests use, so one test can check them all for one-line errors.
const BREAKS: &[Break] = &[
    Break {
        name: "unknown upstream",
        from: "  - name: default\n    upstream: app\n",
        to: "  - name: default\n    upstream: ap\n",
    },
    Break {
        name: "empty pool",
        from: "    servers:\n      - { address: \"127.0.0.1:9001\", weight: 1 }\n      - { address: \"127.0.0.1:9002\" }\n",
        to: "    servers: []\n",
    },
    Break {
        name: "server address without port",
        from: "\"127.0.0.1:9002\"",
        to: "\"127.0.0.1\"",
    },
    Break {
        name: "server port out of range",
        from: "\"127.0.0.1:9002\"",
        to: "\"127.0.0.1:99999\"",
    },
    Break {
        name: "listener address not an IP",
        from: "\"127.0.0.1:18080\"",
        to: "\"localhost:18080\"",
    },
    Break {
        name: "duplicate route name",
        from: "name: default",
        to: "name: api",
    },
    Break {
        name: "mirror percentage 101",
        from: "percentage: 25",
        to: "percentage: 101",
    },
    Break {
        name: "weight 0",
        from: "weight: 1",
        to: "weight: 0",
    },
    Break {
        name: "threads 0",
        from: "threads: 2",
        to: "threads: 0",
    },
    Break {
        name: "weight of the wrong type",
        from: "weight: 1",
        to: "weight: heavy",
    },
    Break {
        name: "Pingora key of the wrong type",
        from: "threads: 2",
        to: "threads: two",
    },
    Break {
        name: "unknown key in match",
        from: "match: { path_prefix: /api }",
        to: "match: { hots: x }",
    },
    Break {
        name: "unknown top-level key",
        from: "listeners:\n",
        to: "listener:\n",
    },
    Break {
        name: "YAML indentation",
        from: "  app-v2:\n",
        to: " app-v2:\n",
    },
    Break {
        name: "YAML unclosed flow mapping",
        from: "match: { path_prefix: /api }",
        to: "match: { path_prefix: /api",
    },
    Break {
        name: "consistent_hash without hash_key",
        from: "selection: round_robin",
        to: "selection: consistent_hash",
    },
    Break {
        name: "pid_file in /tmp",
        from: "pid_file: RUNTIME/",
        to: "pid_file: /tmp/",
    },
    Break {
        name: "upgrade_sock in /tmp",
        from: "upgrade_sock: RUNTIME/",
        to: "upgrade_sock: /tmp/",
    },
    Break {
        name: "upgrade_sock in a group-enterable directory",
        from: "upgrade_sock: RUNTIME/",
        to: "upgrade_sock: RUNTIME/shared/",
    },
];

/// The text of a broken variant, with `RUNTIME` still in it.
fn variant(name: &str) -> String {
    let b = BREAKS
        .iter()
        .find(|b| b.name == name)
        .unwrap_or_else(|| panic!("no variant named {name:?}"));
    assert_eq!(
        VALID.matches(b.from).count(),
        1,
        "{name}: {:?} must occur exactly once in the valid config",
        b.from
    );
    VALID.replacen(b.from, b.to, 1)
}

/// What `shadowgate -t -c FILE` did.
struct Checked {
    success: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
    /// The config file as passed on the command line, as it appears in messages.
    file: String,
}

/// Write `config` (with `RUNTIME` filled in) to a private directory and run `shadowgate -t` on it.
///
/// The directory also holds `shared/`, mode 0750, for the group-enterable case. XDG_RUNTIME_DIR
/// points into the directory so the default runtime paths never depend on this machine's state.
fn check(config: &str) -> Checked {
    use std::os::unix::fs::PermissionsExt;
    let dir = private_dir();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).expect("create shared dir");
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o750)).expect("chmod 750");
    let path = dir.path().join("shadowgate.yaml");
    let text = config.replace("RUNTIME", &dir.path().display().to_string());
    std::fs::write(&path, text).expect("write config");
    run_check(&path, dir.path())
}

fn run_check(config: &Path, runtime_dir: &Path) -> Checked {
    run_binary(&["-t"], config, runtime_dir, None)
}

/// Start shadowgate for real on `config`. A start that gets as far as accepting on
/// `listener` is reported as a success (and stopped), so a config that should have
/// been refused fails the test at once instead of running until the deadline.
fn run_start(config: &Path, runtime_dir: &Path, listener: SocketAddr) -> Checked {
    run_binary(&[], config, runtime_dir, Some(listener))
}

fn run_binary(
    args: &[&str],
    config: &Path,
    runtime_dir: &Path,
    listener: Option<SocketAddr>,
) -> Checked {
    let mut command = Command::new(binary());
    command
        .args(args)
        .arg("-c")
        .arg(config)
        .env("XDG_RUNTIME_DIR", runtime_dir);
    // Accepting on the listener means it started: `finish` stops it and returns what it said so far.
    let started = || {
        listener.is_some_and(|addr| {
            TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok()
        })
    };
    let output = finish(command, started);
    Checked {
        success: output.status.success(),
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        file: config.display().to_string(),
    }
}

/// Run a broken config; it must fail with exactly one stderr line. Returns that line after
/// the `shadowgate: invalid configuration FILE: ` prefix: `field.path: message`.
fn expect_error(config: &str) -> String {
    one_line_error(&check(config), config)
}

/// The error line of a refused config, after asserting exit code 2, nothing on stdout
/// and exactly one line on stderr.
fn one_line_error(checked: &Checked, config: &str) -> String {
    assert!(
        !checked.success,
        "a broken config passed the check:\n{config}\nstdout: {}",
        checked.stdout
    );
    assert_eq!(
        checked.code,
        Some(2),
        "exit code; stderr: {}",
        checked.stderr
    );
    assert_eq!(checked.stdout, "", "nothing on stdout for a failed check");
    let lines: Vec<&str> = checked.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one line on stderr, got:\n{}",
        checked.stderr
    );
    assert!(checked.stderr.ends_with('\n'), "{:?}", checked.stderr);
    let prefix = format!("shadowgate: invalid configuration {}: ", checked.file);
    lines[0]
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("stderr does not start with {prefix:?}: {}", lines[0]))
        .to_string()
}

/// 1-based line and column of the first occurrence of `needle` in `text`.
fn line_column(text: &str, needle: &str) -> (usize, usize) {
    let at = text
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not in config"));
    let line = text[..at].matches('\n').count() + 1;
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    (line, at - line_start + 1)
}

#[test]
fn the_valid_base_config_passes() {
    let checked = check(VALID);
    assert!(checked.success, "stderr: {}", checked.stderr);
    assert_eq!(
        checked.stdout,
        format!("shadowgate: configuration {} is valid\n", checked.file)
    );
}

#[test]
fn the_shipped_example_config_passes() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/shadowgate.yaml");
    let runtime = private_dir();
    let checked = run_check(&example, runtime.path());
    assert!(
        checked.success,
        "conf/shadowgate.yaml is rejected: {}",
        checked.stderr
    );
    assert!(checked.stdout.ends_with("is valid\n"), "{}", checked.stdout);
}

#[test]
fn unknown_upstream_names_the_route_and_the_known_pools() {
    assert_eq!(
        expect_error(&variant("unknown upstream")),
        r#"routes[1].upstream: unknown upstream "ap" (known: app, app-v2)"#
    );
}

#[test]
fn empty_pool() {
    assert_eq!(
        expect_error(&variant("empty pool")),
        r#"upstreams.app.servers: the pool has no servers; list at least one `{ address: "127.0.0.1:9000" }`"#
    );
}

#[test]
fn unparsable_addresses() {
    let hint = r#"write it as host:port, like "127.0.0.1:9000" or "app.internal:9000""#;
    assert_eq!(
        expect_error(&variant("server address without port")),
        format!(
            r#"upstreams.app.servers[1].address: cannot parse "127.0.0.1" as an address; {hint}"#
        )
    );
    assert_eq!(
        expect_error(&variant("server port out of range")),
        format!(
            r#"upstreams.app.servers[1].address: cannot parse "127.0.0.1:99999" as an address; {hint}"#
        )
    );
    // Listener addresses must be IP literals.
    let config = variant("listener address not an IP");
    let (line, column) = line_column(&config, "address: \"localhost");
    assert_eq!(
        expect_error(&config),
        format!(
            r#"listeners[0].address: cannot parse "localhost:18080" as an IP address and port; write it like "127.0.0.1:8080" or "[::1]:8080" at line {line} column {column}"#
        )
    );
}

#[test]
fn duplicate_route_name() {
    assert_eq!(
        expect_error(&variant("duplicate route name")),
        r#"routes[1].name: duplicate route name "api" (also routes[0].name); rename one"#
    );
}

#[test]
fn out_of_range_numbers() {
    assert_eq!(
        expect_error(&variant("weight 0")),
        "upstreams.app.servers[0].weight: 0 is out of range; use a value from 1 to 10000"
    );
    assert_eq!(
        expect_error(&variant("threads 0")),
        "threads: 0 is out of range; use a value from 1 to 1024"
    );
    let config = variant("mirror percentage 101");
    let (line, column) = line_column(&config, "{ upstream: app-v2");
    assert_eq!(
        expect_error(&config),
        format!(
            "routes[0].mirrors[0].percentage: 101 is out of range; use a number from 0 to 100 at line {line} column {column}"
        )
    );
}

#[test]
fn wrong_type_carries_the_yaml_line_and_column() {
    let config = variant("weight of the wrong type");
    let (line, column) = line_column(&config, "heavy");
    assert_eq!(
        expect_error(&config),
        format!(
            r#"upstreams.app.servers[0].weight: invalid type: string "heavy", expected u32 at line {line} column {column}"#
        )
    );
    // Pingora's own keys are typed too.
    let config = variant("Pingora key of the wrong type");
    let (line, column) = line_column(&config, "two");
    assert_eq!(
        expect_error(&config),
        format!(
            r#"threads: invalid type: string "two", expected usize at line {line} column {column}"#
        )
    );
}

#[test]
fn unknown_keys_in_a_section_and_at_top_level() {
    let config = variant("unknown key in match");
    let (line, column) = line_column(&config, "hots");
    assert_eq!(
        expect_error(&config),
        format!(
            "routes[0].match.hots: unknown field `hots`, expected one of `host`, `path_prefix`, `methods` at line {line} column {column}"
        )
    );
    let error = expect_error(&variant("unknown top-level key"));
    assert!(
        error.starts_with(
            "listener: unknown key; did you mean \"listeners\"? shadowgate's sections are listeners, upstreams, routes, metrics, mirror_budget_bytes"
        ),
        "{error}"
    );
}

#[test]
fn invalid_yaml_syntax_gives_line_and_column() {
    let config = variant("YAML indentation");
    let (line, column) = line_column(&config, " app-v2:");
    assert_eq!(
        expect_error(&config),
        format!(
            "did not find expected key at line {line} column {}, while parsing a block mapping",
            column + 1
        )
    );
    // An unclosed `{`: the parser notices on the next line, and says where the mapping began.
    let config = variant("YAML unclosed flow mapping");
    let (open_line, open_column) = line_column(&config, "{ path_prefix");
    let error = expect_error(&config);
    assert!(
        error.starts_with(&format!(
            "did not find expected ',' or '}}' at line {} column",
            open_line + 1
        )),
        "{error}"
    );
    assert!(
        error.ends_with(&format!(
            "while parsing a flow mapping at line {open_line} column {open_column}"
        )),
        "{error}"
    );
}

#[test]
fn consistent_hash_needs_a_hash_key() {
    assert_eq!(
        expect_error(&variant("consistent_hash without hash_key")),
        r#"upstreams.app.hash_key: consistent_hash needs a hash_key: "header:NAME", "client_ip" or "path""#
    );
}

#[test]
fn runtime_files_must_be_in_a_directory_only_this_user_can_enter() {
    for (name, key) in [
        ("pid_file in /tmp", "pid_file"),
        ("upgrade_sock in /tmp", "upgrade_sock"),
    ] {
        let error = expect_error(&variant(name));
        assert!(
            error.starts_with(&format!(
                "{key}: /tmp can be entered by other users (mode 1777, owner uid "
            )),
            "{error}"
        );
        assert!(
            error.contains(&format!(
                "Put {key} in a directory owned by this user with mode 0700"
            )),
            "{error}"
        );
    }
    // Group access is enough to be refused: the upgrade socket itself is mode 666.
    let error = expect_error(&variant("upgrade_sock in a group-enterable directory"));
    assert!(error.starts_with("upgrade_sock: "), "{error}");
    assert!(
        error.contains("/shared can be entered by other users (mode 750,"),
        "{error}"
    );
}

#[test]
fn every_error_is_one_line_on_stderr() {
    for b in BREAKS {
        let config = variant(b.name);
        // expect_error asserts one line, a non-zero exit and an empty stdout.
        let error = expect_error(&config);
        assert!(!error.trim().is_empty(), "{}: empty message", b.name);
    }
    // File-level problems too.
    let missing = check("# nothing but a comment\n");
    assert_eq!(missing.stderr.lines().count(), 1, "{}", missing.stderr);
    let dir = private_dir();
    let absent = run_check(&dir.path().join("absent.yaml"), dir.path());
    assert!(!absent.success);
    assert_eq!(absent.stderr.lines().count(), 1, "{}", absent.stderr);
    assert!(absent.stderr.contains("cannot read configuration file"));
}

/// The exact field path for values checked by custom deserializers (serde_yaml alone
/// would stop at the enclosing mapping, `listeners[0]`).
#[test]
fn field_paths_reach_the_field_in_custom_value_types() {
    assert!(
        expect_error(&variant("listener address not an IP")).starts_with("listeners[0].address: ")
    );
    assert!(
        expect_error(&variant("mirror percentage 101"))
            .starts_with("routes[0].mirrors[0].percentage: ")
    );
}

/// A key with a line break in it must not break the one-line rule.
#[test]
fn key_names_with_line_breaks_stay_on_one_line() {
    expect_error(&VALID.replacen("listeners:\n", "\"list\\ners\": []\nlisteners:\n", 1));
    expect_error(&VALID.replacen("  app-v2:\n", "  \"app\\nv2\":\n", 1));
}

/// Refuse `config` both ways: `shadowgate -t` and a real start must exit with code 2 and
/// the same one line. The listener and metrics get free ports, so a start that wrongly
/// succeeds is seen at once and never collides with another test.
fn expect_refused_by_check_and_start(config: &str) -> String {
    let dir = private_dir();
    let listener = free_port();
    let text = config
        .replace("RUNTIME", &dir.path().display().to_string())
        .replace("127.0.0.1:18080", &listener.to_string())
        .replace("127.0.0.1:19091", &free_port().to_string());
    let path = dir.path().join("shadowgate.yaml");
    std::fs::write(&path, &text).expect("write config");
    let checked = one_line_error(&run_check(&path, dir.path()), &text);
    let started = one_line_error(&run_start(&path, dir.path(), listener), &text);
    assert_eq!(checked, started, "-t and a real start disagree");
    checked
}

/// `VALID` with `from` (which occurs exactly once) replaced by `to`.
fn with(from: &str, to: &str) -> String {
    assert_eq!(VALID.matches(from).count(), 1, "{from:?}");
    VALID.replacen(from, to, 1)
}

/// The app pool with a health check of the given keys.
fn with_health_check(keys: &str) -> String {
    with(
        "    selection: round_robin\n",
        &format!("    selection: round_robin\n    health_check: {{ type: http, {keys} }}\n"),
    )
}

/// The api route's mirror with extra keys.
fn with_mirror_keys(keys: &str) -> String {
    with(
        "{ upstream: app-v2, percentage: 25 }",
        &format!("{{ upstream: app-v2, percentage: 25, {keys} }}"),
    )
}

/// Pingora's HTTP health check unwraps its Host as a header value: a line break there
/// used to pass `-t` and then panic at startup.
#[test]
fn health_check_host_with_a_line_break_is_refused_before_start() {
    let error = expect_refused_by_check_and_start(&with_health_check(r#"host: "bad\nhost""#));
    assert!(
        error.starts_with(r#"upstreams.app.health_check.host: "bad\nhost" is not a valid Host"#),
        "{error}"
    );
}

#[test]
fn health_check_path_must_be_an_origin_form_path() {
    for (path, why) in [
        ("healthz", "must start with '/'"),
        ("\"/health z\"", "contains ' '; percent-encode it"),
        ("\"/health\\x01\"", "contains '\\u{1}'; percent-encode it"),
        ("\"/health#x\"", "contains '#'"),
    ] {
        let error = expect_refused_by_check_and_start(&with_health_check(&format!("path: {path}")));
        assert!(
            error.starts_with("upstreams.app.health_check.path: ") && error.contains(why),
            "{path}: {error}"
        );
    }
}

/// An invalid Host rewrite used to be dropped silently: the route sent the client's Host.
#[test]
fn invalid_upstream_host_is_refused_not_dropped() {
    let error = expect_refused_by_check_and_start(&with(
        "  - name: default\n    upstream: app\n",
        "  - name: default\n    upstream: app\n    upstream_host: \"app internal\"\n",
    ));
    assert!(
        error.starts_with(r#"routes[1].upstream_host: "app internal" is not a valid Host"#),
        "{error}"
    );
}

/// A mirror's Host must be a host (with an optional port), not just any header value.
#[test]
fn invalid_mirror_host_is_refused() {
    for (yaml, shown) in [
        (r#""app v2""#, r#""app v2""#),
        (r#""v2\r\nx-evil: 1""#, r#""v2\r\nx-evil: 1""#),
    ] {
        let error = expect_refused_by_check_and_start(&with_mirror_keys(&format!("host: {yaml}")));
        assert!(
            error.starts_with(&format!(
                "routes[0].mirrors[0].host: {shown} is not a valid Host: "
            )),
            "{error}"
        );
    }
}

#[test]
fn invalid_mirror_header_edits_are_refused() {
    let error = expect_refused_by_check_and_start(&with_mirror_keys(
        r#"request_headers: { set: { "bad name": x } }"#,
    ));
    assert!(
        error.starts_with("routes[0].mirrors[0].request_headers.set")
            && error.contains(r#""bad name" is not a valid header name"#),
        "{error}"
    );
    let error = expect_refused_by_check_and_start(&with_mirror_keys(
        r#"request_headers: { set: { x-env: "a\nb" } }"#,
    ));
    assert!(
        error.starts_with(
            r#"routes[0].mirrors[0].request_headers.set.x-env: "a\nb" is not a valid header value"#
        ),
        "{error}"
    );
    let error = expect_refused_by_check_and_start(&with_mirror_keys(
        r#"request_headers: { set: { X-Env: a, x-env: b } }"#,
    ));
    assert!(error.contains("\"x-env\" is listed twice"), "{error}");
    let error = expect_refused_by_check_and_start(&with_mirror_keys(
        r#"request_headers: { remove: [cookie, "bad:name"] }"#,
    ));
    assert!(
        error.starts_with(r#"routes[0].mirrors[0].request_headers.remove[1]: "bad:name" is not a valid header name"#),
        "{error}"
    );
    // Framing fields: the shadow's body is framed as the primary's.
    let error = expect_refused_by_check_and_start(&with_mirror_keys(
        r#"request_headers: { remove: [cookie, Content-Length] }"#,
    ));
    assert!(
        error.starts_with(r#"routes[0].mirrors[0].request_headers.remove[1]: "content-length" frames the body and cannot be edited"#),
        "{error}"
    );
    let error = expect_refused_by_check_and_start(&with_mirror_keys(
        r#"request_headers: { set: { transfer-encoding: chunked } }"#,
    ));
    assert!(
        error.starts_with(
            r#"routes[0].mirrors[0].request_headers.set.transfer-encoding: "transfer-encoding" frames the body"#
        ),
        "{error}"
    );
}

#[test]
fn path_prefix_must_start_with_a_slash() {
    let error = expect_refused_by_check_and_start(&with(
        "match: { path_prefix: /api }",
        "match: { path_prefix: api }",
    ));
    assert!(
        error.starts_with(r#"routes[0].match.path_prefix: "api" must start with '/'"#),
        "{error}"
    );
    let error = expect_refused_by_check_and_start(&with(
        "match: { path_prefix: /api }",
        "match: { path_prefix: \"/a pi\" }",
    ));
    assert!(
        error.starts_with("routes[0].match.path_prefix: ") && error.contains("percent-encode"),
        "{error}"
    );
    let error = expect_refused_by_check_and_start(&with(
        "match: { path_prefix: /api }",
        "match: { path_prefix: /api/../web }",
    ));
    assert!(
        error.starts_with("routes[0].match.path_prefix: ")
            && error.contains(r#"write the prefix resolved, like "/web""#),
        "{error}"
    );
}

/// The valid base config, started for real through the same harness: proves a start that
/// succeeds is seen as one, so the refusals above are not an artefact of the harness.
#[test]
fn the_valid_base_config_starts() {
    let dir = private_dir();
    let listener = free_port();
    let text = VALID
        .replace("RUNTIME", &dir.path().display().to_string())
        .replace("127.0.0.1:18080", &listener.to_string())
        .replace("127.0.0.1:19091", &free_port().to_string());
    let path = dir.path().join("shadowgate.yaml");
    std::fs::write(&path, &text).expect("write config");
    let started = run_start(&path, dir.path(), listener);
    assert!(started.code.is_none(), "did not start: {}", started.stderr);
}

/// `listeners[].client` limits: ranges and unknown keys name the exact field; a valid section passes.
#[test]
fn client_limits_are_checked_field_by_field() {
    let with_client = |client: &str| {
        VALID.replacen(
            "  - address: \"127.0.0.1:18080\"\n",
            &format!("  - address: \"127.0.0.1:18080\"\n    client: {client}\n"),
            1,
        )
    };
    assert!(
        check(&with_client(
            "{ header_timeout_ms: 5000, max_connections: 100, max_connections_per_ip: 10, read_buffer_bytes: 0 }"
        ))
        .success
    );
    assert_eq!(
        expect_error(&with_client("{ header_timeout_ms: 0 }")),
        "listeners[0].client.header_timeout_ms: 0 is out of range; use a value from 1 to 3600000"
    );
    assert_eq!(
        expect_error(&with_client("{ max_headers: 500 }")),
        "listeners[0].client.max_headers: 500 is out of range; use a value from 1 to 256"
    );
    assert_eq!(
        expect_error(&with_client(
            "{ max_connections: 10, max_connections_per_ip: 20 }"
        )),
        "listeners[0].client.max_connections_per_ip: 20 is above max_connections (10); lower it or raise max_connections"
    );
    let error = expect_error(&with_client("{ header_timeout: 5000 }"));
    assert!(
        error.starts_with("listeners[0].client.header_timeout: unknown field `header_timeout`"),
        "{error}"
    );
    let error = expect_error(&VALID.replacen(
        "    selection: round_robin\n",
        "    selection: round_robin\n    retry_idempotent: maybe\n",
        1,
    ));
    assert!(
        error.starts_with("upstreams.app.retry_idempotent: invalid type"),
        "{error}"
    );
}

/// A key on an underscored header could never match where listeners drop such fields:
/// refused by `-t` and at start alike, naming the key and the setting that would allow it.
#[test]
fn a_key_on_an_underscored_header_is_refused_unless_listeners_allow_it() {
    let keyed = with(
        "{ upstream: app-v2, percentage: 25 }",
        "{ upstream: app-v2, percentage: 25, sample_by: \"header:X_User\" }",
    );
    let error = expect_refused_by_check_and_start(&keyed);
    assert!(
        error.starts_with("routes[0].mirrors[0].sample_by: ")
            && error.contains("listeners[0].client.headers_with_underscores: allow"),
        "{error}"
    );
    assert!(!error.contains('\n'), "{error}");
}
