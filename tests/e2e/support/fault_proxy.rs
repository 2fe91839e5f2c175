//! A misbehaving upstream: an HTTP proxy in front of a real [`Registry`] that relays every
//! answer as is, except that blob bodies can be corrupted or cut off, so tests can check what
//! dockside does with bad upstream answers.
//!
//! Deliberately small: one thread and one upstream connection per client connection, one request
//! per connection (`Connection: close` both ways), no request bodies beyond a `Content-Length`
//! one. That is all dockside's upstream client (reqwest) needs for GET/HEAD.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::registry::Registry;
use super::serve::LoopbackServer;

/// How blob GETs (`/v2/<name>/blobs/sha256:...` answered 200) are relayed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Honest,
    /// The right length and headers, but one byte in the middle flipped.
    Corrupt,
    /// The right headers (full Content-Length), then the connection closes after this many bytes.
    CutAfter(usize),
    /// `CutAfter` for the next blob GET only; then honest, Range requests included.
    CutOnce(usize),
    /// The next blob GET sends this many body bytes, then nothing more while the connection
    /// stays open (a slow or stuck upstream), until the client gives up; then honest.
    StallOnce(usize),
    /// The next `times` requests of any kind are answered with `status` (and `Retry-After`
    /// when given) without reaching the registry; then honest.
    Fail {
        status: u16,
        times: usize,
        retry_after: Option<u64>,
    },
    /// The next `times` connections are closed without an answer; then honest.
    Reset {
        times: usize,
    },
}

/// One request the proxy received.
#[derive(Clone, Debug)]
pub struct Logged {
    pub method: String,
    /// Path without the query.
    pub path: String,
    pub range: Option<String>,
    /// The mode it was answered in.
    pub mode: Mode,
}

struct Shared {
    upstream: String,
    mode: Mutex<Mode>,
    requests: Mutex<Vec<Logged>>,
    /// Response body bytes sent to clients, all requests together.
    body_bytes: std::sync::atomic::AtomicU64,
}

pub struct FaultProxy {
    pub port: u16,
    shared: Arc<Shared>,
    _server: LoopbackServer,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `reg` (which must outlive the proxy's use).
    pub fn start(reg: &Registry, mode: Mode) -> FaultProxy {
        FaultProxy::to_host(reg.host(), mode)
    }

    /// The same in front of any plain-HTTP server at `host` (`127.0.0.1:PORT`).
    pub fn to_host(host: String, mode: Mode) -> FaultProxy {
        let shared = Arc::new(Shared {
            upstream: host,
            mode: Mutex::new(mode),
            requests: Mutex::new(Vec::new()),
            body_bytes: Default::default(),
        });
        let s = shared.clone();
        let server = LoopbackServer::start("fault proxy", move |conn| {
            if let Err(e) = relay(conn, &s) {
                eprintln!("fault proxy: {e}");
            }
        });
        FaultProxy {
            port: server.port,
            shared,
            _server: server,
        }
    }

    /// `http://127.0.0.1:PORT`, the URL to give dockside as the upstream.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Applies to requests that arrive from now on.
    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = mode;
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Logged> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// Response body bytes relayed so far (what the registry served through the proxy).
    pub fn body_bytes(&self) -> u64 {
        self.shared
            .body_bytes
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// GETs of blob `digest` so far.
    pub fn blob_gets(&self, digest: &str) -> Vec<Logged> {
        let suffix = format!("/blobs/{digest}");
        self.requests()
            .into_iter()
            .filter(|r| r.method == "GET" && r.path.ends_with(&suffix))
            .collect()
    }
}

/// The first line of a request or response, and its headers.
type Head = (String, Vec<(String, String)>);

/// Reads a request or response head (without CRLFs); `None` at a clean end of the stream.
fn read_head(r: &mut impl BufRead) -> std::io::Result<Option<Head>> {
    let mut first = String::new();
    if r.read_line(&mut first)? == 0 {
        return Ok(None);
    }
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    Ok(Some((first.trim_end().to_string(), headers)))
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Writes `first` and `headers` minus hop-by-hop ones, plus `Connection: close`.
fn write_head(
    w: &mut impl Write,
    first: &str,
    headers: &[(String, String)],
) -> std::io::Result<()> {
    let mut head = format!("{first}\r\n");
    for (k, v) in headers {
        let hop = ["connection", "keep-alive", "proxy-connection"]
            .iter()
            .any(|h| k.eq_ignore_ascii_case(h));
        if !hop {
            head += &format!("{k}: {v}\r\n");
        }
    }
    head += "Connection: close\r\n\r\n";
    w.write_all(head.as_bytes())
}

fn is_blob_path(path: &str) -> bool {
    path.starts_with("/v2/")
        && path
            .rsplit_once("/blobs/")
            .is_some_and(|(_, d)| d.starts_with("sha256:") && !d.contains('/'))
}

/// The mode for this request, counting down the modes that apply a number of times.
fn take_mode(s: &Shared, blob_get: bool) -> Mode {
    let mut mode = s.mode.lock().unwrap();
    let now = *mode;
    *mode = match now {
        Mode::CutOnce(_) | Mode::StallOnce(_) if blob_get => Mode::Honest,
        Mode::Fail { times, .. } | Mode::Reset { times } if times <= 1 => Mode::Honest,
        Mode::Fail {
            status,
            times,
            retry_after,
        } => Mode::Fail {
            status,
            times: times - 1,
            retry_after,
        },
        Mode::Reset { times } => Mode::Reset { times: times - 1 },
        other => other,
    };
    now
}

/// Serves one request of `client` through a fresh connection to the registry.
fn relay(client: TcpStream, s: &Shared) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut from_client = BufReader::new(client.try_clone()?);
    let mut to_client = client;
    let Some((request_line, mut req_headers)) = read_head(&mut from_client)? else {
        return Ok(()); // connected and closed (also the wake-up on drop)
    };
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("");
    let path = target.split('?').next().unwrap_or("").to_string();
    let mode = take_mode(s, method == "GET" && is_blob_path(&path));
    let range = header(&req_headers, "range").map(str::to_string);
    s.requests.lock().unwrap().push(Logged {
        method: method.clone(),
        path: path.clone(),
        range: range.clone(),
        mode,
    });
    match mode {
        Mode::Reset { .. } => {
            let _ = to_client.shutdown(Shutdown::Both);
            return Ok(());
        }
        Mode::Fail {
            status,
            retry_after,
            ..
        } => {
            let mut head = format!("HTTP/1.1 {status} Injected\r\nContent-Length: 0\r\n");
            if let Some(secs) = retry_after {
                head += &format!("Retry-After: {secs}\r\n");
            }
            head += "Connection: close\r\n\r\n";
            to_client.write_all(head.as_bytes())?;
            let _ = to_client.shutdown(Shutdown::Write);
            return Ok(());
        }
        _ => {}
    }
    let faulty_blob_get = method == "GET"
        && is_blob_path(&path)
        && matches!(
            mode,
            Mode::Corrupt | Mode::CutAfter(_) | Mode::CutOnce(_) | Mode::StallOnce(_)
        );
    if faulty_blob_get && !matches!(mode, Mode::CutOnce(_) | Mode::StallOnce(_)) {
        // Like a server that ignores Range: a faulty upstream answers every blob GET in full
        // (and faultily), so resuming with Range cannot get around the fault.
        req_headers.retain(|(k, _)| !k.eq_ignore_ascii_case("range"));
    }

    let upstream = TcpStream::connect(&s.upstream)?;
    upstream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut to_upstream = upstream.try_clone()?;
    write_head(&mut to_upstream, &request_line, &req_headers)?;
    let req_len: u64 = header(&req_headers, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if req_len > 0 {
        std::io::copy(&mut (&mut from_client).take(req_len), &mut to_upstream)?;
    }
    to_upstream.flush()?;

    let mut from_upstream = BufReader::new(upstream);
    let Some((status_line, resp_headers)) = read_head(&mut from_upstream)? else {
        return Err(std::io::Error::other(format!(
            "no answer from the registry to {request_line}"
        )));
    };
    let status = status_line.split_whitespace().nth(1).unwrap_or("");
    let body_len: Option<usize> =
        header(&resp_headers, "content-length").and_then(|v| v.parse().ok());
    write_head(&mut to_client, &status_line, &resp_headers)?;

    match (faulty_blob_get && status == "200", body_len, mode) {
        (true, Some(len), Mode::Corrupt) => {
            let mut body = vec![0; len];
            from_upstream.read_exact(&mut body)?;
            if let Some(b) = body.get_mut(len / 2) {
                *b ^= 0xff;
            }
            to_client.write_all(&body)?;
        }
        (true, Some(_), Mode::CutAfter(n) | Mode::CutOnce(n)) => {
            std::io::copy(&mut (&mut from_upstream).take(n as u64), &mut to_client)?;
            to_client.flush()?;
            // Drop the connection mid-body.
            let _ = to_client.shutdown(Shutdown::Both);
            return Ok(());
        }
        (true, Some(_), Mode::StallOnce(n)) => {
            let sent = std::io::copy(&mut (&mut from_upstream).take(n as u64), &mut to_client)?;
            s.body_bytes
                .fetch_add(sent, std::sync::atomic::Ordering::SeqCst);
            to_client.flush()?;
            // Hold the connection open, sending nothing, until the client closes it.
            let mut byte = [0u8; 1];
            while matches!(from_client.read(&mut byte), Ok(n) if n > 0) {}
            return Ok(());
        }
        // Everything else as is; the registry closes after the answer (`Connection: close`).
        _ => {
            let sent = std::io::copy(&mut from_upstream, &mut to_client)?;
            s.body_bytes
                .fetch_add(sent, std::sync::atomic::Ordering::SeqCst);
        }
    }
    to_client.flush()?;
    let _ = to_client.shutdown(Shutdown::Write);
    Ok(())
}
