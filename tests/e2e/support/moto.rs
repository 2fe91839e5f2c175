//! moto (PyPI `moto[server]`) as a local AWS: IAM, STS and ECR on 127.0.0.1, checking SigV4
//! signatures and IAM policies once the setup calls are done (`INITIAL_NO_AUTH_ACTION_COUNT`).
//!
//! moto and boto3 live in a venv under `target/e2e-venv` (or `$DOCKSIDE_E2E_VENV`), which
//! `.ci/run` creates; a test that finds none creates it, under a lock.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use super::proc::Proc;
use super::tools;

pub const MOTO: &str = "moto[server]==5.2.5";

/// The region, account and registry the tests use.
pub const REGION: &str = "eu-west-1";
pub const ACCOUNT: &str = "123456789012";

fn venv() -> PathBuf {
    let dir = std::env::var_os("DOCKSIDE_E2E_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/e2e-venv"));
    let marker = dir.join(".moto-installed");
    if marker.exists() {
        return dir;
    }
    std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
    let lock = std::fs::File::create(dir.with_extension("lock")).unwrap();
    // SAFETY: flock on a descriptor we own; released when `lock` is dropped.
    assert_eq!(
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) },
        0
    );
    if !marker.exists() {
        let run = |cmd: &mut Command| {
            let out = cmd.output().expect("run python3 (package python3-venv)");
            assert!(
                out.status.success(),
                "{cmd:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(tools::command("python3").arg("-m").arg("venv").arg(&dir));
        run(Command::new(dir.join("bin/pip")).args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            MOTO,
        ]));
        std::fs::write(&marker, MOTO).unwrap();
    }
    dir
}

pub struct Moto {
    pub port: u16,
    proc: Proc,
    venv: PathBuf,
    _dir: TempDir,
}

/// What [`Moto::setup`] created: an IAM user's access key and a role for web identity, both
/// allowed `ecr:GetAuthorizationToken`, and the registry password moto's ECR hands out.
#[derive(serde::Deserialize, Debug)]
pub struct Setup {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub role_arn: String,
    /// Temporary credentials of the role (AssumeRole), as instance metadata hands out.
    pub role_key_id: String,
    pub role_secret: String,
    pub role_token: String,
    pub user: String,
    pub password: String,
}

/// The number of AWS calls [`Moto::setup`] makes.
pub const SETUP_CALLS: u32 = 7;

const SETUP_PY: &str = r#"
import base64, json, sys
import boto3
kw = dict(endpoint_url=sys.argv[1], region_name=sys.argv[2],
          aws_access_key_id="AKIASETUPSETUPSETUP0", aws_secret_access_key="setup")
iam = boto3.client("iam", **kw)
iam.create_user(UserName="dockside")
key = iam.create_access_key(UserName="dockside")["AccessKey"]
allow = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": "ecr:GetAuthorizationToken", "Resource": "*"}]})
iam.put_user_policy(UserName="dockside", PolicyName="ecr", PolicyDocument=allow)
trust = json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
    "Principal": {"Federated": "arn:aws:iam::%s:oidc-provider/oidc.example" % sys.argv[3]},
    "Action": "sts:AssumeRoleWithWebIdentity"}]})
role = iam.create_role(RoleName="dockside-node", AssumeRolePolicyDocument=trust)["Role"]["Arn"]
iam.put_role_policy(RoleName="dockside-node", PolicyName="ecr", PolicyDocument=allow)
temp = boto3.client("sts", **kw).assume_role(RoleArn=role, RoleSessionName="imds")["Credentials"]
ecr = boto3.client("ecr", **kw)
data = ecr.get_authorization_token(registryIds=[sys.argv[3]])["authorizationData"][0]
user, password = base64.b64decode(data["authorizationToken"]).decode().split(":", 1)
print(json.dumps({"access_key_id": key["AccessKeyId"], "secret_access_key": key["SecretAccessKey"],
                  "role_arn": role, "role_key_id": temp["AccessKeyId"],
                  "role_secret": temp["SecretAccessKey"], "role_token": temp["SessionToken"],
                  "user": user, "password": password}))
"#;

impl Moto {
    /// Starts moto; the first `free_calls` AWS calls go unchecked, every later one must be
    /// signed by a known key whose policies allow it.
    pub fn start(free_calls: u32) -> Moto {
        let venv = venv();
        let dir = tempfile::Builder::new()
            .prefix("e2e-moto-")
            .tempdir()
            .unwrap();
        // Port 0: werkzeug binds a free port and logs it (` * Running on http://127.0.0.1:PORT`).
        let mut cmd = Command::new(venv.join("bin/moto_server"));
        cmd.args(["-H", "127.0.0.1", "-p", "0"])
            .env("INITIAL_NO_AUTH_ACTION_COUNT", free_calls.to_string());
        let log = dir.path().join("moto.log");
        let mut proc = Proc::spawn(
            "moto_server",
            cmd,
            &log,
            libc::SIGINT,
            Duration::from_secs(5),
        );
        let mut port = None;
        let running = || {
            port = running_port(&super::read_lossy(&log));
            port.is_some()
        };
        proc.wait_ready("moto_server to log its address", running)
            .unwrap_or_else(|log| panic!("moto_server exited; log:\n{}", super::tail(&log, 30)));
        let port = port.expect("logged port");
        let url = format!("http://127.0.0.1:{port}/moto-api/");
        proc.wait_ready("moto_server to answer", || {
            super::http::get(&url).is_ok_and(|r| r.status == 200)
        })
        .unwrap_or_else(|log| panic!("moto_server exited; log:\n{}", super::tail(&log, 30)));
        Moto {
            port,
            proc,
            venv,
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The venv moto runs from, with boto3.
    pub fn venv(&self) -> &std::path::Path {
        &self.venv
    }

    /// Creates the IAM user, role and policies with boto3 and reads moto's ECR password.
    pub fn setup(&self) -> Setup {
        let out = Command::new(self.venv.join("bin/python"))
            .args(["-c", SETUP_PY, &self.url(), REGION, ACCOUNT])
            .output()
            .expect("venv python");
        assert!(
            out.status.success(),
            "moto setup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("setup JSON")
    }

    /// Requests moto answered with `status` to `POST /` (where IAM, STS and ECR calls go).
    pub fn posts(&self, status: u16) -> usize {
        let needle = format!("\"POST / HTTP/1.1\" {status}");
        self.proc.log().matches(&needle).count()
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }
}

/// The port in werkzeug's ` * Running on http://127.0.0.1:PORT`.
fn running_port(log: &str) -> Option<u16> {
    let rest = log.split("Running on http://127.0.0.1:").nth(1)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}
