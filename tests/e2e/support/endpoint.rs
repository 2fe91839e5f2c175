//! Small fakes of cloud credential endpoints (OAuth2 token endpoints, metadata servers, ACR's
//! exchange): one request per connection, answered by a closure, every request kept.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};

use super::serve::LoopbackServer;

#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    /// Lower-cased names.
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// The body as `application/x-www-form-urlencoded` fields.
    pub fn form(&self) -> HashMap<String, String> {
        url::form_urlencoded::parse(&self.body)
            .into_owned()
            .collect()
    }
}

/// Reads one HTTP/1.1 request (headers and a Content-Length body).
pub fn read_request(conn: &TcpStream) -> std::io::Result<Request> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    Ok(Request {
        method,
        target,
        headers,
        body,
    })
}

pub struct Endpoint {
    pub port: u16,
    requests: Arc<Mutex<Vec<Request>>>,
    _server: LoopbackServer,
}

impl Endpoint {
    /// Serves every request with `answer(request) -> (status, JSON or text body)`.
    pub fn start(
        name: &str,
        answer: impl Fn(&Request) -> (u16, String) + Send + Sync + 'static,
    ) -> Endpoint {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        let server = LoopbackServer::start(name, move |mut conn| {
            let Ok(req) = read_request(&conn) else { return };
            let (status, body) = answer(&req);
            seen.lock().unwrap().push(req);
            let _ = write!(
                conn,
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.flush();
        });
        Endpoint {
            port: server.port,
            requests,
            _server: server,
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}
