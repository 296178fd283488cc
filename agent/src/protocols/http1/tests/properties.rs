//! Properties over whole streams: splitting never changes the exchanges, random and mutated
//! input never panics.

use proptest::prelude::*;

use super::fixtures::*;
use super::*;

/// Several keep-alive and pipelined exchanges: (request bytes, response bytes) per round;
/// each round's requests all go before its responses.
fn rounds() -> Vec<(Vec<u8>, Vec<u8>)> {
    let cat = |parts: &[&[u8]]| parts.concat();
    let chunked_req: &[u8] =
        b"POST /events HTTP/1.1\r\nHost: c\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n10;ext=1\r\n0123456789abcdef\r\n0\r\nTrailer-A: x\r\n\r\n";
    vec![
        (CURL_GET_ROOT.to_vec(), NGINX_200.to_vec()),
        (
            cat(&[CURL_GET_A, CURL_POST_HEAD, CURL_POST_BODY, CURL_HEAD]),
            cat(&[NODE_CHUNKED_1, NODE_CHUNKED_2, NGINX_201, NGINX_HEAD_200]),
        ),
        (chunked_req.to_vec(), NGINX_204.to_vec()),
        (
            cat(&[CURL_POST_EXPECT, &[b'q'; 2000]]),
            cat(&[CONTINUE_100, PYTHON_200]),
        ),
        (
            cat(&[TRACED_GET, CURL_GET_B]),
            cat(&[NGINX_304, ODD_CASE_CHUNKED]),
        ),
    ]
}

fn expected_rounds() -> Vec<Summary> {
    vec![
        s("GET", "/", Some(200), 0, 45, Complete),
        s("GET", "/a", Some(200), 0, 11, Complete),
        s("POST", "/api/items", Some(201), 26, 9, Complete),
        s("HEAD", "/", Some(200), 0, 0, Complete),
        s("POST", "/events", Some(204), 19, 0, Complete),
        s("POST", "/upload", Some(200), 2000, 6, Complete),
        s("GET", "/orders/17?expand=items", Some(304), 0, 0, Complete),
        s("GET", "/b?x=1&y=2", Some(200), 0, 3, Complete),
    ]
}

/// Feeds the rounds with each direction's bytes cut at the given points.
fn feed_rounds(role: Role, cuts: &[Vec<usize>]) -> Vec<HttpExchange> {
    let (rq, rs) = dirs(role);
    let mut stream = Http1Stream::new(Some(role));
    let mut out = Vec::new();
    let mut ts = 0;
    let mut piece = 0;
    for (req, resp) in rounds() {
        for (dir, bytes) in [(rq, &req), (rs, &resp)] {
            let mut points: Vec<usize> = cuts
                .get(piece)
                .map(|c| c.iter().map(|p| p % (bytes.len() + 1)).collect())
                .unwrap_or_default();
            piece += 1;
            points.push(0);
            points.push(bytes.len());
            points.sort_unstable();
            points.dedup();
            for w in points.windows(2) {
                ts += 1;
                stream.feed(seg(dir, ts, &bytes[w[0]..w[1]]), &mut out);
            }
        }
    }
    stream.close(ts + 1, &mut out);
    out
}

#[test]
fn unsplit_rounds_parse_as_expected() {
    for role in [Role::Server, Role::Client] {
        let got: Vec<_> = feed_rounds(role, &[]).iter().map(summary).collect();
        assert_eq!(got, expected_rounds(), "{role:?}");
    }
}

proptest! {
    #[test]
    fn splitting_never_changes_the_exchanges(
        server in any::<bool>(),
        cuts in prop::collection::vec(prop::collection::vec(0usize..5000, 0..12), 10),
    ) {
        let role = if server { Role::Server } else { Role::Client };
        let got: Vec<_> = feed_rounds(role, &cuts).iter().map(summary).collect();
        prop_assert_eq!(got, expected_rounds());
    }

    #[test]
    fn random_segments_never_panic(
        hint in prop_oneof![Just(None), Just(Some(Role::Server)), Just(Some(Role::Client))],
        segs in prop::collection::vec(
            (any::<bool>(), prop::collection::vec(any::<u8>(), 0..300), 0u64..100_000, any::<bool>()),
            0..40,
        ),
    ) {
        let mut stream = Http1Stream::new(hint);
        let mut out = Vec::new();
        for (i, (ingress, data, extra, full)) in segs.iter().enumerate() {
            let direction = if *ingress { IN } else { OUT };
            let len = data.len() as u64 + if *full { 0 } else { *extra };
            stream.feed(partial(direction, i as u64, len, data), &mut out);
        }
        stream.close(1_000_000, &mut out);
    }

    #[test]
    fn http_fragments_and_noise_never_panic(
        hint in prop_oneof![Just(None), Just(Some(Role::Server)), Just(Some(Role::Client))],
        picks in prop::collection::vec((0usize..16, any::<bool>(), 0usize..400, 0u64..70_000), 0..40),
    ) {
        let pieces: [&[u8]; 16] = [
            CURL_GET_ROOT, CURL_HEAD, CURL_POST_HEAD, CURL_POST_BODY, CURL_POST_EXPECT,
            NGINX_200, NGINX_HEAD_200, NGINX_204, NGINX_304, CONTINUE_100, PYTHON_CLOSE_HEAD,
            NODE_CHUNKED_1, NODE_CHUNKED_2, ODD_CASE_CHUNKED, TLS_CLIENT_HELLO, b"0\r\n\r\n",
        ];
        let mut stream = Http1Stream::new(hint);
        let mut out = Vec::new();
        for (i, (which, ingress, cut, extra)) in picks.iter().enumerate() {
            let bytes = pieces[*which];
            let data = &bytes[..(*cut).min(bytes.len())];
            let direction = if *ingress { IN } else { OUT };
            stream.feed(partial(direction, i as u64, bytes.len() as u64 + extra, data), &mut out);
        }
        stream.close(1_000_000, &mut out);
    }
}

/// A ~500-byte two-way stream as (direction, bytes) segments.
fn sweep_stream() -> Vec<(Direction, Vec<u8>)> {
    vec![
        (IN, CURL_POST_HEAD.to_vec()),
        (IN, CURL_POST_BODY.to_vec()),
        (OUT, NODE_CHUNKED_1.to_vec()),
        (OUT, NODE_CHUNKED_2.to_vec()),
        (IN, [CURL_HEAD, CURL_GET_A].concat()),
        (OUT, [NGINX_HEAD_200, NGINX_204].concat()),
    ]
}

fn run_stream(hint: Option<Role>, segs: &[(Direction, Vec<u8>, u64)]) -> Vec<HttpExchange> {
    let mut stream = Http1Stream::new(hint);
    let mut out = Vec::new();
    for (i, (d, data, len)) in segs.iter().enumerate() {
        stream.feed(partial(*d, i as u64, *len, data), &mut out);
    }
    stream.close(999, &mut out);
    out
}

#[test]
fn sweep_prefixes_mutations_and_captures() {
    let base = sweep_stream();
    let total: usize = base.iter().map(|(_, b)| b.len()).sum();
    assert!((400..=1200).contains(&total), "{total}");
    let full: Vec<_> = base
        .iter()
        .map(|(d, b)| (*d, b.clone(), b.len() as u64))
        .collect();
    let reference = run_stream(Some(Role::Server), &full);
    assert_eq!(reference.len(), 3, "{reference:#?}");

    // Position `k` of the whole stream as (segment, offset).
    let locate = |k: usize| {
        let mut k = k;
        for (i, (_, b)) in base.iter().enumerate() {
            if k < b.len() {
                return (i, k);
            }
            k -= b.len();
        }
        (base.len(), 0)
    };

    for hint in [Some(Role::Server), Some(Role::Client), None] {
        for k in 0..=total {
            let (si, off) = locate(k);
            // Prefix: everything before byte k.
            let mut prefix: Vec<_> = full[..si.min(full.len())].to_vec();
            if si < base.len() && off > 0 {
                let b = base[si].1[..off].to_vec();
                prefix.push((base[si].0, b, off as u64));
            }
            let out = run_stream(hint, &prefix);
            assert!(out.len() <= reference.len());

            if si == base.len() {
                continue;
            }
            // Capture ends at byte k (the syscall still moved the whole segment).
            let mut cut = full.clone();
            cut[si].1.truncate(off);
            run_stream(hint, &cut);

            // Single-byte mutations at byte k.
            let original = base[si].1[off];
            for v in [
                0x00,
                0xff,
                b'\r',
                b'\n',
                b' ',
                b'0',
                b'9',
                b'f',
                b':',
                original ^ 0x20,
            ] {
                let mut m = full.clone();
                m[si].1[off] = v;
                let out = run_stream(hint, &m);
                assert!(out.len() <= reference.len() + 1, "k={k} v={v}");
            }
        }
    }
}
