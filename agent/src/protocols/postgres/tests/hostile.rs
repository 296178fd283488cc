//! Hostile input: lengths out of bounds, startup packets that are not PostgreSQL, encryption,
//! cancel requests, garbage.

use super::*;

#[test]
fn hostile_length_fields_lose_sync_without_allocating() {
    let chunks = load(PSQL_SSL_PREFER);
    let query_at = from_chunk_containing(&chunks, b"SELECT current_user", 0);
    for bad in [
        b"Q\xff\xff\xff\xff".to_vec(),           // -1
        b"Q\x80\x00\x00\x00SELECT".to_vec(),     // negative
        b"Q\x00\x00\x00\x02".to_vec(),           // below 4
        b"Q\x40\x00\x00\x01SELECT 1\0".to_vec(), // above 1 GiB
        b"S\x00\x00\x00\x05x".to_vec(),          // Sync has no body
        b"Z\x00\x00\x00\x05I".to_vec(),          // a backend message from the client
    ] {
        let mut segs = segments(&chunks[..query_at], usize::MAX);
        segs.push(seg_of(true, 1000, &bad));
        let later = segments(&chunks[query_at..], usize::MAX);
        segs.extend(later.into_iter().map(|mut s| {
            s.ts += 2000;
            s
        }));
        let r = run(&segs, Role::Client, Some(Role::Client));
        let bad_report = r.reports[query_at];
        assert!(bad_report.lost_sync, "{bad:?}");
        let hostile = bad[0] == b'Q';
        assert_eq!(bad_report.hostile_length, hostile, "{bad:?}");
        // The next message boundary brings it back.
        expect(
            &r.out,
            &["Complete SELECT q=\"SELECT current_user\" tag=\"SELECT 1\" rows=1 dr=1"],
        );
        assert!(r.reports[query_at + 1].resynced, "{bad:?}");
        assert_eq!(r.stream.state(), PgStreamState::Postgres);
    }
    // Backend side: a DataRow claiming 2 GiB.
    let segs = vec![
        seg_of(true, 10, STARTUP),
        seg_of(false, 20, AUTH_OK_READY),
        seg_of(true, 30, &msg(b'Q', b"SELECT 1\0")),
        seg_of(false, 40, b"D\x7f\xff\xff\xff\x00\x01"),
    ];
    let r = run(&segs, Role::Server, Some(Role::Server));
    assert!(r.reports[3].hostile_length && r.reports[3].lost_sync);
    expect(&r.out, &["ConnectionClosed SELECT q=\"SELECT 1\""]);
}

#[test]
fn hostile_startup_is_not_postgres() {
    for first in [
        b"\x00\x00\x00\x03".to_vec(),
        b"\xff\xff\xff\xff\x00\x03\x00\x00".to_vec(),
        b"\x00\x01\x00\x00\x00\x03\x00\x00user\0".to_vec(),
        b"\x00\x00\x00\x10\x00\x02\x00\x00user\0x\0\0\0".to_vec(),
        b"\x00\x00\x00\x09\x04\xd2\x16\x2f\x00".to_vec(),
    ] {
        let mut r = Replay::new(Some(Role::Server));
        r.feed(Role::Server, &seg_of(true, 10, &first));
        assert_eq!(r.stream.state(), PgStreamState::NotPostgres, "{first:?}");
        assert!(r.reports[0].became_not_postgres);
        // Ignored from now on.
        r.feed(Role::Server, &seg_of(true, 20, STARTUP));
        assert_eq!(r.reports[1], PgFeedReport::default());
    }
}

#[test]
fn tls_after_ssl_accepted_is_encrypted_and_ignored() {
    let client_hello: &[u8] =
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x8e\x1a\x5c\x92\x07\x3b\x41\x9d";
    let server_hello: &[u8] = b"\x16\x03\x03\x00\x7a\x02\x00\x00\x76\x03\x03\x5d\x2e\x61\x0a";
    let app_data: &[u8] = b"\x17\x03\x03\x00\x35\xa1\x9f\x42\x0e\x77\x81\x2c\xd3\x5b\x00\x10";
    for role in [Role::Client, Role::Server] {
        let segs = vec![
            seg_of(true, 10, SSL_REQUEST),
            seg_of(false, 20, b"S"),
            seg_of(true, 30, client_hello),
            seg_of(false, 40, server_hello),
            seg_of(true, 50, app_data),
            seg_of(false, 60, app_data),
        ];
        let r = run(&segs, role, Some(role));
        assert_eq!(r.stream.state(), PgStreamState::Encrypted);
        assert!(r.reports[0].became_postgres);
        assert_eq!(r.reports.iter().filter(|r| r.became_encrypted).count(), 1);
        assert!(r.reports[1].became_encrypted);
        assert!(r.reports[2..].iter().all(|r| *r == PgFeedReport::default()));
        assert!(r.out.is_empty());
    }
    // GSSAPI encryption accepted: same.
    let r = run(
        &[
            seg_of(true, 10, GSSENC_REQUEST),
            seg_of(false, 20, b"G"),
            seg_of(true, 30, app_data),
        ],
        Role::Client,
        Some(Role::Client),
    );
    assert_eq!(r.stream.state(), PgStreamState::Encrypted);
}

#[test]
fn gssenc_refused_then_ssl_refused_then_startup() {
    // libpq with gssencmode=prefer and sslmode=prefer against a server offering neither.
    let segs = vec![
        seg_of(true, 10, GSSENC_REQUEST),
        seg_of(false, 20, b"N"),
        seg_of(true, 30, SSL_REQUEST),
        seg_of(false, 40, b"N"),
        seg_of(true, 50, STARTUP),
        seg_of(false, 60, AUTH_OK_READY),
        seg_of(true, 70, &msg(b'Q', b"SELECT 1\0")),
        seg_of(
            false,
            80,
            &cat(&[&msg(b'C', b"SELECT 1\0"), &msg(b'Z', b"I")]),
        ),
    ];
    let r = run(&segs, Role::Server, Some(Role::Server));
    expect(
        &r.out,
        &["Complete SELECT q=\"SELECT 1\" tag=\"SELECT 1\" rows=1"],
    );
    assert_eq!(r.out[0].user.as_deref(), Some("postgres"));
    assert_eq!(r.out[0].role, Role::Server);
}

#[test]
fn cancel_request_connection() {
    let cancel = b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x72\x15\x5d\x07\xb0\xba";
    let mut r = Replay::new(Some(Role::Client));
    r.feed(Role::Client, &seg_of(true, 10, cancel));
    assert!(r.reports[0].cancel_request && r.reports[0].became_postgres);
    r.stream.close(20, &mut r.out);
    assert!(r.out.is_empty());
    assert!(looks_like_postgres(cancel, Direction::Egress));
}

#[test]
fn garbage_is_not_postgres() {
    // A fresh connection whose client speaks HTTP.
    let mut r = Replay::new(Some(Role::Client));
    r.feed(
        Role::Client,
        &seg_of(true, 10, b"GET / HTTP/1.1\r\nHost: db\r\n\r\n"),
    );
    assert_eq!(r.stream.state(), PgStreamState::NotPostgres);
    assert!(r.reports[0].became_not_postgres);
    // A fresh connection whose server speaks first (SSH, SMTP, MySQL…).
    let mut r = Replay::new(Some(Role::Client));
    r.feed(
        Role::Client,
        &seg_of(false, 10, b"SSH-2.0-OpenSSH_9.2p1\r\n"),
    );
    assert_eq!(r.stream.state(), PgStreamState::NotPostgres);
    // Picked up mid-stream: pseudo-random bytes in both directions give up after the budget.
    let mut r = Replay::new(None);
    let mut x: u32 = 0x1234_5678;
    for i in 0..PICKUP_DETECT_SEGMENTS {
        let data: Vec<u8> = (0..200)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        r.feed(Role::Client, &seg_of(i % 2 == 0, u64::from(i), &data));
    }
    assert_eq!(r.stream.state(), PgStreamState::NotPostgres);
    assert_eq!(
        r.reports.iter().filter(|r| r.became_not_postgres).count(),
        1
    );
    r.stream.close(1000, &mut r.out);
    assert!(r.out.is_empty());
}
