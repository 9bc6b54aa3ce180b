//! Where the pid file and upgrade socket live: a directory only this user can enter.

use std::path::{Path, PathBuf};

use pingora_core::server::configuration::ServerConf;

use super::error::ConfigError;

/// Where the pid file and upgrade socket go when the config does not say.
///
/// Pingora's own defaults sit in /tmp, where another local user could bind the
/// upgrade socket first and be handed our listening sockets. We use a directory
/// only our user can enter instead.
pub fn default_runtime_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("shadowgate");
    }
    // SAFETY-free: geteuid has no failure mode; read it via /proc to avoid libc.
    let uid = current_uid();
    if uid == Some(0) {
        PathBuf::from("/run/shadowgate")
    } else {
        PathBuf::from(format!("/tmp/shadowgate-{}", uid.unwrap_or(0)))
    }
}

pub(super) fn apply_private_runtime_dir(server: &mut ServerConf, mapping: &serde_yaml::Mapping) {
    let dir = default_runtime_dir();
    if !mapping.contains_key("pid_file") {
        server.pid_file = dir.join("shadowgate.pid").to_string_lossy().into_owned();
    }
    if !mapping.contains_key("upgrade_sock") {
        server.upgrade_sock = dir.join("upgrade.sock").to_string_lossy().into_owned();
    }
}

/// With one worker thread there is nobody to steal work from, and Pingora's
/// per-thread runtimes cost measurably less per request than a one-thread
/// work-stealing runtime (about 8% CPU per proxied GET, README "Performance").
/// With more threads Pingora's default (stealing) stays. An explicit
/// `work_stealing` key always wins.
pub(super) fn apply_runtime_defaults(server: &mut ServerConf, mapping: &serde_yaml::Mapping) {
    if !mapping.contains_key("work_stealing") && server.threads <= 1 {
        server.work_stealing = false;
    }
}

/// The user id this process runs as, from /proc (Linux).
pub fn current_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    // Uid: real effective saved fs
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Reject a pid file or upgrade socket whose directory others can enter.
///
/// A missing directory is fine here: `prepare_runtime_dirs` creates it with mode 0700.
pub(super) fn check_private_dir(key: &str, file: &str) -> Result<(), ConfigError> {
    use std::os::unix::fs::MetadataExt;
    let path = Path::new(file);
    if !path.is_absolute() {
        return Err(ConfigError::new(
            key,
            format!("{file:?} must be an absolute path"),
        ));
    }
    let Some(dir) = path.parent() else {
        return Err(ConfigError::new(key, format!("{file:?} has no directory")));
    };
    let Ok(meta) = std::fs::metadata(dir) else {
        return Ok(());
    };
    let open_to_others = meta.mode() & 0o077 != 0;
    let foreign_owner = current_uid().is_some_and(|uid| uid != meta.uid());
    if open_to_others || foreign_owner {
        return Err(ConfigError::new(
            key,
            format!(
                "{} can be entered by other users (mode {:o}, owner uid {}); another local user could take over the upgrade socket. \
                 Put {key} in a directory owned by this user with mode 0700, e.g. {}, or remove the key to use that default",
                dir.display(),
                meta.mode() & 0o7777,
                meta.uid(),
                default_runtime_dir().display()
            ),
        ));
    }
    Ok(())
}

/// Create the directories of the pid file and upgrade socket, private to this user.
pub fn prepare_runtime_dirs(server: &ServerConf) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    for file in [&server.pid_file, &server.upgrade_sock] {
        if let Some(dir) = Path::new(file).parent()
            && !dir.exists()
        {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{MINIMAL, parse};

    #[test]
    fn tmp_is_not_private() {
        let err = parse(&format!("{MINIMAL}\nupgrade_sock: /tmp/sg.sock\n")).unwrap_err();
        assert_eq!(err.path, "upgrade_sock");
    }
}
