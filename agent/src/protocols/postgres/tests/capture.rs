//! Sessions whose capture was cut: messages stay in sync and end at the right byte.

use super::*;

#[test]
fn capture_truncated_psql_session_stays_in_sync() {
    let chunks = load(PSQL_SIMPLE);
    let r = run(&segments(&chunks, 4096), Role::Client, Some(Role::Client));
    let got = briefs(&r.out);
    let full = briefs(&replay(PSQL_SIMPLE, Role::Client).out);
    // Everything up to the COPYs is untouched; COPY FROM STDIN's data (one 5 KB CopyData
    // message) is skipped by length.
    assert_eq!(got[..12], full[..12]);
    // COPY TO STDOUT's answer (122 CopyData messages, CommandComplete, ReadyForQuery in one
    // 6 KB send) is lost past 4 KB: the next Query proves it over.
    assert_eq!(
        briefs(&r.out[12..13]),
        ["Resynced COPY q=\"COPY t TO STDOUT\""]
    );
    assert_eq!(r.out[12].end_ns, 240);
    // The 5 KB INSERT (one Query message in one 5038-byte send) is captured up to 4096
    // bytes: its text is cut, but it still ends at the right byte and gets its answer.
    let insert = &r.out[13];
    assert_eq!(insert.command_tag.as_deref(), Some("INSERT 0 1"));
    assert_eq!(insert.rows, Some(1));
    assert!(insert.query_truncated);
    assert_eq!(insert.query.as_ref().map(String::len), Some(4096 - 5));
    // The wide SELECT's answer comes in 8 KB sends whose second half is not captured: the
    // DataRow headers there are lost. The next Query proves the statement is over.
    assert_eq!(insert.outcome, PgOutcome::Complete);
    let wide = &r.out[14];
    assert_eq!(wide.outcome, PgOutcome::Resynced);
    assert_eq!(
        wide.query.as_deref(),
        Some("SELECT id, repeat('z', 5000) AS wide FROM t WHERE id <= 2 ORDER BY id")
    );
    assert_eq!(wide.end_ns, 290);
    // … and everything after it parses again.
    assert_eq!(got[15..], full[15..]);
    assert!(r.any(|r| r.lost_sync) && r.any(|r| r.resynced) && r.any(|r| r.truncated));
}

/// Each message of the session in its own segment (a sender writing one message per call).
fn one_message_per_segment(chunks: &[Chunk]) -> Vec<Chunk> {
    let mut out = Vec::new();
    for front in [true, false] {
        let stream: Vec<u8> = chunks
            .iter()
            .filter(|c| c.frontend == front)
            .flat_map(|c| c.bytes.clone())
            .collect();
        let mut pos = 0;
        let mut untagged = front;
        let mut ssl_answer = false;
        while pos < stream.len() {
            let len = if ssl_answer {
                ssl_answer = false;
                1
            } else if untagged {
                let n =
                    u32::from_be_bytes(stream[pos..pos + 4].try_into().expect("4 bytes")) as usize;
                let code =
                    u32::from_be_bytes(stream[pos + 4..pos + 8].try_into().expect("4 bytes"));
                untagged = code == wire::SSL_REQUEST_CODE;
                n
            } else {
                1 + u32::from_be_bytes(stream[pos + 1..pos + 5].try_into().expect("4 bytes"))
                    as usize
            };
            if !front && pos == 0 && stream[0] == b'N' {
                ssl_answer = true;
                continue;
            }
            out.push((front, pos, stream[pos..pos + len].to_vec()));
            pos += len;
        }
    }
    // Interleave back in the original order: a message goes where its first byte was.
    let mut order = Vec::new();
    let (mut fpos, mut bpos) = (0, 0);
    for (i, c) in chunks.iter().enumerate() {
        let p = if c.frontend { &mut fpos } else { &mut bpos };
        order.push((c.frontend, *p, i));
        *p += c.bytes.len();
    }
    let chunk_of = |front: bool, pos: usize| {
        order
            .iter()
            .filter(|(f, start, _)| *f == front && *start <= pos)
            .map(|(_, _, i)| *i)
            .next_back()
            .unwrap_or(0)
    };
    let mut keyed: Vec<(usize, usize, Chunk)> = out
        .into_iter()
        .map(|(front, pos, bytes)| {
            (
                chunk_of(front, pos),
                pos,
                Chunk {
                    frontend: front,
                    bytes,
                },
            )
        })
        .collect();
    keyed.sort_by_key(|(chunk, pos, _)| (*chunk, *pos));
    keyed.into_iter().map(|(_, _, c)| c).collect()
}

#[test]
fn large_messages_partly_captured_end_at_the_right_byte() {
    let chunks = one_message_per_segment(&load(PSQL_SIMPLE));
    assert!(
        chunks
            .iter()
            .any(|c| c.bytes.len() > 5000 && c.bytes[0] == b'D')
    );
    let full = run(
        &segments(&chunks, usize::MAX),
        Role::Client,
        Some(Role::Client),
    );
    expect(
        &full.out,
        &briefs(&replay(PSQL_SIMPLE, Role::Client).out)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    // Down to a capture holding little more than the headers (9: length and code of the
    // startup packet).
    for capture in [4096, 512, 64, 9] {
        let r = run(
            &segments(&chunks, capture),
            Role::Client,
            Some(Role::Client),
        );
        assert!(!r.any(|r| r.lost_sync), "capture {capture}");
        assert_eq!(r.out.len(), full.out.len(), "capture {capture}");
        for (g, f) in r.out.iter().zip(&full.out) {
            // Counts, tags and timing never depend on the capture; texts and error
            // messages are prefixes.
            assert_eq!(
                (g.start_ns, g.end_ns, g.data_rows, g.outcome),
                (f.start_ns, f.end_ns, f.data_rows, f.outcome)
            );
            let fq = f.query.as_deref().unwrap_or("");
            assert!(
                fq.starts_with(g.query.as_deref().unwrap_or("")),
                "capture {capture}"
            );
            if capture >= 64 {
                assert_eq!(g.command_tag, f.command_tag, "capture {capture}");
                assert_eq!(
                    g.error.as_ref().map(|e| &e.code),
                    f.error.as_ref().map(|e| &e.code)
                );
            }
        }
        let big = r
            .out
            .iter()
            .find(|s| s.command_tag.as_deref() == Some("INSERT 0 1"));
        if capture >= 64 {
            assert!(big.is_some_and(|s| s.query_truncated), "capture {capture}");
        }
        let wide = r.out.iter().find(|s| s.data_rows == 4);
        assert!(
            wide.is_some_and(|s| s.outcome == PgOutcome::Complete),
            "capture {capture}"
        );
    }
}

#[test]
fn large_bind_lost_in_capture_still_reports_its_statement() {
    // libpq writes Parse/Bind/Describe/Execute/Sync in one send; a 10 KB parameter puts the
    // Describe/Execute/Sync beyond a 4 KB capture.
    let param = vec![b'x'; 10_000];
    let mut bind_body = b"\0\0\0\0\0\x01".to_vec();
    bind_body.extend_from_slice(&(param.len() as u32).to_be_bytes());
    bind_body.extend_from_slice(&param);
    bind_body.extend_from_slice(b"\0\0");
    let request = cat(&[
        &msg(b'P', b"\0INSERT INTO blobs VALUES ($1)\0\0\0"),
        &msg(b'B', &bind_body),
        &msg(b'D', b"P\0"),
        &msg(b'E', b"\0\0\0\0\0"),
        &msg(b'S', b""),
    ]);
    let answer = cat(&[
        &msg(b'1', b""),
        &msg(b'2', b""),
        &msg(b'n', b""),
        &msg(b'C', b"INSERT 0 1\0"),
        &msg(b'Z', b"I"),
    ]);
    let next = msg(b'Q', b"SELECT 1\0");
    let next_answer = cat(&[&msg(b'C', b"SELECT 1\0"), &msg(b'Z', b"I")]);
    let mut segs = vec![seg_of(true, 10, STARTUP), seg_of(false, 20, AUTH_OK_READY)];
    segs.push(Seg {
        frontend: true,
        ts: 30,
        len: request.len() as u64,
        data: request[..4096].to_vec(),
    });
    segs.push(seg_of(false, 40, &answer));
    segs.push(seg_of(true, 50, &next));
    segs.push(seg_of(false, 60, &next_answer));
    let r = run(&segs, Role::Client, Some(Role::Client));
    expect(
        &r.out,
        &[
            "Complete INSERT q=\"INSERT INTO blobs VALUES ($1)\" tag=\"INSERT 0 1\" rows=1",
            "Complete SELECT q=\"SELECT 1\" tag=\"SELECT 1\" rows=1",
        ],
    );
    assert_eq!((r.out[0].start_ns, r.out[0].end_ns), (30, 40));
    assert!(r.any(|r| r.lost_sync) && r.any(|r| r.resynced));
}
