//! A command line to run from the workspace root, shown as it is run.

use std::{
    ffi::OsString,
    fmt,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
};

use anyhow::{Context, bail};

/// A program, its arguments and extra environment, run in the workspace root.
#[derive(Debug, Clone)]
pub(crate) struct Cmd {
    program: OsString,
    /// What the program is called when the command is shown (`cargo`, not its full path).
    shown_as: String,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    dir: PathBuf,
}

impl Cmd {
    /// `cargo`: the one that runs this xtask (`$CARGO`), so the same toolchain is used throughout.
    pub(crate) fn cargo(root: &Path) -> Self {
        let program = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        Self {
            program,
            shown_as: "cargo".to_owned(),
            args: Vec::new(),
            envs: Vec::new(),
            dir: root.to_path_buf(),
        }
    }

    /// Appends arguments.
    pub(crate) fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets an environment variable for the command.
    pub(crate) fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.envs.push((key.to_owned(), value.into()));
        self
    }

    fn command(&self) -> Command {
        let mut command = Command::new(&self.program);
        command.args(&self.args).current_dir(&self.dir);
        for (key, value) in &self.envs {
            command.env(key, value);
        }
        command
    }

    /// Runs the command with our stdin, stdout and stderr; an error, naming the command, unless
    /// it exits with 0.
    pub(crate) fn run(&self) -> anyhow::Result<()> {
        let status = self
            .command()
            .status()
            .with_context(|| format!("could not start `{self}`"))?;
        if !status.success() {
            bail!("`{self}` failed ({status})");
        }
        Ok(())
    }

    /// Runs the command and returns its standard output (its standard error goes to ours); an
    /// error, naming the command, unless it exits with 0.
    pub(crate) fn read(&self) -> anyhow::Result<String> {
        let output = self
            .command()
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("could not start `{self}`"))?;
        if !output.status.success() {
            bail!("`{self}` failed ({})", output.status);
        }
        String::from_utf8(output.stdout).with_context(|| format!("`{self}` printed non-UTF-8"))
    }

    /// Runs the command and returns its standard output, or `None` if it could not be started or
    /// did not exit with 0. Its standard error is discarded.
    pub(crate) fn probe(&self) -> Option<String> {
        let output = self.command().stderr(Stdio::null()).output().ok()?;
        if !output.status.success() {
            return None;
        }
        String::from_utf8(output.stdout).ok()
    }

    /// Hands the terminal over to the command: on Unix this process becomes the command (so
    /// Ctrl-C reaches it alone and its exit status is ours); elsewhere it is waited for and its
    /// exit code returned.
    pub(crate) fn hand_over(&self) -> anyhow::Result<ExitCode> {
        #[cfg(unix)]
        {
            use std::os::unix::process::CommandExt;
            let error = self.command().exec();
            Err(error).with_context(|| format!("could not start `{self}`"))
        }
        #[cfg(not(unix))]
        {
            let status = self
                .command()
                .status()
                .with_context(|| format!("could not start `{self}`"))?;
            let code = status.code().unwrap_or(1).clamp(0, 255);
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
        }
    }
}

impl fmt::Display for Cmd {
    /// The command as one would type it in a POSIX shell.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (key, value) in &self.envs {
            write!(f, "{key}={} ", quoted(value))?;
        }
        f.write_str(&self.shown_as)?;
        for arg in &self.args {
            write!(f, " {}", quoted(arg))?;
        }
        Ok(())
    }
}

/// `s`, single-quoted if a shell would otherwise split or expand it.
fn quoted(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=.,/:@+".contains(c));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shows_the_command_as_typed_in_a_shell() {
        let cmd = Cmd::cargo(Path::new("."))
            .env("RUSTDOCFLAGS", "-D warnings")
            .args(["doc", "--workspace", "--no-deps", "it's"]);
        assert_eq!(
            cmd.to_string(),
            r"RUSTDOCFLAGS='-D warnings' cargo doc --workspace --no-deps 'it'\''s'"
        );
    }
}
