//! Host commands (`ip`, `iptables`, `weft`, ...): running and checking them, finding binaries.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::error::{HarnessError, Result, io};

pub(crate) fn render(command: &Command) -> String {
    let mut s = command.get_program().to_string_lossy().to_string();
    for a in command.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

pub(crate) fn output(mut command: Command) -> Result<Output> {
    let line = render(&command);
    command.output().map_err(|e| HarnessError::Command {
        command: line,
        reason: e.to_string(),
    })
}

pub(crate) fn check(command: Command) -> Result<Output> {
    let line = render(&command);
    let out = output(command)?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(HarnessError::Command {
            command: line,
            reason: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}

pub(crate) fn cmd(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

/// Finds a binary built by this workspace next to the running executable.
pub fn workspace_binary(name: &str) -> Result<PathBuf> {
    if let Ok(p) = std::env::var(format!(
        "WEFT_BIN_{}",
        name.to_uppercase().replace('-', "_")
    )) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(io(Path::new("current_exe")))?;
    // target/debug/<bin> or target/debug/deps/<test>.
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(HarnessError::Missing {
        what: "workspace binary",
        hint: format!("{name} is not built; run `cargo build --workspace --bins` first"),
    })
}

/// The file `name` in the first directory of PATH that has it.
pub fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The Envoy binary: `WEFT_ENVOY`, else `envoy` on PATH.
pub fn envoy_binary() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("WEFT_ENVOY") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
    }
    on_path("envoy").ok_or_else(|| HarnessError::Missing {
        what: "envoy",
        hint: "set WEFT_ENVOY or run `make setup` (installs Envoy 1.40 into tools/)".to_string(),
    })
}
