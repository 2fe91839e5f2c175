//! A real S3-compatible server on loopback for the shared tier: moto's server (the e2e suite's
//! local AWS), with one bucket, reached without signatures by the test itself and with
//! SigV4 by dockside.

use std::process::{Command, Stdio};

use super::http;
use super::moto::Moto;

pub const BUCKET: &str = "dockside";
pub const PREFIX: &str = "cache/";

pub struct S3 {
    moto: Moto,
}

impl S3 {
    /// moto with the bucket created.
    pub fn start() -> S3 {
        // Every call unchecked: the tier's signing is tested by moto's parsing of it, the
        // credentials chain by its own tests.
        let moto = Moto::start(u32::MAX);
        let url = format!("{}/{BUCKET}", moto.url());
        let made = http::request("PUT", &url, &[], None).expect("create bucket");
        assert_eq!(made.status, 200, "create bucket: {}", made.snippet());
        S3 { moto }
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        self.moto.url().trim_start_matches("http://").to_string()
    }

    /// The `cache:` keys that put a dockside on this bucket, through `endpoint` (this server,
    /// or a proxy in front of it).
    pub fn cache_yaml(endpoint: &str) -> String {
        format!(
            "  shared:\n    s3:\n      endpoint: \"{endpoint}\"\n      bucket: {BUCKET}\n      \
             region: us-east-1\n      prefix: {PREFIX}\n    timeout: 2s\n    \
             circuit: {{failures: 2, cooldown: 2s}}\n"
        )
    }

    /// The environment dockside needs for it: static credentials, no instance metadata.
    pub fn env() -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    pub fn url(&self) -> String {
        self.moto.url()
    }

    /// Every key under `prefix` (below the tier's own prefix), in order.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let url = format!(
            "{}/{BUCKET}?list-type=2&prefix={PREFIX}{prefix}",
            self.moto.url()
        );
        let listed = http::get(&url).expect("list objects").text();
        let mut keys: Vec<String> = listed
            .split("<Key>")
            .skip(1)
            .filter_map(|rest| rest.split_once("</Key>").map(|(k, _)| k.to_string()))
            .collect();
        keys.sort();
        keys
    }

    /// The key of a blob or manifest.
    pub fn blob_key(digest: &str) -> String {
        format!(
            "{PREFIX}blobs/sha256/{}",
            digest.trim_start_matches("sha256:")
        )
    }

    /// An object's bytes, read with boto3 (moto refuses unsigned object reads).
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        let out = self.boto("get", key, None);
        (out.status.success()).then_some(out.stdout)
    }

    /// Replace an object's bytes, with boto3.
    pub fn put(&self, key: &str, body: Vec<u8>) {
        let out = self.boto("put", key, Some(body));
        assert!(
            out.status.success(),
            "put {key}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn boto(&self, op: &str, key: &str, body: Option<Vec<u8>>) -> std::process::Output {
        use std::io::Write;
        let mut child = Command::new(self.moto.venv().join("bin/python"))
            .args(["-c", BOTO_PY, &self.moto.url(), BUCKET, key, op])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("venv python");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(&body.unwrap_or_default())
            .expect("write body");
        drop(stdin);
        child.wait_with_output().expect("boto3 call")
    }
}

/// `get` writes the object to stdout (exit 1 if absent); `put` stores stdin under the key.
const BOTO_PY: &str = r#"
import sys, boto3
url, bucket, key, op = sys.argv[1:5]
s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                  aws_access_key_id="testing", aws_secret_access_key="testing")
if op == "put":
    s3.put_object(Bucket=bucket, Key=key, Body=sys.stdin.buffer.read())
else:
    try:
        sys.stdout.buffer.write(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    except s3.exceptions.NoSuchKey:
        sys.exit(1)
"#;
