//! Protocol corners, hand-built from the protocol documentation.

use super::*;

fn session(role: Role, exchanges: &[(&[u8], &[u8])]) -> Replay {
    let mut segs = vec![seg_of(true, 10, STARTUP), seg_of(false, 20, AUTH_OK_READY)];
    for (i, (req, resp)) in exchanges.iter().enumerate() {
        let ts = 100 * (i as u64 + 1);
        if !req.is_empty() {
            segs.push(seg_of(true, ts, req));
        }
        if !resp.is_empty() {
            segs.push(seg_of(false, ts + 50, resp));
        }
    }
    run(&segs, role, Some(role))
}

#[test]
fn pipeline_error_skips_executes_sent_after_the_error() {
    let stmt = |text: &str| {
        cat(&[
            &msg(b'P', format!("\0{text}\0\0\0").as_bytes()),
            &msg(b'B', b"\0\0\0\0\0\0\0\0"),
            &msg(b'E', b"\0\0\0\0\0"),
        ])
    };
    let r = session(
        Role::Client,
        &[
            (
                &stmt("INSERT INTO a VALUES (1)"),
                &cat(&[
                    &msg(b'1', b""),
                    &msg(b'2', b""),
                    &msg(b'C', b"INSERT 0 1\0"),
                ]),
            ),
            (
                &stmt("INSERT INTO a VALUES (1)"),
                &cat(&[
                    &msg(b'1', b""),
                    &msg(b'2', b""),
                    &msg(b'E', b"SERROR\0VERROR\0C23505\0Mdup\0\0"),
                ]),
            ),
            // Sent after the error arrived: discarded by the server.
            (
                &cat(&[&stmt("DELETE FROM a"), &stmt("UPDATE a SET x = 1")]),
                b"",
            ),
            (&msg(b'S', b""), &msg(b'Z', b"I")),
            (
                &msg(b'Q', b"SELECT 1\0"),
                &cat(&[&msg(b'C', b"SELECT 1\0"), &msg(b'Z', b"I")]),
            ),
        ],
    );
    expect(
        &r.out,
        &[
            "Complete INSERT q=\"INSERT INTO a VALUES (1)\" tag=\"INSERT 0 1\" rows=1",
            "Complete INSERT q=\"INSERT INTO a VALUES (1)\" err=23505",
            "Skipped DELETE q=\"DELETE FROM a\"",
            "Skipped UPDATE q=\"UPDATE a SET x = 1\"",
            "Complete SELECT q=\"SELECT 1\" tag=\"SELECT 1\" rows=1",
        ],
    );
    assert_eq!((r.out[2].start_ns, r.out[2].end_ns), (300, 300));
}

#[test]
fn failed_parse_without_execute_is_reported() {
    let r = session(
        Role::Server,
        &[
            (
                &cat(&[&msg(b'P', b"s1\0SELEC 1\0\0\0"), &msg(b'S', b"")]),
                &cat(&[
                    &msg(
                        b'E',
                        b"SERROR\0VERROR\0C42601\0Msyntax error at or near \"SELEC\"\0\0",
                    ),
                    &msg(b'Z', b"I"),
                ]),
            ),
            // The failed statement does not exist: executing it fails too, text unknown.
            (
                &cat(&[
                    &msg(b'B', b"\0s1\0\0\0\0\0\0\0"),
                    &msg(b'E', b"\0\0\0\0\0"),
                    &msg(b'S', b""),
                ]),
                &cat(&[
                    &msg(
                        b'E',
                        b"SERROR\0VERROR\0C26000\0Mprepared statement \"s1\" does not exist\0\0",
                    ),
                    &msg(b'Z', b"I"),
                ]),
            ),
        ],
    );
    expect(
        &r.out,
        &[
            "Complete SELEC q=\"SELEC 1\" name=s1 err=42601",
            "Complete - q=None name=s1 err=26000",
        ],
    );
}

#[test]
fn close_and_named_portals() {
    let r = session(
        Role::Client,
        &[
            (
                &cat(&[
                    &msg(b'P', b"s\0SELECT x FROM t\0\0\0"),
                    &msg(b'B', b"cur\0s\0\0\0\0\0\0\0"),
                    &msg(b'E', b"cur\0\0\0\0\x02"),
                    &msg(b'H', b""),
                ]),
                &cat(&[
                    &msg(b'1', b""),
                    &msg(b'2', b""),
                    &msg(b'D', b"\0\x01\0\0\0\x011"),
                    &msg(b'D', b"\0\x01\0\0\0\x012"),
                    &msg(b's', b""),
                ]),
            ),
            (
                &cat(&[
                    &msg(b'E', b"cur\0\0\0\0\x02"),
                    &msg(b'C', b"Pcur\0"),
                    &msg(b'C', b"Ss\0"),
                    &msg(b'S', b""),
                ]),
                &cat(&[
                    &msg(b'D', b"\0\x01\0\0\0\x013"),
                    &msg(b'C', b"SELECT 1\0"),
                    &msg(b'3', b""),
                    &msg(b'3', b""),
                    &msg(b'Z', b"T"),
                ]),
            ),
            // Closed: executing the name again has no text.
            (
                &cat(&[
                    &msg(b'B', b"\0s\0\0\0\0\0\0\0"),
                    &msg(b'E', b"\0\0\0\0\0"),
                    &msg(b'S', b""),
                ]),
                &cat(&[
                    &msg(b'E', b"SERROR\0VERROR\0C26000\0Mgone\0\0"),
                    &msg(b'Z', b"E"),
                ]),
            ),
        ],
    );
    expect(
        &r.out,
        &[
            "Complete SELECT q=\"SELECT x FROM t\" name=s dr=2 suspended",
            "Complete SELECT q=\"SELECT x FROM t\" name=s tag=\"SELECT 1\" rows=1 dr=1",
            "Complete - q=None name=s err=26000",
        ],
    );
    assert_eq!(r.out[1].start_ns, 200);
}

#[test]
fn copy_both_and_copy_out_data_are_skipped() {
    let wal = vec![0x42; 3000];
    let r = session(
        Role::Client,
        &[
            (
                &msg(b'Q', b"START_REPLICATION SLOT s LOGICAL 0/0\0"),
                &cat(&[&msg(b'W', b"\0\0\0"), &msg(b'd', &wal), &msg(b'd', &wal)]),
            ),
            (&msg(b'd', b"r\0\0\0\0\0\0\0\0"), &msg(b'd', &wal)),
            (
                &msg(b'c', b""),
                &cat(&[&msg(b'c', b""), &msg(b'C', b"COPY 0\0"), &msg(b'Z', b"I")]),
            ),
        ],
    );
    expect(
        &r.out,
        &[
            "Complete START_REPLICATION q=\"START_REPLICATION SLOT s LOGICAL 0/0\" tag=\"COPY 0\" rows=0",
        ],
    );
    assert_eq!((r.out[0].start_ns, r.out[0].end_ns), (100, 350));
}

#[test]
fn notices_and_parameter_status_anywhere() {
    let notice = msg(b'N', b"SNOTICE\0VNOTICE\0C00000\0Mhi\0\0");
    let ps = msg(b'S', b"TimeZone\0UTC\0");
    let r = session(
        Role::Server,
        &[(
            &cat(&[
                &msg(b'P', b"\0SET TIME ZONE 'UTC'\0\0\0"),
                &msg(b'B', b"\0\0\0\0\0\0\0\0"),
                &msg(b'E', b"\0\0\0\0\0"),
                &msg(b'S', b""),
            ]),
            &cat(&[
                &notice,
                &msg(b'1', b""),
                &ps,
                &msg(b'2', b""),
                &notice,
                &msg(b'C', b"SET\0"),
                &ps,
                &msg(b'A', b"\0\0\0\x01ch\0x\0"),
                &msg(b'Z', b"I"),
            ]),
        )],
    );
    expect(
        &r.out,
        &["Complete SET q=\"SET TIME ZONE 'UTC'\" tag=\"SET\""],
    );
    assert!(!r.any(|r| r.unmatched_responses > 0));
}

#[test]
fn statement_cache_is_bounded_and_recent_names_resolve() {
    let n = STATEMENT_CACHE_ENTRIES + 300;
    let mut req = Vec::new();
    let mut resp = Vec::new();
    for i in 0..n {
        req.extend(msg(b'P', format!("s{i}\0SELECT {i}\0\0\0").as_bytes()));
        resp.extend(msg(b'1', b""));
    }
    req.extend(msg(b'S', b""));
    resp.extend(msg(b'Z', b"I"));
    let exec = |i: usize| {
        cat(&[
            &msg(b'B', format!("\0s{i}\0\0\0\0\0\0\0").as_bytes()),
            &msg(b'E', b"\0\0\0\0\0"),
            &msg(b'S', b""),
        ])
    };
    let done = cat(&[&msg(b'2', b""), &msg(b'C', b"SELECT 1\0"), &msg(b'Z', b"I")]);
    let r = session(
        Role::Client,
        &[(&req, &resp), (&exec(n - 1), &done), (&exec(0), &done)],
    );
    assert!(r.stream.statements.map.len() <= STATEMENT_CACHE_ENTRIES);
    expect(
        &r.out,
        &[
            &format!(
                "Complete SELECT q=\"SELECT {}\" name=s{} tag=\"SELECT 1\" rows=1",
                n - 1,
                n - 1
            ),
            // Evicted: executed with its name only.
            "Complete SELECT q=None name=s0 tag=\"SELECT 1\" rows=1",
        ],
    );
}

#[test]
fn connection_closed_mid_statement() {
    let r = session(
        Role::Client,
        &[(
            &msg(b'Q', b"SELECT pg_sleep(10); SELECT 2\0"),
            &msg(
                b'T',
                b"\0\x01x\0\0\0\0\0\0\0\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0",
            ),
        )],
    );
    expect(
        &r.out,
        &["ConnectionClosed SELECT q=\"SELECT pg_sleep(10)\""],
    );
    assert_eq!((r.out[0].start_ns, r.out[0].end_ns), (100, 150));
}

#[test]
fn pickup_learns_the_role_from_a_backend_only_message() {
    // A lone Sync could only be a frontend message, a lone ReadyForQuery only a backend one.
    let mut r = Replay::new(None);
    r.feed(Role::Server, &seg_of(false, 10, &msg(b'Z', b"I")));
    assert_eq!(r.stream.role(), Some(Role::Server));
    assert_eq!(r.stream.state(), PgStreamState::Postgres);
    r.feed(Role::Server, &seg_of(true, 20, &msg(b'Q', b"SELECT 1\0")));
    r.feed(
        Role::Server,
        &seg_of(
            false,
            30,
            &cat(&[&msg(b'C', b"SELECT 1\0"), &msg(b'Z', b"I")]),
        ),
    );
    expect(
        &r.out,
        &["Complete SELECT q=\"SELECT 1\" tag=\"SELECT 1\" rows=1"],
    );
    assert_eq!(r.out[0].database, None);
}

#[test]
fn long_texts_are_bounded_and_cut_on_character_boundaries() {
    // A 20 KB statement sent in 4 KB writes, fully captured: kept up to MAX_QUERY_BYTES.
    let text = format!("SELECT '{}'", "é".repeat(10_000));
    let q = msg(b'Q', format!("{text}\0").as_bytes());
    let mut segs = vec![seg_of(true, 10, STARTUP), seg_of(false, 20, AUTH_OK_READY)];
    for (i, part) in q.chunks(4096).enumerate() {
        segs.push(seg_of(true, 30 + i as u64, part));
    }
    segs.push(seg_of(
        false,
        90,
        &cat(&[&msg(b'C', b"SELECT 1\0"), &msg(b'Z', b"I")]),
    ));
    let r = run(&segs, Role::Client, Some(Role::Client));
    let s = &r.out[0];
    let kept = s.query.as_deref().expect("text");
    assert!(s.query_truncated && kept.len() <= MAX_QUERY_BYTES && kept.len() > MAX_QUERY_BYTES - 4);
    assert!(text.starts_with(kept));
    assert_eq!((s.start_ns, s.end_ns, s.rows), (30, 90, Some(1)));
    // The capture cuts inside a two-byte character: the partial character is dropped.
    let q = msg(b'Q', "SELECT 'aé'\0".as_bytes());
    let cut_at = q.iter().position(|&b| b == 0xc3).expect("é") + 1;
    let segs = vec![
        seg_of(true, 10, STARTUP),
        seg_of(false, 20, AUTH_OK_READY),
        Seg {
            frontend: true,
            ts: 30,
            len: q.len() as u64,
            data: q[..cut_at].to_vec(),
        },
        seg_of(
            false,
            40,
            &cat(&[&msg(b'C', b"SELECT 1\0"), &msg(b'Z', b"I")]),
        ),
    ];
    let r = run(&segs, Role::Client, Some(Role::Client));
    assert_eq!(r.out[0].query.as_deref(), Some("SELECT 'a"));
    assert!(r.out[0].query_truncated && r.reports[2].truncated);
}

#[test]
fn texts_held_by_queued_requests_are_bounded() {
    // A client pipelining many large simple queries before reading any answer.
    let n = 400;
    let text = format!("SELECT '{}'", "x".repeat(15_000));
    let q = msg(b'Q', format!("{text}\0").as_bytes());
    let mut r = Replay::new(Some(Role::Client));
    r.feed(Role::Client, &seg_of(true, 1, STARTUP));
    r.feed(Role::Client, &seg_of(false, 2, AUTH_OK_READY));
    for i in 0..n {
        r.feed(Role::Client, &seg_of(true, 10 + i, &q));
        assert!(r.stream.pending_text <= MAX_PENDING_TEXT);
    }
    let answer = cat(&[&msg(b'C', b"SELECT 1\0"), &msg(b'Z', b"I")]);
    for i in 0..n {
        r.feed(Role::Client, &seg_of(false, 1000 + i, &answer));
    }
    assert_eq!(r.out.len(), n as usize);
    assert_eq!(r.stream.pending_text, 0);
    assert_eq!(r.out[0].query.as_deref(), Some(text.as_str()));
    let last = &r.out[n as usize - 1];
    assert!(last.query_truncated && last.query.as_ref().is_none_or(|q| q.len() < text.len()));
    assert!(
        r.out
            .iter()
            .all(|s| s.rows == Some(1) && s.outcome == PgOutcome::Complete)
    );
}

#[test]
fn protocol_3_2_long_cancel_key() {
    // PostgreSQL 18: StartupMessage 3.2, BackendKeyData with a 32-byte secret.
    let startup = b"\x00\x00\x00\x12\x00\x03\x00\x02user\x00app\x00\x00";
    let mut key = b"\0\0\x12\x34".to_vec();
    key.extend_from_slice(&[0xab; 32]);
    let ready = cat(&[
        b"R\x00\x00\x00\x08\x00\x00\x00\x00",
        &msg(b'K', &key),
        &msg(b'Z', b"I"),
    ]);
    let r = run(
        &[
            seg_of(true, 10, startup),
            seg_of(false, 20, &ready),
            seg_of(true, 30, &msg(b'Q', b"SELECT 1\0")),
            seg_of(
                false,
                40,
                &cat(&[&msg(b'C', b"SELECT 1\0"), &msg(b'Z', b"I")]),
            ),
        ],
        Role::Client,
        Some(Role::Client),
    );
    expect(
        &r.out,
        &["Complete SELECT q=\"SELECT 1\" tag=\"SELECT 1\" rows=1"],
    );
    assert_eq!(r.out[0].database.as_deref(), Some("app"));
    assert_eq!(r.stream.startup().map(|s| s.protocol_minor), Some(2));
    assert!(!r.any(|r| r.lost_sync));
    // A 3.2 CancelRequest carries the long key too.
    let mut cancel = b"\x00\x00\x00\x2c\x04\xd2\x16\x2e\x00\x00\x12\x34".to_vec();
    cancel.extend_from_slice(&[0xab; 32]);
    let mut c = Replay::new(Some(Role::Client));
    c.feed(Role::Client, &seg_of(true, 10, &cancel));
    assert!(c.reports[0].cancel_request);
}
