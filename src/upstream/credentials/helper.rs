//! The Docker credential-helper protocol: run `docker-credential-NAME get`, write the registry
//! host on stdin, read `{"ServerURL","Username","Secret"}` from stdout. Any helper an operator
//! already uses (ecr-login, gcr, acr-env, pass, …) becomes an upstream's credential source.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use super::{Basic, CredentialError, Lease};
use crate::config::{HelperSource, Secret};

pub struct Helper {
    program: PathBuf,
    server: String,
    timeout: Duration,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Answer {
    username: String,
    secret: String,
}

impl Helper {
    pub fn new(cfg: &HelperSource, timeout: Duration) -> Helper {
        Helper {
            program: cfg.program.clone(),
            server: cfg.server.clone(),
            timeout,
        }
    }

    pub async fn fetch(&self) -> Result<Lease, CredentialError> {
        let what = format!("credential helper `{} get`", self.program.display());
        let mut child = tokio::process::Command::new(&self.program)
            .arg("get")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| CredentialError::refused(format!("{what}: cannot run: {e}")))?;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        // A helper that exits without reading its input must not fail us with EPIPE.
        let _ = stdin
            .write_all(format!("{}\n", self.server).as_bytes())
            .await;
        drop(stdin);
        let out = tokio::time::timeout(self.timeout, child.wait_with_output())
            .await
            .map_err(|_| {
                CredentialError::transient(format!("{what}: no answer within {:?}", self.timeout))
            })?
            .map_err(|e| CredentialError::refused(format!("{what}: {e}")))?;
        if !out.status.success() {
            // A failing helper prints its error ("credentials not found in native keychain") on
            // stdout (docker-credential-helpers) or stderr; it wrote no secret, so both are quoted.
            let stderr = String::from_utf8_lossy(&out.stderr);
            let stdout = String::from_utf8_lossy(&out.stdout);
            let said: String = format!("{} {}", stderr.trim(), stdout.trim())
                .chars()
                .take(300)
                .collect();
            return Err(CredentialError::refused(format!(
                "{what} for {:?} failed ({}): {}",
                self.server,
                out.status,
                said.trim()
            )));
        }
        let answer: Answer = serde_json::from_slice(&out.stdout).map_err(|e| {
            CredentialError::refused(format!("{what}: not the helper protocol's JSON: {e}"))
        })?;
        if answer.username == "<token>" {
            return Err(CredentialError::refused(format!(
                "{what}: answered an identity token (Username \"<token>\"), which dockside does \
                 not support; configure the helper to return a user name and password"
            )));
        }
        if answer.username.is_empty() || answer.secret.is_empty() {
            return Err(CredentialError::refused(format!(
                "{what}: empty Username or Secret"
            )));
        }
        Ok(Lease {
            basic: Basic {
                username: answer.username,
                password: Secret::new(answer.secret),
            },
            expires: None,
        })
    }
}
