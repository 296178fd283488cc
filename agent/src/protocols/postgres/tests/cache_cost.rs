//! What the statement-name cache (`lru.rs`) costs, for callgrind (not a timing test):
//!
//! ```text
//! cargo +1.99.1 test --release -p agent --no-run
//! LRU_SCENARIO=hit valgrind --tool=callgrind --toggle-collect='*PgStream*feed*' \
//!     <the agent unittest binary> --ignored --exact \
//!     protocols::postgres::tests::cache_cost::statement_cache_cost
//! ```
//!
//! Instructions collected / `LRU_N` = cost per statement of `PgStream::feed`.

use super::*;

/// `LRU_SCENARIO=hit` (default): 16 prepared statements, then `LRU_N` Bind/Execute/Sync of them
/// (pgbench -M prepared). `LRU_SCENARIO=evict`: `LRU_N` Parse/Bind/Execute/Sync, every name new
/// (the cache is full after `STATEMENT_CACHE_ENTRIES`; from then on every Parse evicts).
#[test]
#[ignore = "measurement: run under callgrind (see the module comment)"]
fn statement_cache_cost() {
    let n: usize = std::env::var("LRU_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let evict = std::env::var("LRU_SCENARIO").as_deref() == Ok("evict");
    let parse = |i: usize| {
        msg(
            b'P',
            format!("s{i}\0SELECT {i} FROM t WHERE id = $1\0\0\0").as_bytes(),
        )
    };
    let bind = |i: usize| msg(b'B', format!("\0s{i}\0\0\0\0\0\0\0").as_bytes());
    let exec = msg(b'E', b"\0\0\0\0\0");
    let sync = msg(b'S', b"");
    let done = cat(&[&msg(b'2', b""), &msg(b'C', b"SELECT 1\0"), &msg(b'Z', b"I")]);
    let parsed_and_done = cat(&[&msg(b'1', b""), &done]);
    let mut segs = vec![seg_of(true, 10, STARTUP), seg_of(false, 20, AUTH_OK_READY)];
    let mut ts = 100;
    if !evict {
        for i in 0..16 {
            segs.push(seg_of(true, ts, &cat(&[&parse(i), &sync])));
            segs.push(seg_of(
                false,
                ts + 1,
                &cat(&[&msg(b'1', b""), &msg(b'Z', b"I")]),
            ));
            ts += 10;
        }
    }
    for i in 0..n {
        let (request, answer) = if evict {
            (cat(&[&parse(i), &bind(i), &exec, &sync]), &parsed_and_done)
        } else {
            (cat(&[&bind(i % 16), &exec, &sync]), &done)
        };
        segs.push(seg_of(true, ts, &request));
        segs.push(seg_of(false, ts + 1, answer));
        ts += 10;
    }
    let r = run(&segs, Role::Client, Some(Role::Client));
    assert_eq!(r.out.len(), n);
    assert!(r.out.iter().all(|s| s.query.is_some()));
}
