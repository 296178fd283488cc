//! The connection as a whole: the role learnt from the first request, connections picked up
//! mid-stream, and what is not HTTP/1 (TLS, PostgreSQL, noise, upgrades).

use super::fixtures::*;
use super::*;

// ---- role detection, mid-stream pickup ----

#[test]
fn role_detected_from_first_request() {
    let mut c = Conn::new(None);
    assert_eq!(c.s.state(), StreamState::Detecting);
    c.send(IN, 1, CURL_GET_ROOT);
    assert_eq!(
        (c.s.role(), c.s.state()),
        (Some(Role::Server), StreamState::Http)
    );
    c.send(OUT, 2, NGINX_200);
    assert_eq!(c.out[0].role, Role::Server);

    let mut c = Conn::new(None);
    c.send(OUT, 1, CURL_GET_ROOT);
    assert_eq!(c.s.role(), Some(Role::Client));
    c.send(IN, 2, NGINX_200);
    assert_eq!(
        summary(&c.out[0]),
        s("GET", "/", Some(200), 0, 45, Complete)
    );
    assert_eq!(c.out[0].role, Role::Client);
}

#[test]
fn mid_stream_pickup() {
    // Agent started while a server was receiving an upload and answering it.
    let mut c = Conn::new(None);
    c.send(IN, 1, br#"3,"qty":4},{"id":4,"qty":1}]}"#);
    c.feed(partial(IN, 2, 60_000, &[0x00, 0x13, 0x77, 0xfe]));
    c.send(OUT, 3, NGINX_201); // answers a request we never saw
    assert_eq!(c.s.state(), StreamState::Detecting);
    assert_eq!(c.s.role(), None);
    c.send(IN, 4, CURL_GET_A);
    assert_eq!(
        (c.s.role(), c.s.state()),
        (Some(Role::Server), StreamState::Http)
    );
    c.send(OUT, 5, NGINX_200);
    c.send(IN, 6, CURL_HEAD);
    c.send(OUT, 7, NGINX_HEAD_200);
    let got: Vec<_> = c.out.iter().map(summary).collect();
    assert_eq!(
        got,
        [
            s("GET", "/a", Some(200), 0, 45, Complete),
            s("HEAD", "/", Some(200), 0, 0, Complete)
        ]
    );
    assert_eq!(c.count(|r| r.became_not_http || r.resynced), 0);

    // Picked up in the middle of a response body on the client side: the response's
    // remaining bytes are skipped, the next request/response pair is parsed.
    let mut c = Conn::new(None);
    c.send(IN, 1, b"</html>\n");
    c.send(OUT, 2, CURL_GET_B);
    c.send(IN, 3, NGINX_200);
    assert_eq!(
        summary(&c.out[0]),
        s("GET", "/b?x=1&y=2", Some(200), 0, 45, Complete)
    );
    assert_eq!(c.out[0].role, Role::Client);
}

#[test]
fn hinted_role_with_response_side_start() {
    // A status line on the response side also proves HTTP once the role is known.
    let mut c = Conn::new(Some(Role::Server));
    c.send(OUT, 1, NGINX_204);
    assert_eq!(c.s.state(), StreamState::Http);
    c.send(IN, 2, CURL_GET_ROOT);
    c.send(OUT, 3, NGINX_200);
    assert_eq!(
        summary(&c.out[0]),
        s("GET", "/", Some(200), 0, 45, Complete)
    );
}

// ---- not HTTP ----

fn assert_not_http(c: &Conn) {
    assert!(c.out.is_empty());
    assert!(matches!(
        c.s.state(),
        StreamState::NotHttp | StreamState::Detecting
    ));
    assert!(c.count(|r| r.became_not_http) <= 1);
}

#[test]
fn tls_is_not_http() {
    for hint in [Some(Role::Client), Some(Role::Server), None] {
        let mut c = Conn::new(hint);
        c.send(OUT, 1, TLS_CLIENT_HELLO);
        c.send(IN, 2, TLS_SERVER_HELLO);
        for i in 0..10 {
            c.send(OUT, 3 + 2 * i, TLS_APP_DATA);
            c.send(IN, 4 + 2 * i, TLS_APP_DATA);
        }
        if hint.is_some() {
            // Even something HTTP-looking is ignored once classified.
            c.send(OUT, 50, CURL_GET_ROOT);
            c.send(IN, 51, NGINX_200);
        }
        c.close(52);
        if hint.is_some() {
            assert_eq!(c.s.state(), StreamState::NotHttp);
            assert_eq!(c.count(|r| r.became_not_http), 1);
        }
        assert_not_http(&c);
    }
}

#[test]
fn postgres_is_not_http() {
    for hint in [Some(Role::Client), None] {
        let mut c = Conn::new(hint);
        c.send(OUT, 1, PG_SSL_REQUEST);
        c.send(IN, 2, b"N");
        c.send(OUT, 3, PG_STARTUP);
        c.send(IN, 4, PG_AUTH_OK);
        c.send(OUT, 5, b"Q\x00\x00\x00\x0dSELECT 1\x00");
        c.close(6);
        if hint.is_some() {
            assert_eq!(c.s.state(), StreamState::NotHttp);
        }
        assert_not_http(&c);
    }
}

#[test]
fn random_bytes_are_not_http() {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for hint in [Some(Role::Server), Some(Role::Client), None] {
        let mut c = Conn::new(hint);
        for i in 0..40u64 {
            let data: Vec<u8> = (0..(next() % 300)).map(|_| next() as u8).collect();
            let dir = if next() % 2 == 0 { IN } else { OUT };
            c.feed(partial(dir, i, data.len() as u64 + next() % 50, &data));
        }
        c.close(99);
        assert_not_http(&c);
    }
    // Text that is not HTTP (SMTP greeting and commands).
    let mut c = Conn::new(Some(Role::Client));
    c.send(
        IN,
        1,
        b"220 mail.example.com ESMTP Postfix (Debian/GNU)\r\n",
    );
    c.send(OUT, 2, b"EHLO client.example.com\r\n");
    c.send(
        IN,
        3,
        b"250-mail.example.com\r\n250-PIPELINING\r\n250 SIZE 10240000\r\n",
    );
    c.send(OUT, 4, b"QUIT\r\n");
    assert_eq!(c.s.state(), StreamState::NotHttp);
    assert_not_http(&c);
}

#[test]
fn not_http_after_eight_kib_of_garbage() {
    let mut c = Conn::new(Some(Role::Server));
    let r = c.feed(partial(IN, 1, 20_000, &[0xffu8; 9000]));
    assert!(r.became_not_http);
    assert_eq!(c.s.state(), StreamState::NotHttp);
}

#[test]
fn upgrade_leaves_http() {
    let req = b"GET /chat HTTP/1.1\r\n\
Host: localhost:3000\r\n\
Upgrade: websocket\r\n\
Connection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Version: 13\r\n\
\r\n";
    let resp = b"HTTP/1.1 101 Switching Protocols\r\n\
Upgrade: websocket\r\n\
Connection: Upgrade\r\n\
Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
\r\n\
\x81\x05hello";
    let mut c = Conn::new(Some(Role::Server));
    c.send(IN, 1, req);
    c.send(OUT, 2, resp);
    assert_eq!(
        summary(&c.out[0]),
        s("GET", "/chat", Some(101), 0, 0, Complete)
    );
    assert_eq!(c.s.state(), StreamState::NotHttp);
    c.send(IN, 3, b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58");
    c.close(4);
    assert_eq!(c.out.len(), 1);
    assert_eq!(
        c.count(|r| r.became_not_http),
        0,
        "an upgrade is not a misclassification"
    );
}

// ---- idle connections ----

/// Between exchanges an idle connection's empty buffers go back (a head split over two reads
/// left one behind), and its next exchange, also split, is read as before.
#[test]
fn an_idle_connection_gives_back_its_buffers_and_reads_on() {
    let mut c = Conn::new(Some(Role::Server));
    let (first, rest) = CURL_GET_ROOT.split_at(10);
    for _ in 0..2 {
        c.send(IN, 1, first);
        c.send(IN, 2, rest);
        c.send(OUT, 3, NGINX_200);
        assert!(c.s.idle());
        assert!(c.s.pending.capacity() > 0);
        assert!(c.s.readers.iter().any(|r| r.head.capacity() > 0));
        c.s.release_idle_buffers();
        assert_eq!(c.s.pending.capacity(), 0);
        assert!(c.s.readers.iter().all(|r| r.head.capacity() == 0));
    }
    let got: Vec<Summary> = c.out.iter().map(summary).collect();
    assert_eq!(got, vec![s("GET", "/", Some(200), 0, 45, Complete); 2]);
}

/// A request still waiting for its answer is kept.
#[test]
fn a_waiting_request_is_not_given_back() {
    let mut c = Conn::new(Some(Role::Server));
    c.send(IN, 1, CURL_GET_ROOT);
    c.s.release_idle_buffers();
    c.send(OUT, 2, NGINX_200);
    assert_eq!(
        c.out.iter().map(summary).collect::<Vec<_>>(),
        vec![s("GET", "/", Some(200), 0, 45, Complete)]
    );
}
