//! Robustness sweeps over the recorded sessions: every prefix, every single-byte mutation,
//! any resplitting or merging of the byte stream, random bytes.

use proptest::prelude::*;

use super::*;

/// The session's chunks cut after `n` bytes in total (the last one partly), full capture.
fn prefix(chunks: &[Chunk], n: usize) -> Vec<Chunk> {
    let mut left = n;
    let mut out = Vec::new();
    for c in chunks {
        if left == 0 {
            break;
        }
        let take = c.bytes.len().min(left);
        out.push(Chunk {
            frontend: c.frontend,
            bytes: c.bytes[..take].to_vec(),
        });
        left -= take;
    }
    out
}

#[test]
fn every_prefix_yields_a_prefix_of_the_statements() {
    for (name, f) in [
        ("psycopg", PSYCOPG),
        ("asyncpg", ASYNCPG),
        ("pgbench_prepared", PGBENCH_PREPARED),
        ("psql_ssl_prefer", PSQL_SSL_PREFER),
    ] {
        let chunks = load(f);
        let full = briefs(&replay(f, Role::Client).out);
        let total: usize = chunks.iter().map(|c| c.bytes.len()).sum();
        for n in 0..=total {
            let r = run(
                &segments(&prefix(&chunks, n), usize::MAX),
                Role::Client,
                Some(Role::Client),
            );
            let done: Vec<String> = r
                .out
                .iter()
                .filter(|s| s.outcome != PgOutcome::ConnectionClosed)
                .map(brief)
                .collect();
            assert!(
                full.starts_with(&done),
                "{name}: prefix of {n} bytes gave {done:#?}"
            );
        }
    }
}

fn mutations(b: u8) -> [u8; 3] {
    // A neighbouring tag ('P' → 'Q'), a length byte made huge or negative, a zero.
    [b ^ 0x01, b ^ 0x80, 0x00]
}

/// Every byte of the session replaced in turn by each of [`mutations`]: nothing panics, and
/// the statements stay few and well-formed.
fn mutation_sweep(name: &str, f: &str, hints: &[Option<Role>]) {
    let chunks = load(f);
    let full = replay(f, Role::Client).out.len();
    for ci in 0..chunks.len() {
        for bi in 0..chunks[ci].bytes.len() {
            for v in mutations(chunks[ci].bytes[bi]) {
                let mut m = chunks.clone();
                m[ci].bytes[bi] = v;
                for &hint in hints {
                    let r = run(&segments(&m, usize::MAX), Role::Client, hint);
                    // One byte can add at most a few statements (a broken length field
                    // makes the rest one message, or a tag turns into another).
                    assert!(
                        r.out.len() <= full + 4,
                        "{name}: chunk {ci} byte {bi} = {v:#x}"
                    );
                    for s in &r.out {
                        assert!(s.query.as_ref().is_none_or(|q| q.len() <= MAX_QUERY_BYTES));
                        assert!(s.start_ns <= s.end_ns);
                    }
                }
            }
        }
    }
}

#[test]
fn every_single_byte_mutation_psycopg() {
    mutation_sweep("psycopg", PSYCOPG, &[Some(Role::Client)]);
}

#[test]
fn every_single_byte_mutation_asyncpg() {
    mutation_sweep("asyncpg", ASYNCPG, &[Some(Role::Client), None]);
}

#[test]
fn every_single_byte_mutation_pgbench() {
    mutation_sweep("pgbench_extended", PGBENCH_EXTENDED, &[Some(Role::Server)]);
}

#[test]
fn every_single_byte_mutation_of_psql_session_head() {
    // The startup, SSL and first statements of psql, where most state changes happen.
    let chunks: Vec<Chunk> = load(PSQL_SIMPLE).into_iter().take(12).collect();
    for ci in 0..chunks.len() {
        for bi in 0..chunks[ci].bytes.len() {
            for v in mutations(chunks[ci].bytes[bi]) {
                let mut m = chunks.clone();
                m[ci].bytes[bi] = v;
                let _ = run(&segments(&m, usize::MAX), Role::Server, Some(Role::Server));
            }
        }
    }
}

/// Splits every chunk at the given relative points; the pieces keep their chunk's timestamp.
fn resplit(chunks: &[Chunk], cuts: &[Vec<prop::sample::Index>]) -> Vec<Seg> {
    let mut out = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        let ts = (i as u64 + 1) * 10;
        let mut points: Vec<usize> = cuts
            .get(i)
            .map(|v| v.iter().map(|ix| ix.index(c.bytes.len() + 1)).collect())
            .unwrap_or_default();
        points.push(0);
        points.push(c.bytes.len());
        points.sort_unstable();
        points.dedup();
        for w in points.windows(2) {
            out.push(Seg {
                frontend: c.frontend,
                ts,
                len: (w[1] - w[0]) as u64,
                data: c.bytes[w[0]..w[1]].to_vec(),
            });
        }
    }
    out
}

/// Merges runs of same-direction chunks into one segment (coarser syscalls).
fn merge_runs(chunks: &[Chunk], keep_apart: &[bool]) -> Vec<Chunk> {
    let mut out: Vec<Chunk> = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        match out.last_mut() {
            Some(last)
                if last.frontend == c.frontend && !keep_apart.get(i).copied().unwrap_or(true) =>
            {
                last.bytes.extend_from_slice(&c.bytes);
            }
            _ => out.push(c.clone()),
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn resplitting_the_byte_stream_changes_nothing(
        which in 0usize..ALL_FIXTURES.len(),
        cuts in prop::collection::vec(
            prop::collection::vec(any::<prop::sample::Index>(), 0..4),
            0..200,
        ),
    ) {
        let (name, f) = ALL_FIXTURES[which];
        let chunks = load(f);
        let full = replay(f, Role::Client);
        for role in [Role::Client, Role::Server] {
            let r = run(&resplit(&chunks, &cuts), role, Some(role));
            let mut out = r.out.clone();
            for s in &mut out {
                s.role = Role::Client;
            }
            prop_assert_eq!(&out, &full.out, "{}", name);
        }
    }

    #[test]
    fn merging_syscalls_changes_only_timestamps(
        which in 0usize..ALL_FIXTURES.len(),
        apart in prop::collection::vec(any::<bool>(), 0..200),
    ) {
        let (name, f) = ALL_FIXTURES[which];
        let merged = merge_runs(&load(f), &apart);
        let r = run(&segments(&merged, usize::MAX), Role::Client, Some(Role::Client));
        prop_assert_eq!(briefs(&r.out), briefs(&replay(f, Role::Client).out), "{}", name);
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        segs in prop::collection::vec(
            (any::<bool>(), prop::collection::vec(any::<u8>(), 0..64), 0u64..100_000),
            0..24,
        ),
        hint in prop::option::of(prop_oneof![Just(Role::Client), Just(Role::Server)]),
    ) {
        let mut r = Replay::new(hint);
        for (i, (front, data, extra)) in segs.iter().enumerate() {
            let s = Seg {
                frontend: *front,
                ts: i as u64,
                len: data.len() as u64 + extra,
                data: data.clone(),
            };
            r.feed(Role::Client, &s);
        }
        r.stream.close(1000, &mut r.out);
    }

    #[test]
    fn shuffled_real_messages_never_panic(
        picks in prop::collection::vec(
            (any::<prop::sample::Index>(), any::<bool>(), 1usize..5000),
            0..60,
        ),
        hint in prop::option::of(prop_oneof![Just(Role::Client), Just(Role::Server)]),
    ) {
        // Real chunks of every session in random order: requests and answers that do not
        // belong together, out-of-order protocol phases, cut captures.
        let pool: Vec<Chunk> = ALL_FIXTURES.iter().flat_map(|(_, f)| load(f)).collect();
        let mut r = Replay::new(hint);
        for (i, (ix, flip, capture)) in picks.iter().enumerate() {
            let c = ix.get(&pool);
            let s = Seg {
                frontend: c.frontend != *flip,
                ts: i as u64,
                len: c.bytes.len() as u64,
                data: c.bytes[..c.bytes.len().min(*capture)].to_vec(),
            };
            r.feed(Role::Client, &s);
        }
        r.stream.close(1000, &mut r.out);
        for s in &r.out {
            prop_assert!(s.start_ns <= s.end_ns);
        }
        prop_assert!(r.stream.pending.is_empty() && r.stream.pending_text == 0);
    }

    #[test]
    fn real_sessions_with_random_capture_never_panic(
        which in 0usize..ALL_FIXTURES.len(),
        capture in 1usize..600,
        hint in prop::option::of(prop_oneof![Just(Role::Client), Just(Role::Server)]),
    ) {
        let (_, f) = ALL_FIXTURES[which];
        let r = run(&segments(&load(f), capture), Role::Client, hint);
        for s in &r.out {
            prop_assert!(s.start_ns <= s.end_ns);
        }
    }
}
