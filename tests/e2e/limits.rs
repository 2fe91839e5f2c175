//! `limits:` against raw sockets: an oversized header gets a 400 and a closed connection, a
//! header sent a byte at a time is cut off by `header_timeout`, an idle kept-alive connection is
//! closed by `idle_timeout`, a client that stops reading a blob is cut off by `send_timeout`,
//! and connections beyond `max_connections` are closed at once. Each is told apart by what the
//! client sees and by `dockside_client_timeouts_total`'s reason, not by a clock: every wait here
//! is bounded far below pingora's own 60 s defaults.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::support::dockside::{Config, Dockside, Upstream};
use crate::support::http;
use crate::support::image::{Format, Image};
use crate::support::registry::{Auth, Registry};
use crate::support::{skopeo, wait_for};

fn start(limits: &str) -> (Registry, Dockside) {
    let reg = Registry::start(Auth::None);
    let d = Dockside::start(&Config {
        extra_yaml: format!("limits: {limits}\n"),
        ..Config::new(vec![Upstream::hub(&reg)])
    });
    (reg, d)
}

fn connect(d: &Dockside) -> TcpStream {
    let conn = TcpStream::connect(d.host()).expect("connect to dockside");
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    conn
}

/// Reads until dockside closes the connection (EOF or reset); panics if it is still open after
/// `within`. Returns what was read.
fn read_until_closed(conn: &mut TcpStream, within: Duration) -> Vec<u8> {
    conn.set_read_timeout(Some(within)).unwrap();
    let mut all = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return all,
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!(
                    "connection still open after {within:?}; read {} bytes",
                    all.len()
                )
            }
            Err(_) => return all, // reset: closed too
        }
    }
}

/// Sends one keep-alive GET and reads its response (a Content-Length body).
fn get_keep_alive(conn: &mut TcpStream, d: &Dockside, path: &str) -> String {
    write!(conn, "GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", d.host()).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = conn.read(&mut buf).expect("read response");
        assert!(
            n > 0,
            "closed mid-response: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            continue;
        };
        let len: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")?
                    .trim()
                    .parse()
                    .ok()
            })
            .expect("Content-Length");
        if body.len() >= len {
            return text;
        }
    }
}

#[test]
fn an_oversized_request_header_gets_400_and_the_connection_closes() {
    let (_reg, d) = start("{}");
    // pingora refuses a header past 1 MiB - 1 bytes. Exactly 1 MiB with no end of header:
    // dockside reads every byte before refusing, so its answer cannot be lost to a reset.
    let mut conn = connect(&d);
    let mut head = format!("GET /v2/ HTTP/1.1\r\nHost: {}\r\nX-Pad: ", d.host()).into_bytes();
    head.resize(1 << 20, b'a');
    conn.write_all(&head).unwrap();
    let answer = String::from_utf8_lossy(&read_until_closed(&mut conn, Duration::from_secs(10)))
        .into_owned();
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer:?}");

    // A large header within the limit is served.
    let pad = "a".repeat(256 * 1024);
    let r = http::request("GET", &format!("{}/v2/", d.url()), &[("X-Pad", &pad)], None).unwrap();
    assert_eq!(r.status, 200);
}

#[test]
fn a_request_header_sent_a_byte_at_a_time_is_cut_off_after_header_timeout() {
    // Left to pingora, every byte would restart a 60 s wait.
    let (_reg, d) = start("{header_timeout: 2s, idle_timeout: 30s}");
    let mut conn = connect(&d);
    conn.write_all(b"GET /v2/ HTTP/1.1\r\nHost: slow\r\n")
        .unwrap();
    let mut reader = conn.try_clone().unwrap();
    let closed =
        std::thread::spawn(move || read_until_closed(&mut reader, Duration::from_secs(30)));
    // A trickle, one header byte every 200 ms (the slow client under test, not a wait): the
    // header never ends, and each byte would restart pingora's own read timeout.
    for byte in b"X-Slow: 1\r\n".iter().cycle() {
        if closed.is_finished() || conn.write_all(&[*byte]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let answer = closed.join().unwrap();
    assert!(
        !answer.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(
        d.metric("dockside_client_timeouts_total{reason=\"header_timeout\"}"),
        Some(1.0)
    );
}

#[test]
fn an_idle_kept_alive_connection_is_closed_after_idle_timeout() {
    // Left to pingora, 60 s.
    let (_reg, d) = start("{header_timeout: 30s, idle_timeout: 2s}");
    let mut conn = connect(&d);
    for _ in 0..2 {
        let answer = get_keep_alive(&mut conn, &d, "/v2/");
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer:?}");
    }
    // Closed with nothing more sent, well before header_timeout (30 s) or pingora's 60 s.
    let rest = read_until_closed(&mut conn, Duration::from_secs(20));
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    assert_eq!(
        d.metric("dockside_client_timeouts_total{reason=\"header_timeout\"}")
            .unwrap_or(0.0),
        0.0,
        "an idle connection is not a slow header"
    );
}

#[test]
fn a_client_that_stops_reading_a_blob_is_cut_off_after_send_timeout() {
    let (reg, d) = start("{send_timeout: 2s}");
    let img = Image::generate(62, &[32 << 20], Format::Oci);
    skopeo::push(&reg, "library/big", "v1", &img);
    let layer = &img.layers[0];
    let path = format!("/v2/big/blobs/{}", layer.digest);
    // Cached first, so the only wait left is the client's.
    let (status, body) = http::get_outcome(&format!("{}{path}", d.url()));
    assert_eq!((status, body.map(|b| b.len())), (200, Ok(layer.data.len())));

    let mut conn = connect(&d);
    write!(conn, "GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", d.host()).unwrap();
    let mut first = [0u8; 1024];
    conn.read_exact(&mut first).unwrap();
    assert!(first.starts_with(b"HTTP/1.1 200 "));
    let timeouts = "dockside_client_timeouts_total{reason=\"send_timeout\"}";
    wait_for(
        "dockside to give up on the client",
        Duration::from_secs(20),
        || (d.metric(timeouts) == Some(1.0)).then_some(()),
    );
    // What the socket buffers held, then the end: never the whole blob.
    let rest = read_until_closed(&mut conn, Duration::from_secs(20));
    assert!(
        first.len() + rest.len() < layer.data.len(),
        "read {} of {} bytes",
        first.len() + rest.len(),
        layer.data.len()
    );
}

#[test]
fn connections_beyond_max_connections_are_closed_at_once() {
    let (_reg, d) = start("{max_connections: 3, header_timeout: 60s, idle_timeout: 60s}");
    let open = |n: f64| {
        wait_for(
            &format!("{n} open connections"),
            Duration::from_secs(10),
            || (d.metric("dockside_client_connections") == Some(n)).then_some(()),
        )
    };
    open(0.0); // the start-up checks' connections are gone
    let mut held: Vec<TcpStream> = (0..3).map(|_| connect(&d)).collect();
    open(3.0);

    // Closed unanswered, not left waiting for its header (header_timeout is 60 s here).
    let mut extra = connect(&d);
    let got = read_until_closed(&mut extra, Duration::from_secs(5));
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    assert_eq!(
        d.metric("dockside_client_connections_refused_total"),
        Some(1.0)
    );

    // The connections within the limit are served, and a closed one frees its slot.
    let answer = get_keep_alive(&mut held[0], &d, "/v2/");
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer:?}");
    drop(held.pop());
    open(2.0);
    let r = http::get(&format!("{}/v2/", d.url())).unwrap();
    assert_eq!(r.status, 200);
}
