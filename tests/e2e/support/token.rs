//! A small Docker-registry token server (the `auth: token` scheme of docker-registry).
//!
//! Answers `GET /token?service=&scope=` (Basic credentials) and the OAuth2
//! `POST /token` (form `grant_type=password`), with `{"token", "access_token", "expires_in"}`.
//! Tokens are RS256 JWTs signed by the `openssl` CLI with a fresh self-signed key whose
//! certificate rides in the JWT header's `x5c` and is the registry's `rootcertbundle`.

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::json;

use super::serve::LoopbackServer;
use super::tools;

pub const SERVICE: &str = "dockside-e2e-registry";
pub const ISSUER: &str = "dockside-e2e-issuer";

/// One request the token server answered.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    pub account: Option<String>,
    pub service: Option<String>,
    pub scopes: Vec<String>,
    pub granted: bool,
}

struct Shared {
    user: String,
    password: String,
    key: PathBuf,
    cert_b64: String,
    requests: Mutex<Vec<TokenRequest>>,
}

pub struct TokenServer {
    pub port: u16,
    pub cert_pem: PathBuf,
    shared: Arc<Shared>,
    _server: LoopbackServer,
}

impl TokenServer {
    /// Starts a token server that grants any requested scope to `user`/`password`; key and
    /// certificate are written under `dir`.
    pub fn start(dir: &Path, user: &str, password: &str) -> TokenServer {
        let key = dir.join("token-key.pem");
        let cert_pem = dir.join("token-cert.pem");
        let out = tools::command("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", "/CN=dockside-e2e-token"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert_pem)
            .output()
            .expect("run openssl (package openssl)");
        assert!(
            out.status.success(),
            "openssl req failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let der = tools::command("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(&cert_pem)
            .output()
            .expect("openssl x509");
        assert!(der.status.success(), "openssl x509 -outform DER failed");

        let shared = Arc::new(Shared {
            user: user.to_string(),
            password: password.to_string(),
            key,
            cert_b64: STANDARD.encode(&der.stdout),
            requests: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let server = LoopbackServer::start("token server", move |conn| {
            let _ = handle(conn, &s);
        });
        TokenServer {
            port: server.port,
            cert_pem,
            shared,
            _server: server,
        }
    }

    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    /// Every request answered so far.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.shared.requests.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.shared.requests.lock().unwrap().clear();
    }
}

fn handle(conn: TcpStream, s: &Shared) -> std::io::Result<()> {
    let super::endpoint::Request {
        method,
        target,
        headers,
        body,
    } = super::endpoint::read_request(&conn)?;

    let url = url::Url::parse(&format!("http://x{target}")).expect("request target");
    let mut params: Vec<(String, String)> = url.query_pairs().into_owned().collect();
    if method == "POST" {
        params.extend(url::form_urlencoded::parse(&body).into_owned());
    }
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let scopes: Vec<String> = params
        .iter()
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' ').map(str::to_string).collect::<Vec<_>>())
        .filter(|v| !v.is_empty())
        .collect();

    // Credentials: Basic header (GET) or the password grant (POST).
    let mut creds: Option<(String, String)> = headers
        .get("authorization")
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| STANDARD.decode(b.trim()).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| {
            s.split_once(':')
                .map(|(u, p)| (u.to_string(), p.to_string()))
        });
    if method == "POST" && param("grant_type").as_deref() == Some("password") {
        creds = Some((
            param("username").unwrap_or_default(),
            param("password").unwrap_or_default(),
        ));
    }
    let account = creds.as_ref().map(|(u, _)| u.clone());
    let ok_path = url.path() == "/token" && (method == "GET" || method == "POST");
    let granted = ok_path
        && creds
            .as_ref()
            .is_some_and(|(u, p)| *u == s.user && *p == s.password);
    s.requests.lock().unwrap().push(TokenRequest {
        account: account.clone(),
        service: param("service"),
        scopes: scopes.clone(),
        granted,
    });

    let (status, body) = if !ok_path {
        ("404 Not Found", json!({"error": "not found"}).to_string())
    } else if !granted {
        (
            "401 Unauthorized",
            json!({"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]}).to_string(),
        )
    } else {
        let jwt = sign(s, account.as_deref().unwrap_or(""), &scopes);
        let now = chrono_like_now();
        (
            "200 OK",
            json!({"token": jwt, "access_token": jwt, "expires_in": 300, "issued_at": now})
                .to_string(),
        )
    };
    let mut conn = conn;
    let extra = if status.starts_with("401") {
        "WWW-Authenticate: Basic realm=\"token\"\r\n"
    } else {
        ""
    };
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
        body.len()
    )?;
    conn.flush()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// RFC 3339 UTC timestamp without a date library.
fn chrono_like_now() -> String {
    let secs = unix_now();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `repository:NAME:ACTIONS` (NAME may contain `:` for a port) → an access entry granting the
/// requested pull/push actions.
fn access_entry(scope: &str) -> Option<serde_json::Value> {
    let (typ, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    let actions: Vec<&str> = actions
        .split(',')
        .filter(|a| matches!(*a, "pull" | "push" | "*"))
        .collect();
    Some(json!({"type": typ, "name": name, "actions": actions}))
}

fn sign(s: &Shared, subject: &str, scopes: &[String]) -> String {
    let now = unix_now();
    let header = json!({"alg": "RS256", "typ": "JWT", "x5c": [s.cert_b64]});
    let access: Vec<serde_json::Value> = scopes.iter().filter_map(|sc| access_entry(sc)).collect();
    let claims = json!({
        "iss": ISSUER,
        "sub": subject,
        "aud": SERVICE,
        "exp": now + 300,
        "nbf": now - 30,
        "iat": now - 30,
        "jti": super::nonce(),
        "access": access,
    });
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut child = tools::command("openssl")
        .args(["dgst", "-sha256", "-binary", "-sign"])
        .arg(&s.key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl dgst");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .expect("write signing input");
    let out = child.wait_with_output().expect("openssl dgst output");
    assert!(
        out.status.success(),
        "openssl dgst -sign failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(&out.stdout))
}
