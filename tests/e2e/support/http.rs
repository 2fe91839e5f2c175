//! Small blocking HTTP helpers on top of reqwest (async) for the tests.

use std::time::Duration;

use reqwest::Method;
use reqwest::header::HeaderMap;

/// Every manifest media type a registry client accepts.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap_or("<non-ascii>").to_string())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The start of the body as text, for assertion messages.
    pub fn snippet(&self) -> String {
        let t = self.text();
        match t.char_indices().nth(300) {
            Some((i, _)) => format!("{}... ({} bytes)", &t[..i], self.body.len()),
            None => t,
        }
    }

    /// The `code` of the first OCI error in the body (`{"errors":[{"code":...}]}`).
    pub fn error_code(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        v["errors"][0]["code"].as_str().map(str::to_string)
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        // The harness itself talks to TLS upstreams with throwaway certificates; what dockside
        // trusts is tested through its own `ca_file`, not through this client.
        .danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(120))
        .connect_timeout(Duration::from_secs(5))
        .build()
        .expect("reqwest client")
}

/// Runs `fut` on a fresh current-thread runtime.
pub fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(fut)
}

/// One request with optional extra headers; the whole body is read.
pub fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> reqwest::Result<Resp> {
    block_on(async {
        let mut req = client().request(Method::from_bytes(method.as_bytes()).unwrap(), url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.bytes().await?.to_vec();
        Ok(Resp {
            status,
            headers,
            body,
        })
    })
}

pub fn get(url: &str) -> reqwest::Result<Resp> {
    request("GET", url, &[], None)
}

/// GET of a manifest with every manifest type accepted.
pub fn get_manifest(url: &str) -> Resp {
    request("GET", url, &[("Accept", MANIFEST_ACCEPT)], None)
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// A GET whose body may fail part-way: the status, and the body or the error that cut it.
pub fn get_outcome(url: &str) -> (u16, Result<Vec<u8>, String>) {
    block_on(async {
        let resp = match client().get(url).send().await {
            Ok(r) => r,
            Err(e) => return (0, Err(format!("request failed: {e}"))),
        };
        let status = resp.status().as_u16();
        match resp.bytes().await {
            Ok(b) => (status, Ok(b.to_vec())),
            Err(e) => (status, Err(format!("body cut: {e}"))),
        }
    })
}

/// A GET sent byte for byte as given (no URL normalisation, unlike reqwest, which resolves
/// `..` and `%2e%2e` segments), over a fresh connection. Returns status and body.
pub fn raw_get(host: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(host).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: {MANIFEST_ACCEPT}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = Vec::new();
    conn.read_to_end(&mut buf).expect("read response");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}
