//! A misbehaving upstream: a tiny registry that serves blobs honestly, with flipped bytes, or
//! cut off part-way, so tests can check what dockside does with bad upstream answers.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// How blob GETs are answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Honest,
    /// The right length and headers, but one byte in the middle flipped.
    Corrupt,
    /// The right headers (full Content-Length), then the connection closes after this many bytes.
    CutAfter(usize),
}

struct Shared {
    blobs: HashMap<String, Vec<u8>>,
    mode: Mutex<Mode>,
    /// (method, path, range header) of every request.
    requests: Mutex<Vec<(String, String, Option<String>)>>,
    stop: AtomicBool,
}

pub struct FakeUpstream {
    pub port: u16,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeUpstream {
    /// Serves `blobs` under any repository name.
    pub fn start(blobs: &[&[u8]], mode: Mode) -> FakeUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake upstream");
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            blobs: blobs
                .iter()
                .map(|b| (super::digest_of(b), b.to_vec()))
                .collect(),
            mode: Mutex::new(mode),
            requests: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let s = s.clone();
                std::thread::spawn(move || {
                    let _ = serve(conn, &s);
                });
            }
        });
        FakeUpstream {
            port,
            shared,
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = mode;
    }

    /// GETs of blob `digest` so far, with their Range headers.
    pub fn blob_gets(&self, digest: &str) -> Vec<Option<String>> {
        self.shared
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, p, _)| m == "GET" && p.ends_with(&format!("/blobs/{digest}")))
            .map(|(_, _, r)| r.clone())
            .collect()
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(conn: TcpStream, s: &Shared) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let target = parts.next().unwrap_or("").to_string();
        let mut range = None;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.trim().eq_ignore_ascii_case("range") {
                    range = Some(v.trim().to_string());
                }
            }
        }
        let path = target.split('?').next().unwrap_or("").to_string();
        s.requests
            .lock()
            .unwrap()
            .push((method.clone(), path.clone(), range.clone()));
        let mode = *s.mode.lock().unwrap();
        let head = method == "HEAD";

        if path == "/v2/" || path == "/v2" {
            write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
                if head { "" } else { "{}" }
            )?;
            continue;
        }
        let blob = path
            .rsplit_once("/blobs/")
            .and_then(|(_, d)| s.blobs.get(d).map(|b| (d.to_string(), b)));
        let Some((digest, data)) = blob else {
            let body = r#"{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}"#;
            write!(
                out,
                "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
                body.len(),
                if head { "" } else { body }
            )?;
            continue;
        };
        // Honest answers honour `Range: bytes=N-` (resumption); the others ignore it.
        let start = match (mode, range.as_deref()) {
            (Mode::Honest, Some(r)) => r
                .strip_prefix("bytes=")
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|n| *n < data.len()),
            _ => None,
        };
        let (status, body) = match start {
            Some(n) => ("206 Partial Content", &data[n..]),
            None => ("200 OK", &data[..]),
        };
        let mut hdr = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/octet-stream\r\nDocker-Content-Digest: {digest}\r\nContent-Length: {}\r\n",
            body.len()
        );
        if let Some(n) = start {
            hdr += &format!(
                "Content-Range: bytes {n}-{}/{}\r\n",
                data.len() - 1,
                data.len()
            );
        }
        hdr += "\r\n";
        out.write_all(hdr.as_bytes())?;
        if head {
            continue;
        }
        match mode {
            Mode::Honest => out.write_all(body)?,
            Mode::Corrupt => {
                let mut bad = body.to_vec();
                let mid = bad.len() / 2;
                bad[mid] ^= 0xff;
                out.write_all(&bad)?;
            }
            Mode::CutAfter(n) => {
                out.write_all(&body[..n.min(body.len())])?;
                out.flush()?;
                return Ok(()); // drop the connection mid-body
            }
        }
    }
}
