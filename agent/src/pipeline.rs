//! Events → connections → protocol parsers (HTTP/1.x, PostgreSQL) → spans → correlation →
//! exporter. This file routes events to connections and their parsers and builds the spans;
//! what links them is `correlation/`.
//!
//! Runs on one thread without locks; everything it drops or rejects is counted in `Stats`.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use agent_common::{
    CONTEXT_FLAG_SPLIT_START, CONTEXT_SERVER, ConnEvent, DATA_FLAG_ADDRESSES,
    DATA_FLAG_TLS_PLAINTEXT, DATA_FLAG_TLS_RECORDS, DATA_FLAG_UNSAMPLED, DIR_INGRESS, DataEvent,
    ParkEvent, ProcessEvent, SEND_LOST,
};

use crate::{
    correlation::{ConnTrace, Correlator, Origin, SpanSink},
    events::{Event, first_ts},
    idmap::IdMap,
    kernel::propagation::RejoinCandidate,
    protocols::{
        Outputs, Stream, StreamReport,
        segment::{Direction, Role, Segment},
    },
    resources::Resources,
    spans::{
        context::{Clock, IdGenerator},
        http::{ConnInfo, ParentOutcome, SpanInputs, build_span},
        postgres::{QueryCache, build_db_span},
    },
    stats::Stats,
};

/// Connections without traffic for this long are dropped (their pending requests emitted).
const IDLE_CONNECTION_NS: u64 = 300 * 1_000_000_000;
/// A connection quiet this long gives back its parser's empty buffers (a busy one keeps them
/// to avoid an allocation per request).
const RELEASE_BUFFERS_AFTER_NS: u64 = 1_000_000_000;
/// Most connections followed at once; beyond it the least recently active are evicted.
const MAX_CONNECTIONS: usize = 100_000;
/// Accept/connect hints not matched by data within this time are forgotten.
const HINT_TTL_NS: u64 = 60 * 1_000_000_000;
/// The kernel reports a socket closed when TCP is done with it, but its process may still read
/// what had arrived: a client that shut down its sending side gets the answer and the server's
/// FIN before it reads them. A connection with a request still open is kept this long after
/// its close (or its last data since) before the request is given up.
const CLOSED_READ_GRACE_NS: u64 = 2 * 1_000_000_000;
/// An encrypted connection whose plaintext no TLS library probe sent within this time is
/// counted as encrypted (unreadable). The plaintext of a probed library's connection follows
/// its handshake at the first request.
const TLS_PLAINTEXT_WAIT_NS: u64 = 2 * 1_000_000_000;

struct Connection {
    stream: Stream,
    info: ConnInfo,
    last_ns: u64,
    /// `last_ns` when its parser last gave back its empty buffers (once per quiet spell: the
    /// tick does not visit every idle parser again).
    released_ns: u64,
    /// Traffic on an ignored port: followed for its lifecycle only.
    ignored: bool,
    /// What trace correlation keeps per connection (read and changed by `correlation/` only).
    trace: ConnTrace,
    /// The injector's view: where the socket is and whether it may rejoin.
    inject: InjectState,
    /// When the kernel reported the socket closed while a request was open (see
    /// [`CLOSED_READ_GRACE_NS`]).
    closed_ns: Option<u64>,
}

/// A client socket of the header injector, seen from userspace (see `inject::park` in the
/// kernel programs): it leaves the injector's map when its peer answers, and rejoins once the
/// answer has been read and the connection is between exchanges.
#[derive(Default)]
struct InjectState {
    /// The fd the owner process last used for the socket (`u32::MAX`: unknown).
    fd: u32,
    /// Writes seen (data events), compared with the kernel's count before a rejoin: equal
    /// means no write is on its way to us.
    writes: u64,
    /// Parked, with the socket's kernel address (the key of its send state).
    parked_sk: Option<u64>,
    /// The injector lost the socket's framing: it never rejoins.
    lost: bool,
    /// Requests were written on it that head sampling left out (`DATA_FLAG_UNSAMPLED`): the
    /// injector framed them as HTTP, whether or not a parser ever saw one.
    unsampled: bool,
}

/// What became of a parked socket's [`RejoinCandidate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejoinOutcome {
    /// Back in the injector's map.
    Rejoined,
    /// Not now (a write or unread data on its way): try again later.
    NotYet,
    /// Never: the socket is closed (or its fd reused).
    Gone,
    /// Never: framing lost, or the kernel or the process would not let it.
    Never,
}

/// Why a connection ends, for counting.
enum Ending {
    /// Closed by the kernel or by its process's exit.
    Closed,
    /// Dropped by us: idle too long, or too many connections.
    Evicted,
}

/// What the pipeline wants done outside it (process selection lives with the kernel maps).
#[derive(Debug, PartialEq, Eq)]
pub enum ProcessChange {
    Exec {
        pid: u32,
        comm: String,
    },
    /// The kernel selected the child of a selected process.
    Fork {
        pid: u32,
        parent: u32,
        comm: String,
    },
    Exit {
        pid: u32,
    },
    /// Its loader changed its libraries: look for TLS libraries again.
    Libraries {
        pid: u32,
    },
}

pub struct Pipeline<S: SpanSink> {
    conns: IdMap<(u32, u64), Connection>,
    /// accept() returned this fd in this process: its next new socket is a server side.
    accepted: IdMap<(u32, u32), u64>,
    /// connect() was called on this socket: client side.
    connected: IdMap<(u32, u64), u64>,
    resources: Resources,
    ids: IdGenerator,
    clock: Clock,
    stats: Arc<Stats>,
    /// Trace correlation: every span built here goes through it to the sink.
    corr: Correlator<S>,
    /// Traffic to or from these ports is not traced: the agent's own OTLP export, which a
    /// local collector receives and which would otherwise be traced in an endless loop.
    ignored_ports: Vec<u16>,
    /// Record SQL text as sent instead of with placeholders.
    raw_db_query: bool,
    /// Analyses of repeated statement texts for PostgreSQL spans.
    queries: QueryCache,
    out: Outputs,
    /// Sockets found not to speak HTTP, to take out of the injector's map.
    not_http: Vec<u64>,
    /// Connections whose socket is parked out of the injector's map.
    parked: IdMap<(u32, u64), ()>,
    /// Parks that arrived before the connection's first data event (by socket cookie).
    early_parks: IdMap<u64, ParkEvent>,
    /// Connections found encrypted, not counted yet: when (see [`TLS_PLAINTEXT_WAIT_NS`]).
    encrypted: IdMap<(u32, u64), u64>,
    /// The socket each (process, fd) moved bytes on last: names the socket of TLS plaintext
    /// that comes with its fd only.
    fds: IdMap<(u32, u32), u64>,
}

fn socket_addr(family: u32, addr: [u8; 16], port: u16) -> SocketAddr {
    let ip = if family == libc::AF_INET6 as u32 {
        let v6 = Ipv6Addr::from(addr);
        // Dual-stack sockets show IPv4 peers as ::ffff:a.b.c.d; report them as IPv4.
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    } else {
        IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
    };
    SocketAddr::new(ip, port)
}

impl<S: SpanSink> Pipeline<S> {
    pub fn new(resources: Resources, stats: Arc<Stats>, sink: S) -> Self {
        Self {
            conns: IdMap::default(),
            accepted: IdMap::default(),
            connected: IdMap::default(),
            resources,
            ids: IdGenerator::new(),
            clock: Clock::now(),
            corr: Correlator::new(stats.clone(), sink),
            stats,
            ignored_ports: Vec::new(),
            raw_db_query: false,
            queries: QueryCache::default(),
            out: Outputs::default(),
            not_http: Vec::new(),
            parked: IdMap::default(),
            early_parks: IdMap::default(),
            encrypted: IdMap::default(),
            fds: IdMap::default(),
        }
    }

    /// Parked sockets that may rejoin the injector's map now: HTTP client connections between
    /// exchanges whose fd is known. Call after a batch of events, so the decision rests on
    /// everything read so far.
    pub fn rejoin_candidates(&mut self) -> Vec<RejoinCandidate> {
        let mut out = Vec::new();
        let mut gone = Vec::new();
        for &key in self.parked.keys() {
            let Some(conn) = self.conns.get(&key) else {
                gone.push(key);
                continue;
            };
            let Some(sk) = conn.inject.parked_sk else {
                gone.push(key);
                continue;
            };
            if conn.inject.lost
                || conn.ignored
                || conn.inject.fd == u32::MAX
                || conn.stream.is_unrecognized()
            {
                gone.push(key);
                continue;
            }
            // A stream that never saw a byte is between exchanges as far as it knows: the
            // injector framed its requests, and the kernel checks that nothing is unread.
            if conn.stream.http_idle() || (conn.inject.unsampled && conn.stream.is_undecided()) {
                out.push(RejoinCandidate {
                    pid: key.0,
                    fd: conn.inject.fd,
                    sock_cookie: key.1,
                    sk,
                    writes: conn.inject.writes,
                });
            }
        }
        for key in gone {
            self.parked.remove(&key);
        }
        out
    }

    /// The caller's answer for a candidate.
    pub fn rejoin_done(&mut self, c: RejoinCandidate, outcome: RejoinOutcome) {
        let key = (c.pid, c.sock_cookie);
        match outcome {
            RejoinOutcome::NotYet => return,
            RejoinOutcome::Rejoined => Stats::add(&self.stats.sockets_rejoined, 1),
            RejoinOutcome::Never => Stats::add(&self.stats.sockets_not_rejoined, 1),
            RejoinOutcome::Gone => {}
        }
        self.parked.remove(&key);
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.inject.parked_sk = None;
            conn.inject.lost |= outcome != RejoinOutcome::Rejoined;
        }
    }

    fn on_parked(&mut self, ev: ParkEvent) {
        let key = (ev.pid, ev.sock_cookie);
        let Some(conn) = self.conns.get_mut(&key) else {
            // Its first write's event may still be behind us in the ring.
            if self.early_parks.len() < MAX_CONNECTIONS {
                self.early_parks.insert(ev.sock_cookie, ev);
            }
            return;
        };
        conn.inject.parked_sk = Some(ev.sk);
        if ev.mode == SEND_LOST {
            conn.inject.lost = true;
        }
        self.parked.insert(key, ());
    }

    /// Socket cookies of connections found not to be HTTP since the last call.
    pub fn take_not_http(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.not_http)
    }

    /// Switches same-host pairing on or off (on by default).
    pub fn pair_same_host(&mut self, on: bool, ends_at_return: bool) {
        self.corr.pair_same_host(on, ends_at_return);
    }

    /// Whether `pid`'s threads stand for the request they read (a runtime mechanism says they
    /// do not: Go's goroutines move between threads).
    pub fn set_threads_serve(&mut self, pid: u32, serve: bool) {
        self.corr.set_threads_serve(pid, serve);
    }

    /// Switches in-process linking in userspace on or off (on by default), and bounds it.
    pub fn link_in_process(&mut self, on: bool, max_age_ns: u64, max_children: u32) {
        self.corr.link_in_process(on, max_age_ns, max_children);
    }

    pub fn record_raw_db_query(&mut self, raw: bool) {
        self.raw_db_query = raw;
    }

    pub fn ignore_port(&mut self, port: u16) {
        self.ignored_ports.push(port);
    }

    /// Read a process's resource now, while it surely exists (short-lived clients such as curl
    /// may be gone by the time their span is built).
    pub fn preload(&mut self, pid: u32) {
        self.resources.get_or_load(pid);
    }

    pub fn open_connections(&self) -> usize {
        self.conns.len()
    }

    pub fn on_event(&mut self, event: Event<'_>) -> Option<ProcessChange> {
        match event {
            Event::Data { header, payload } => self.on_data(&header, payload),
            Event::Accept(ev) => {
                self.accepted.insert((ev.pid, ev.fd), ev.ts_ns);
            }
            Event::Connect(ev) => {
                self.connected.insert((ev.pid, ev.sock_cookie), ev.ts_ns);
            }
            Event::Close(ev) => self.on_close(&ev),
            Event::Exec(ev) => return Some(self.on_exec(&ev)),
            Event::Fork(ev) => {
                // Now, before anything may wait: the child (a PostgreSQL backend serving one
                // short session) may be gone by the time its first span is built.
                self.resources.load_forked(ev.pid, ev.parent);
                let comm = crate::events::comm_str(&ev.comm);
                return Some(ProcessChange::Fork {
                    pid: ev.pid,
                    parent: ev.parent,
                    comm,
                });
            }
            Event::ProcessExit(ev) => {
                self.on_exit(ev.pid, ev.ts_ns);
                return Some(ProcessChange::Exit { pid: ev.pid });
            }
            Event::Context(ev)
                if ev.role == CONTEXT_SERVER && ev.flags & CONTEXT_FLAG_SPLIT_START != 0 =>
            {
                let trace = self
                    .conns
                    .get_mut(&(ev.pid, ev.sock_cookie))
                    .map(|c| &mut c.trace);
                self.corr.attach_late_context(ev, trace);
            }
            Event::Context(ev) => self.corr.on_context(ev),
            Event::Parked(ev) => self.on_parked(ev),
            Event::Libraries(ev) => return Some(ProcessChange::Libraries { pid: ev.pid }),
        }
        None
    }

    fn on_data(&mut self, h: &DataEvent, payload: &[u8]) {
        Stats::add(&self.stats.data_events, 1);
        let plaintext = h.flags & DATA_FLAG_TLS_PLAINTEXT != 0;
        let resolved;
        let h = if plaintext && h.sock_cookie == 0 {
            // Its socket is the one its fd moved bytes on last (the library's own I/O came
            // first).
            let Some(&cookie) = self.fds.get(&(h.pid, h.fd)) else {
                Stats::add(&self.stats.tls_plaintext_unassociated, 1);
                return;
            };
            resolved = DataEvent {
                sock_cookie: cookie,
                ..*h
            };
            &resolved
        } else {
            if h.fd != u32::MAX && self.fds.get(&(h.pid, h.fd)) != Some(&h.sock_cookie) {
                self.fds.insert((h.pid, h.fd), h.sock_cookie);
            }
            h
        };
        let key = (h.pid, h.sock_cookie);
        // The kernel sends a socket's addresses with its first event only.
        let info = (h.flags & DATA_FLAG_ADDRESSES != 0).then(|| ConnInfo {
            local: socket_addr(h.family, h.local_addr, h.local_port),
            remote: socket_addr(h.family, h.remote_addr, h.remote_port),
            tls: false,
        });
        if !self.conns.contains_key(&key) {
            if self.conns.len() >= MAX_CONNECTIONS {
                self.evict_oldest();
            }
            let hint = if self.connected.remove(&key).is_some() {
                Some(Role::Client)
            } else if self.accepted.remove(&(h.pid, h.fd)).is_some() {
                Some(Role::Server)
            } else {
                None
            };
            let info = info.unwrap_or(ConnInfo::UNKNOWN);
            let ignored = self.ignored_ports.contains(&info.local.port())
                || self.ignored_ports.contains(&info.remote.port());
            let conn = Connection {
                stream: Stream::new(hint),
                info,
                last_ns: h.ts_ns,
                released_ns: 0,
                ignored,
                trace: ConnTrace::default(),
                inject: InjectState {
                    fd: u32::MAX,
                    ..InjectState::default()
                },
                closed_ns: None,
            };
            self.conns.insert(key, conn);
            if let Some(park) = self.early_parks.remove(&key.1) {
                self.on_parked(park);
            }
            self.resources.get_or_load(h.pid);
            Stats::add(&self.stats.connections_opened, 1);
        }
        self.corr.advance(h.ts_ns);
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if let Some(info) = info {
            conn.info = ConnInfo {
                tls: conn.info.tls,
                ..info
            };
            self.corr.connection_addresses(key, conn.info);
        }
        if plaintext && !conn.info.tls {
            // A TLS library's plaintext: parse it instead of the records, from the start.
            conn.info.tls = true;
            conn.stream = Stream::new(conn.stream.role());
            self.encrypted.remove(&key);
            // Encrypted bytes: nothing for the header injector to do on this socket.
            self.not_http.push(key.1);
            Stats::add(&self.stats.connections_tls, 1);
        }
        self.corr.attach_contexts(h, conn.info, &mut conn.trace);
        conn.last_ns = h.ts_ns;
        if h.fd != u32::MAX {
            conn.inject.fd = h.fd;
        }
        if h.direction != DIR_INGRESS {
            conn.inject.writes += 1;
        }
        // A write head sampling left out: only its count and fd matter (the socket's rejoin).
        if h.flags & DATA_FLAG_UNSAMPLED != 0 {
            conn.inject.unsampled = true;
            return;
        }
        if conn.ignored {
            return;
        }
        // The records of a connection whose plaintext comes from its TLS library.
        if (conn.info.tls || h.flags & DATA_FLAG_TLS_RECORDS != 0) && !plaintext {
            return;
        }
        if conn.stream.is_unrecognized() || conn.stream.is_encrypted() {
            return;
        }
        let direction = if h.direction == DIR_INGRESS {
            Direction::Ingress
        } else {
            Direction::Egress
        };
        let seg = Segment {
            direction,
            ts_ns: h.ts_ns,
            first_ts_ns: first_ts(h),
            len: h.bytes,
            data: payload,
            tid: h.tid,
        };
        let report = conn.stream.feed(seg, &mut self.out);
        if report.postgres.became_postgres || report.unrecognized || report.encrypted {
            // Not HTTP: the header injector has nothing to do on this socket.
            self.not_http.push(key.1);
        }
        if report.encrypted {
            self.encrypted.insert(key, h.ts_ns);
        }
        if direction == Direction::Ingress && conn.stream.serves() {
            self.corr.note_serving(h.pid, h.tid, h.ts_ns);
        }
        let info = conn.info;
        let mut trace = std::mem::take(&mut conn.trace);
        self.count_report(report);
        self.flush(h.pid, info, &mut trace);
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.trace = trace;
            // Closed in the kernel, and now read to the end of its last answer.
            if conn.closed_ns.is_some() && !conn.stream.awaits_response() {
                self.end_connection(key, Some(h.ts_ns), Ending::Closed);
            }
        }
    }

    fn count_report(&self, r: StreamReport) {
        let s = &self.stats;
        let count = |counter, yes: bool| Stats::add(counter, u64::from(yes));
        count(&s.connections_not_http, r.http.became_not_http);
        count(&s.http_resyncs, r.http.resynced);
        count(&s.http_headers_truncated, r.http.headers_truncated);
        Stats::add(&s.http_heads_invalid, u64::from(r.http.invalid_heads));
        count(&s.connections_postgres, r.postgres.became_postgres);
        count(
            &s.pg_lost_sync,
            r.postgres.lost_sync || r.postgres.resynced || r.postgres.hostile_length,
        );
        Stats::add(
            &s.pg_unmatched_responses,
            u64::from(r.postgres.unmatched_responses),
        );
        count(&s.connections_unrecognized, r.unrecognized);
    }

    fn on_close(&mut self, ev: &ConnEvent) {
        let key = (ev.pid, ev.sock_cookie);
        self.connected.remove(&key);
        self.early_parks.remove(&ev.sock_cookie);
        if let Some(conn) = self.conns.get_mut(&key)
            && conn.stream.awaits_response()
        {
            // Perhaps a half-close: the answer may still be read (see CLOSED_READ_GRACE_NS).
            conn.closed_ns = Some(ev.ts_ns);
            return;
        }
        self.end_connection(key, Some(ev.ts_ns), Ending::Closed);
    }

    fn on_exec(&mut self, ev: &ProcessEvent) -> ProcessChange {
        // A new program image: its resource (service name, command line) changed.
        self.resources.forget(ev.pid);
        ProcessChange::Exec {
            pid: ev.pid,
            comm: crate::events::comm_str(&ev.comm),
        }
    }

    fn on_exit(&mut self, pid: u32, ts: u64) {
        let keys: Vec<_> = self
            .conns
            .keys()
            .filter(|(p, _)| *p == pid)
            .copied()
            .collect();
        for key in keys {
            self.end_connection(key, Some(ts), Ending::Closed);
        }
        self.accepted.retain(|(p, _), _| *p != pid);
        self.fds.retain(|(p, _), _| *p != pid);
        self.connected.retain(|(p, _), _| *p != pid);
        self.corr.process_exited(pid);
        self.resources.forget(pid);
    }

    fn evict_oldest(&mut self) {
        if let Some((&key, _)) = self.conns.iter().min_by_key(|(_, c)| c.last_ns) {
            self.end_connection(key, None, Ending::Evicted);
        }
    }

    /// Removes a connection, lets its parser emit what is pending (at `ts`, or at its last
    /// activity) and turns that into spans.
    fn end_connection(&mut self, key: (u32, u64), ts: Option<u64>, ending: Ending) {
        let Some(mut conn) = self.conns.remove(&key) else {
            return;
        };
        if self.encrypted.remove(&key).is_some() {
            Stats::add(&self.stats.connections_encrypted, 1);
        }
        if conn.stream.close(ts.unwrap_or(conn.last_ns), &mut self.out) {
            Stats::add(&self.stats.connections_unrecognized, 1);
        }
        let counter = match ending {
            Ending::Closed => &self.stats.connections_closed,
            Ending::Evicted => &self.stats.connections_evicted,
        };
        Stats::add(counter, 1);
        self.flush(key.0, conn.info, &mut conn.trace);
        self.corr.connection_ended(key, conn.info, &conn.trace);
    }

    fn flush(&mut self, pid: u32, info: ConnInfo, trace: &mut ConnTrace) {
        if self.out.is_empty() {
            return;
        }
        let resource = self.resources.get_or_load(pid);
        let mut out = std::mem::take(&mut self.out);
        for ex in out.http.drain(..) {
            Stats::add(&self.stats.http_exchanges, 1);
            if ex.status.is_none() {
                Stats::add(&self.stats.http_incomplete, 1);
            }
            let inputs = SpanInputs {
                exchange: &ex,
                conn: info,
                resource: resource.clone(),
                clock: self.clock,
            };
            let (span, parent) = build_span(inputs, &mut self.ids);
            match parent {
                ParentOutcome::Honoured => Stats::add(&self.stats.traceparent_honoured, 1),
                ParentOutcome::Invalid => Stats::add(&self.stats.traceparent_invalid, 1),
                ParentOutcome::None => {}
            }
            let at = Origin {
                pid,
                tid: ex.tid,
                role: ex.role,
                start_ns: ex.request_start_ns,
                end_ns: ex.response_end_ns.unwrap_or(ex.request_end_ns),
            };
            self.corr.http_span(at, info, trace, span);
        }
        for st in out.postgres.drain(..) {
            Stats::add(&self.stats.db_statements, 1);
            let span = build_db_span(
                &st,
                self.raw_db_query,
                &mut self.queries,
                info,
                resource.clone(),
                self.clock,
                &mut self.ids,
            );
            let at = Origin {
                pid,
                tid: st.tid,
                role: st.role,
                start_ns: st.start_ns,
                end_ns: st.end_ns,
            };
            self.corr.db_span(at, info, trace, span);
        }
        // Give the (now empty) buffers back for reuse.
        self.out = out;
    }

    /// Periodic work: release held client spans, expire idle state, refresh the clock.
    pub fn tick(&mut self, now_ns: u64) {
        self.clock = Clock::now();
        self.corr.tick(now_ns);
        let closed: Vec<_> = self
            .conns
            .iter()
            .filter_map(|(k, c)| {
                let last = c.closed_ns?.max(c.last_ns);
                (last.saturating_add(CLOSED_READ_GRACE_NS) <= now_ns).then_some((*k, last))
            })
            .collect();
        for (key, last) in closed {
            self.end_connection(key, Some(last), Ending::Closed);
        }
        self.count_encrypted(|since| since.saturating_add(TLS_PLAINTEXT_WAIT_NS) <= now_ns);
        let mut idle = Vec::new();
        for (key, c) in &mut self.conns {
            if c.last_ns.saturating_add(IDLE_CONNECTION_NS) < now_ns {
                idle.push(*key);
            } else if c.released_ns != c.last_ns
                && c.last_ns.saturating_add(RELEASE_BUFFERS_AFTER_NS) < now_ns
            {
                c.stream.release_idle_buffers();
                c.released_ns = c.last_ns;
            }
        }
        for key in idle {
            self.end_connection(key, None, Ending::Evicted);
        }
        self.accepted
            .retain(|_, ts| ts.saturating_add(HINT_TTL_NS) > now_ns);
        self.connected
            .retain(|_, ts| ts.saturating_add(HINT_TTL_NS) > now_ns);
        self.corr.prune(now_ns);
    }

    /// Counts the encrypted connections `done` says waited long enough for their plaintext.
    fn count_encrypted(&mut self, done: impl Fn(u64) -> bool) {
        let before = self.encrypted.len();
        self.encrypted.retain(|_, since| !done(*since));
        Stats::add(
            &self.stats.connections_encrypted,
            (before - self.encrypted.len()) as u64,
        );
    }

    /// Shutdown: release held spans. Requests still in flight are not reported as failed:
    /// their connections did not close, the agent stopped watching them. Connections the
    /// kernel closed end now; encrypted connections whose plaintext never came are counted.
    pub fn finish(mut self) -> S {
        self.count_encrypted(|_| true);
        let closed: Vec<_> = self
            .conns
            .iter()
            .filter_map(|(k, c)| Some((*k, c.closed_ns?.max(c.last_ns))))
            .collect();
        for (key, last) in closed {
            self.end_connection(key, Some(last), Ending::Closed);
        }
        self.corr.finish()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;

    use agent_common::{
        CONTEXT_FLAG_PARENT, CONTEXT_SERVER, ContextEvent, DIR_EGRESS, EventKind, SyscallKind,
    };
    use proptest::prelude::*;

    use super::*;
    use crate::spans::model::{AttrValue, SpanKind, SpanRecord};

    const PID: u32 = 4_000_000; // no such process: resources fall back to a minimal one

    fn pipeline() -> Pipeline<Vec<SpanRecord>> {
        Pipeline::new(
            Resources::new("test-host"),
            Arc::new(Stats::default()),
            Vec::new(),
        )
    }

    fn data(cookie: u64, fd: u32, dir: u32, ts: u64, bytes: &[u8]) -> DataEvent {
        DataEvent {
            kind: EventKind::Data as u32,
            direction: dir,
            pid: PID,
            tid: PID,
            fd,
            syscall: SyscallKind::Read as u32,
            ts_ns: ts,
            first_ts_ns: ts,
            sock_cookie: cookie,
            bytes: bytes.len() as u64,
            captured: bytes.len() as u32,
            family: libc::AF_INET as u32,
            local_addr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            remote_addr: [127, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            local_port: 8080,
            remote_port: 40000,
            flags: DATA_FLAG_ADDRESSES,
        }
    }

    fn feed(p: &mut Pipeline<Vec<SpanRecord>>, ev: DataEvent, payload: &[u8]) {
        p.on_event(Event::Data {
            header: ev,
            payload,
        });
    }

    mod tls {
        use agent_common::{DATA_FLAG_TLS_PLAINTEXT, DATA_FLAG_TLS_RECORDS, DIR_INGRESS};

        use super::*;

        const CLIENT_HELLO: &[u8] = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03";
        const SERVER_HELLO: &[u8] = b"\x16\x03\x03\x00\x7a\x02\x00\x00\x76\x03\x03";
        const REQUEST: &[u8] = b"GET /secret HTTP/1.1\r\nHost: example\r\n\r\n";
        const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

        fn counting() -> (Pipeline<Vec<SpanRecord>>, Arc<Stats>) {
            let stats = Arc::new(Stats::default());
            let p = Pipeline::new(Resources::new("test-host"), stats.clone(), Vec::new());
            (p, stats)
        }

        /// A TLS record event (the kernel copies none of its bytes) or a plaintext one.
        fn with(mut ev: DataEvent, flags: u32) -> DataEvent {
            ev.flags = flags;
            if flags & DATA_FLAG_TLS_RECORDS != 0 {
                ev.captured = 0;
            }
            ev
        }

        fn handshake(p: &mut Pipeline<Vec<SpanRecord>>) {
            feed(p, data(7, 5, DIR_INGRESS, 10, CLIENT_HELLO), CLIENT_HELLO);
            let mut hello = data(7, 5, DIR_EGRESS, 20, SERVER_HELLO);
            hello.flags = 0;
            feed(p, hello, SERVER_HELLO);
        }

        #[test]
        fn plaintext_from_the_library_makes_https_spans_and_records_are_ignored() {
            let (mut p, stats) = counting();
            handshake(&mut p);
            // The request's records, then its plaintext, as the kernel sends them.
            let records = with(data(7, 5, DIR_INGRESS, 30, &[0; 80]), DATA_FLAG_TLS_RECORDS);
            feed(&mut p, records, &[]);
            let mut req = with(
                data(7, u32::MAX, DIR_INGRESS, 30, REQUEST),
                DATA_FLAG_TLS_PLAINTEXT,
            );
            req.family = 0;
            feed(&mut p, req, REQUEST);
            let records = with(data(7, 5, DIR_EGRESS, 40, &[0; 60]), DATA_FLAG_TLS_RECORDS);
            feed(&mut p, records, &[]);
            let resp = with(
                data(7, u32::MAX, DIR_EGRESS, 40, RESPONSE),
                DATA_FLAG_TLS_PLAINTEXT,
            );
            feed(&mut p, resp, RESPONSE);
            let spans = p.finish();
            assert_eq!(spans.len(), 1, "{spans:?}");
            let span = &spans[0];
            assert_eq!(span.kind, SpanKind::Server);
            assert_eq!(
                span.attr("url.path"),
                Some(&AttrValue::Str("/secret".into()))
            );
            assert_eq!(
                span.attr("url.scheme"),
                Some(&AttrValue::Str("https".into()))
            );
            assert_eq!(span.attr("server.port"), Some(&AttrValue::Int(8080)));
            assert_eq!(stats.connections_tls.load(Relaxed), 1);
            assert_eq!(stats.connections_encrypted.load(Relaxed), 0);
        }

        #[test]
        fn an_encrypted_connection_without_plaintext_is_counted_after_the_wait() {
            let (mut p, stats) = counting();
            handshake(&mut p);
            // Found encrypted at its first record (ts 10).
            p.tick(10 + TLS_PLAINTEXT_WAIT_NS - 1);
            assert_eq!(stats.connections_encrypted.load(Relaxed), 0);
            p.tick(10 + TLS_PLAINTEXT_WAIT_NS);
            assert_eq!(stats.connections_encrypted.load(Relaxed), 1);
            assert!(p.finish().is_empty());
            assert_eq!(stats.connections_encrypted.load(Relaxed), 1, "counted once");
        }

        #[test]
        fn plaintext_named_by_fd_joins_the_socket_that_fd_used_last() {
            let (mut p, stats) = counting();
            handshake(&mut p);
            // fd 5's socket is cookie 7; plaintext naming fd 5 (no cookie) is its.
            let mut req = with(
                data(0, 5, DIR_INGRESS, 30, REQUEST),
                DATA_FLAG_TLS_PLAINTEXT,
            );
            req.family = 0;
            feed(&mut p, req, REQUEST);
            let resp = with(
                data(0, 5, DIR_EGRESS, 40, RESPONSE),
                DATA_FLAG_TLS_PLAINTEXT,
            );
            feed(&mut p, resp, RESPONSE);
            // An fd that never moved bytes names nothing.
            let lost = with(
                data(0, 9, DIR_INGRESS, 50, REQUEST),
                DATA_FLAG_TLS_PLAINTEXT,
            );
            feed(&mut p, lost, REQUEST);
            assert_eq!(stats.tls_plaintext_unassociated.load(Relaxed), 1);
            let spans = p.finish();
            assert_eq!(spans.len(), 1, "{spans:?}");
            assert_eq!(
                spans[0].attr("url.scheme"),
                Some(&AttrValue::Str("https".into()))
            );
            assert_eq!(stats.connections_tls.load(Relaxed), 1);
        }
    }

    fn close(p: &mut Pipeline<Vec<SpanRecord>>, cookie: u64, ts: u64) {
        p.on_event(Event::Close(ConnEvent {
            kind: EventKind::Close as u32,
            pid: PID,
            tid: 0,
            fd: u32::MAX,
            ts_ns: ts,
            sock_cookie: cookie,
            ret: 0,
        }));
    }

    const REQ_A: &[u8] = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
    const REQ_B: &[u8] = b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n";
    const RESP: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

    #[test]
    fn fd_reuse_does_not_glue_connections() {
        let mut p = pipeline();
        // Connection 1 on fd 5 gets a request, then closes without answering.
        feed(&mut p, data(1, 5, DIR_INGRESS, 100, REQ_A), REQ_A);
        close(&mut p, 1, 150);
        // fd 5 is reused by a new socket (new cookie): its exchange must stand alone.
        feed(&mut p, data(2, 5, DIR_INGRESS, 200, REQ_B), REQ_B);
        feed(&mut p, data(2, 5, DIR_EGRESS, 300, RESP), RESP);
        let spans = p.finish();
        assert_eq!(spans.len(), 2, "{spans:#?}");
        let a = spans
            .iter()
            .find(|s| s.attr("url.path") == Some(&AttrValue::Str("/a".into())));
        let b = spans
            .iter()
            .find(|s| s.attr("url.path") == Some(&AttrValue::Str("/b".into())));
        let (a, b) = (a.expect("span /a"), b.expect("span /b"));
        assert!(
            a.attr("http.response.status_code").is_none(),
            "/a never got a response"
        );
        assert_eq!(
            b.attr("http.response.status_code"),
            Some(&AttrValue::Int(200))
        );
        assert_eq!(b.kind, SpanKind::Server);
    }

    /// A connection quiet for a second gives back its parser's empty buffers, once per quiet
    /// spell, and reads its next exchange as before.
    #[test]
    fn a_quiet_connection_releases_its_buffers_once_and_reads_on() {
        let mut p = pipeline();
        feed(&mut p, data(1, 5, DIR_INGRESS, 100, REQ_A), REQ_A);
        feed(&mut p, data(1, 5, DIR_EGRESS, 200, RESP), RESP);
        let key = *p.conns.keys().next().expect("one connection");
        p.tick(200 + RELEASE_BUFFERS_AFTER_NS);
        assert_eq!(p.conns[&key].released_ns, 0, "not quiet long enough");
        p.tick(201 + RELEASE_BUFFERS_AFTER_NS);
        assert_eq!(p.conns[&key].released_ns, 200);
        let later = 300 + RELEASE_BUFFERS_AFTER_NS;
        feed(&mut p, data(1, 5, DIR_INGRESS, later, REQ_A), REQ_A);
        feed(&mut p, data(1, 5, DIR_EGRESS, later + 100, RESP), RESP);
        let spans = p.finish();
        assert_eq!(spans.len(), 2, "{spans:#?}");
        assert_eq!(spans[1].end_unix_nanos - spans[1].start_unix_nanos, 100);
    }

    #[test]
    fn fd_reuse_without_a_seen_close_still_separates_connections() {
        let mut p = pipeline();
        // The close of the first socket was never seen (e.g. lost): same pid and fd, new cookie.
        feed(&mut p, data(1, 5, DIR_INGRESS, 100, REQ_A), REQ_A);
        feed(&mut p, data(2, 5, DIR_INGRESS, 200, REQ_B), REQ_B);
        feed(&mut p, data(2, 5, DIR_EGRESS, 300, RESP), RESP);
        assert_eq!(p.open_connections(), 2);
        let spans = p.finish();
        assert_eq!(spans.len(), 1, "{spans:#?}");
        assert_eq!(
            spans[0].attr("url.path"),
            Some(&AttrValue::Str("/b".into()))
        );
        // Timed from /b's own request (ts 200) to its response (ts 300), not from /a's.
        assert_eq!(spans[0].end_unix_nanos - spans[0].start_unix_nanos, 100);
    }

    #[test]
    fn accept_hint_and_addresses_reach_the_span() {
        let mut p = pipeline();
        p.on_event(Event::Accept(ConnEvent {
            kind: EventKind::Accept as u32,
            pid: PID,
            tid: PID,
            fd: 7,
            ts_ns: 50,
            sock_cookie: 0,
            ret: 7,
        }));
        feed(&mut p, data(9, 7, DIR_INGRESS, 100, REQ_A), REQ_A);
        feed(&mut p, data(9, 7, DIR_EGRESS, 200, RESP), RESP);
        let spans = p.finish();
        assert_eq!(spans.len(), 1);
        assert_eq!(
            spans[0].attr("client.address"),
            Some(&AttrValue::Str("127.0.0.2".into()))
        );
        assert_eq!(spans[0].attr("client.port"), Some(&AttrValue::Int(40000)));
        assert_eq!(spans[0].resource.pid, PID);
    }

    #[test]
    fn ignored_ports_produce_nothing() {
        let mut p = pipeline();
        p.ignore_port(8080);
        feed(&mut p, data(1, 5, DIR_INGRESS, 100, REQ_A), REQ_A);
        let mut later = data(1, 5, DIR_EGRESS, 200, RESP);
        later.flags = 0; // later events of a socket carry no addresses
        feed(&mut p, later, RESP);
        assert!(p.finish().is_empty());
    }

    #[test]
    fn process_exit_ends_its_connections() {
        let mut p = pipeline();
        feed(&mut p, data(1, 5, DIR_INGRESS, 100, REQ_A), REQ_A);
        let change = p.on_event(Event::ProcessExit(ProcessEvent {
            kind: EventKind::ProcessExit as u32,
            pid: PID,
            ts_ns: 500,
            comm: [0; 16],
            parent: 0,
            _pad: 0,
        }));
        assert_eq!(change, Some(ProcessChange::Exit { pid: PID }));
        assert_eq!(p.open_connections(), 0);
        let spans = p.finish();
        assert_eq!(spans.len(), 1, "the unanswered request is reported");
        assert!(matches!(
            spans[0].status,
            crate::spans::model::SpanStatus::Error { .. }
        ));
    }

    // ---- closes: the kernel's close is not the end of what the process reads ----

    fn span_status(span: &SpanRecord) -> (Option<&AttrValue>, bool) {
        (
            span.attr("http.response.status_code"),
            matches!(span.status, crate::spans::model::SpanStatus::Error { .. }),
        )
    }

    /// A client that shut down its sending side after its request: the server's answer and
    /// FIN close the socket in the kernel before the client reads the answer.
    #[test]
    fn a_half_closed_client_still_gets_its_answer() {
        let mut p = pipeline();
        feed(&mut p, data(1, 5, DIR_EGRESS, 100, REQ_A), REQ_A);
        close(&mut p, 1, 150);
        assert_eq!(
            p.open_connections(),
            1,
            "kept: the answer may still be read"
        );
        feed(&mut p, data(1, 5, DIR_INGRESS, 200, RESP), RESP);
        assert_eq!(p.open_connections(), 0, "ended once the answer was read");
        assert_eq!(p.corr.sink().len(), 1);
        let spans = p.finish();
        assert_eq!(spans[0].kind, SpanKind::Client);
        assert_eq!(span_status(&spans[0]), (Some(&AttrValue::Int(200)), false));
        assert_eq!(spans[0].end_unix_nanos - spans[0].start_unix_nanos, 100);
    }

    /// A response delimited by the close is read after the kernel's close: it ends when the
    /// reads stop.
    #[test]
    fn a_close_delimited_answer_read_after_the_close_is_complete() {
        let mut p = pipeline();
        feed(&mut p, data(1, 5, DIR_EGRESS, 100, REQ_A), REQ_A);
        close(&mut p, 1, 150);
        let head = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhel";
        feed(&mut p, data(1, 5, DIR_INGRESS, 200, head), head);
        feed(&mut p, data(1, 5, DIR_INGRESS, 210, b"lo"), b"lo");
        p.tick(210 + CLOSED_READ_GRACE_NS - 1);
        assert!(p.corr.sink().is_empty());
        p.tick(210 + CLOSED_READ_GRACE_NS);
        assert_eq!(p.open_connections(), 0);
        let spans = p.finish();
        assert_eq!(spans.len(), 1);
        assert_eq!(span_status(&spans[0]), (Some(&AttrValue::Int(200)), false));
        assert_eq!(
            spans[0].attr("http.response.body.size"),
            Some(&AttrValue::Int(5))
        );
    }

    /// A real close before any answer: still an error, once no answer came in time.
    #[test]
    fn a_close_before_the_answer_is_an_error() {
        let mut p = pipeline();
        feed(&mut p, data(1, 5, DIR_EGRESS, 100, REQ_A), REQ_A);
        close(&mut p, 1, 150);
        p.tick(150 + CLOSED_READ_GRACE_NS - 1);
        assert!(p.corr.sink().is_empty());
        p.tick(150 + CLOSED_READ_GRACE_NS);
        assert_eq!(p.open_connections(), 0);
        assert_eq!(p.corr.sink().len(), 1);
        assert_eq!(span_status(&p.corr.sink()[0]), (None, true));
        assert_eq!(
            p.stats
                .connections_closed
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn a_close_with_nothing_open_ends_the_connection_at_once() {
        let mut p = pipeline();
        feed(&mut p, data(1, 5, DIR_EGRESS, 100, REQ_A), REQ_A);
        feed(&mut p, data(1, 5, DIR_INGRESS, 200, RESP), RESP);
        close(&mut p, 1, 250);
        assert_eq!(p.open_connections(), 0);
    }

    // ---- trace ids: whatever the kernel or the wire says, no invalid id leaves ----

    const CLIENT_PID: u32 = 4_000_001;
    const SERVER_PORT: u16 = 8080;
    const CLIENT_PORT: u16 = 40000;

    fn ids_pipeline() -> (Pipeline<Vec<SpanRecord>>, Arc<Stats>) {
        let stats = Arc::new(Stats::default());
        let p = Pipeline::new(Resources::new("test-host"), stats.clone(), Vec::new());
        (p, stats)
    }

    /// A data event of the server (`PID`, cookie 1) or of its local client (`CLIENT_PID`,
    /// cookie 2) on one loopback connection.
    fn side(server: bool, dir: u32, ts: u64, bytes: &[u8]) -> DataEvent {
        let (pid, cookie, local, remote) = if server {
            (PID, 1, SERVER_PORT, CLIENT_PORT)
        } else {
            (CLIENT_PID, 2, CLIENT_PORT, SERVER_PORT)
        };
        let mut ev = data(cookie, 5, dir, ts, bytes);
        ev.pid = pid;
        ev.tid = pid;
        ev.local_port = local;
        ev.remote_port = remote;
        ev.local_addr = [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        ev.remote_addr = ev.local_addr;
        ev
    }

    fn context(
        server: bool,
        ts: u64,
        flags: u32,
        ids: ([u8; 16], [u8; 8], [u8; 8]),
    ) -> Event<'static> {
        let (trace_id, span_id, parent_id) = ids;
        Event::Context(ContextEvent {
            kind: EventKind::Context as u32,
            role: if server {
                CONTEXT_SERVER
            } else {
                agent_common::CONTEXT_CLIENT
            },
            pid: if server { PID } else { CLIENT_PID },
            tid: if server { PID } else { CLIENT_PID },
            ts_ns: ts,
            sock_cookie: if server { 1 } else { 0 },
            local_port: if server { 0 } else { CLIENT_PORT },
            remote_port: if server { 0 } else { SERVER_PORT },
            flags,
            trace_id,
            span_id,
            parent_id,
        })
    }

    /// One exchange between a traced client and a traced server on this host, each side's
    /// request preceded by the kernel context given for it (if any).
    fn local_exchange(
        p: &mut Pipeline<Vec<SpanRecord>>,
        request: &[u8],
        client_ctx: Option<Event<'static>>,
        server_ctx: Option<Event<'static>>,
    ) {
        if let Some(ctx) = client_ctx {
            p.on_event(ctx);
        }
        feed(p, side(false, DIR_EGRESS, 100, request), request);
        if let Some(ctx) = server_ctx {
            p.on_event(ctx);
        }
        feed(p, side(true, DIR_INGRESS, 110, request), request);
        feed(p, side(true, DIR_EGRESS, 120, RESP), RESP);
        feed(p, side(false, DIR_INGRESS, 130, RESP), RESP);
    }

    fn assert_valid_ids(spans: &[SpanRecord]) {
        for s in spans {
            assert!(
                s.has_valid_ids(),
                "span {:?} has an invalid id: trace {:?} span {:?} parent {:?}",
                s.name,
                s.trace_id,
                s.span_id,
                s.parent_span_id
            );
        }
    }

    const ZERO_TRACE: [u8; 16] = [0; 16];
    const ZERO_SPAN: [u8; 8] = [0; 8];

    /// A traced client sends `traceparent: 00-000…0-<parent>-01`: the injector rewrote the
    /// parent id in place and reports the all-zero trace id. Neither span may carry it.
    /// Go's server read a request's first byte alone: the kernel opened it at its handler,
    /// after its bytes (`CONTEXT_FLAG_SPLIT_START`, the probe's time). The exchange whose
    /// bytes came before the context and whose answer after it takes the context; the next
    /// request on the connection (with its own context at its read) is not confused by it.
    #[test]
    fn a_server_context_opened_late_by_a_runtime_probe_names_its_exchange() {
        let (mut p, stats) = ids_pipeline();
        p.pair_same_host(false, false);
        let late = agent_common::CONTEXT_FLAG_SPLIT_START;
        feed(
            &mut p,
            data(1, 5, DIR_INGRESS, 100, &REQ_A[..1]),
            &REQ_A[..1],
        );
        feed(
            &mut p,
            data(1, 5, DIR_INGRESS, 110, &REQ_A[1..]),
            &REQ_A[1..],
        );
        p.on_event(context(true, 120, late, ([0x22; 16], [0x33; 8], [0; 8])));
        feed(&mut p, data(1, 5, DIR_EGRESS, 130, RESP), RESP);
        p.on_event(context(true, 200, 0, ([0x44; 16], [0x55; 8], [0; 8])));
        feed(&mut p, data(1, 5, DIR_INGRESS, 200, REQ_A), REQ_A);
        feed(&mut p, data(1, 5, DIR_EGRESS, 210, RESP), RESP);
        let spans = p.finish();
        assert_eq!(spans.len(), 2, "{spans:#?}");
        assert_eq!(
            (spans[0].trace_id.0, spans[0].span_id.0),
            ([0x22; 16], [0x33; 8])
        );
        assert_eq!(
            (spans[1].trace_id.0, spans[1].span_id.0),
            ([0x44; 16], [0x55; 8])
        );
        assert_eq!(stats.kernel_contexts_adopted.load(Relaxed), 2);
        assert_eq!(stats.kernel_contexts_unmatched.load(Relaxed), 0);
    }

    #[test]
    fn an_all_zero_trace_id_from_the_kernel_is_never_exported() {
        let (mut p, stats) = ids_pipeline();
        let request = b"GET /z HTTP/1.1\r\nHost: x\r\n\
traceparent: 00-00000000000000000000000000000000-7a7a7a7a7a7a7a7a-01\r\n\r\n";
        let client = context(
            false,
            100,
            CONTEXT_FLAG_PARENT | agent_common::CONTEXT_FLAG_REWRITTEN,
            (ZERO_TRACE, [0x7a; 8], [0x11; 8]),
        );
        let server = context(true, 110, 0, ([0x22; 16], [0x33; 8], ZERO_SPAN));
        local_exchange(&mut p, request, Some(client), Some(server));
        let spans = p.finish();
        assert_eq!(spans.len(), 2, "{spans:#?}");
        assert_valid_ids(&spans);
        let client = spans
            .iter()
            .find(|s| s.kind == SpanKind::Client)
            .expect("client");
        let server = spans
            .iter()
            .find(|s| s.kind == SpanKind::Server)
            .expect("server");
        assert_eq!(
            client.parent_span_id, None,
            "its parent was in no valid trace"
        );
        // Same-host pairing still links the callee to its caller, on valid ids.
        assert_eq!(server.trace_id, client.trace_id);
        assert_eq!(server.parent_span_id, Some(client.span_id));
        assert_eq!(stats.kernel_context_ids_invalid.load(Relaxed), 1);
        assert_eq!(stats.spans_invalid_ids_fixed.load(Relaxed), 0);
    }

    /// Zero ids in a server context: the span keeps ids of its own. A zero parent id flagged
    /// as a parent means no parent; the trace and span ids (on the wire already) are kept.
    #[test]
    fn zero_ids_in_kernel_contexts_are_not_adopted() {
        let request = b"GET /s HTTP/1.1\r\nHost: x\r\n\r\n";
        for ids in [
            (ZERO_TRACE, [0x33; 8], ZERO_SPAN),
            ([0x22; 16], ZERO_SPAN, ZERO_SPAN),
        ] {
            let (mut p, stats) = ids_pipeline();
            p.pair_same_host(false, false);
            local_exchange(&mut p, request, None, Some(context(true, 110, 0, ids)));
            let spans = p.finish();
            assert_valid_ids(&spans);
            let server = spans
                .iter()
                .find(|s| s.kind == SpanKind::Server)
                .expect("server");
            assert_ne!(server.trace_id.0, ids.0);
            assert_eq!(stats.kernel_context_ids_invalid.load(Relaxed), 1);
            assert_eq!(stats.kernel_contexts_adopted.load(Relaxed), 0);
        }

        let (mut p, stats) = ids_pipeline();
        p.pair_same_host(false, false);
        let flags = CONTEXT_FLAG_PARENT | agent_common::CONTEXT_FLAG_REWRITTEN;
        let client = context(false, 100, flags, ([0x44; 16], [0x55; 8], ZERO_SPAN));
        let server = context(
            true,
            110,
            CONTEXT_FLAG_PARENT,
            ([0x66; 16], [0x77; 8], ZERO_SPAN),
        );
        local_exchange(&mut p, request, Some(client), Some(server));
        let spans = p.finish();
        assert_eq!(spans.len(), 2, "{spans:#?}");
        assert_valid_ids(&spans);
        for s in &spans {
            assert_eq!(s.parent_span_id, None, "{s:#?}");
            assert!(!s.parent_is_remote);
        }
        let client = spans
            .iter()
            .find(|s| s.kind == SpanKind::Client)
            .expect("client");
        assert_eq!(
            (client.trace_id.0, client.span_id.0),
            ([0x44; 16], [0x55; 8])
        );
        assert_eq!(stats.kernel_context_ids_invalid.load(Relaxed), 2);
        assert_eq!(stats.kernel_contexts_adopted.load(Relaxed), 2);
    }

    fn hex_text(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// `traceparent` values near the valid form: zero, short, upper-case, odd versions.
    fn traceparent_text() -> impl Strategy<Value = String> {
        let id = |n: usize| {
            prop_oneof![
                Just(vec![0u8; n]),
                prop::collection::vec(any::<u8>(), n),
                prop::collection::vec(prop_oneof![Just(0u8), Just(1u8)], n),
            ]
        };
        prop_oneof![
            (any::<u8>(), id(16), id(8), any::<u8>(), ".{0,4}").prop_map(
                |(v, t, s, f, tail)| format!(
                    "{}-{}-{}-{}{tail}",
                    hex_text(&[v]),
                    hex_text(&t),
                    hex_text(&s),
                    hex_text(&[f])
                )
            ),
            (id(16), id(8)).prop_map(|(t, s)| format!(
                "00-{}-{}-01",
                hex_text(&t).to_uppercase(),
                hex_text(&s)
            )),
            "[0-9a-f-]{0,60}",
            ".{0,60}",
        ]
    }

    fn kernel_ids() -> impl Strategy<Value = ([u8; 16], [u8; 8], [u8; 8], u32)> {
        let trace = prop_oneof![Just(ZERO_TRACE), any::<[u8; 16]>()];
        let span = || prop_oneof![Just(ZERO_SPAN), any::<[u8; 8]>()];
        (trace, span(), span(), 0u32..8)
    }

    proptest! {
        /// Whatever `traceparent` a traced client sends and whatever ids the kernel reports
        /// for either side, every span that leaves has valid ids.
        #[test]
        fn no_span_ever_leaves_with_an_invalid_id(
            tp in traceparent_text(),
            client in prop::option::of(kernel_ids()),
            server in prop::option::of(kernel_ids()),
            pairing in any::<bool>(),
        ) {
            let (mut p, stats) = ids_pipeline();
            p.pair_same_host(pairing, false);
            let request = format!("GET /p HTTP/1.1\r\nHost: x\r\ntraceparent: {tp}\r\n\r\n");
            let client = client.map(|(t, s, parent, flags)| context(false, 100, flags, (t, s, parent)));
            let server = server.map(|(t, s, parent, flags)| context(true, 110, flags, (t, s, parent)));
            local_exchange(&mut p, request.as_bytes(), client, server);
            let spans = p.finish();
            prop_assert_eq!(spans.len(), 2);
            for s in &spans {
                prop_assert!(s.has_valid_ids(), "{:?}", s);
            }
            prop_assert_eq!(stats.spans_invalid_ids_fixed.load(Relaxed), 0);
        }
    }

    #[test]
    fn ipv4_mapped_addresses_are_reported_as_ipv4() {
        let mut mapped = [0u8; 16];
        mapped[10] = 0xff;
        mapped[11] = 0xff;
        mapped[12..].copy_from_slice(&[10, 1, 2, 3]);
        let addr = socket_addr(libc::AF_INET6 as u32, mapped, 80);
        assert_eq!(addr.to_string(), "10.1.2.3:80");
    }
}

/// Cost of the event thread per request, without kernel or exporter: replays nginx-like
/// keep-alive exchanges through the pipeline. Deterministic under
/// `valgrind --tool=callgrind` (instructions per request); see BENCHMARKS.md.
#[cfg(test)]
mod replay_cost {
    use agent_common::{DATA_FLAG_ADDRESSES, DIR_EGRESS, EventKind, SyscallKind};

    use super::*;
    use crate::spans::model::SpanRecord;

    struct CountingSink(u64);
    impl SpanSink for CountingSink {
        fn send(&mut self, span: SpanRecord) {
            self.0 += 1;
            std::hint::black_box(span);
        }
    }

    const REQUEST: &[u8] = b"GET /api/items/42?page=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n";
    const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 23 Nov 2026 01:00:00 GMT\r\nContent-Type: text/plain\r\nContent-Length: 6\r\nConnection: keep-alive\r\n\r\nhello\n";

    fn event(cookie: u64, dir: u32, ts: u64, payload: &[u8], first: bool) -> DataEvent {
        DataEvent {
            kind: EventKind::Data as u32,
            direction: dir,
            pid: std::process::id(),
            tid: 1,
            fd: 3,
            syscall: SyscallKind::Read as u32,
            ts_ns: ts,
            first_ts_ns: ts,
            sock_cookie: cookie,
            bytes: payload.len() as u64,
            captured: payload.len() as u32,
            family: libc::AF_INET as u32,
            local_addr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            remote_addr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            local_port: 8080,
            remote_port: 40000 + cookie as u16,
            flags: if first { DATA_FLAG_ADDRESSES } else { 0 },
        }
    }

    #[test]
    #[ignore = "benchmark: cargo test --release -p agent replay_cost -- --ignored --nocapture"]
    fn replay_cost() {
        let requests: u64 = std::env::var("REPLAY_REQUESTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200_000);
        let mut p = Pipeline::new(
            Resources::new("bench"),
            Arc::new(Stats::default()),
            CountingSink(0),
        );
        let start = std::time::Instant::now();
        for i in 0..requests {
            let cookie = i % 16;
            let ts = 1_000 + i * 10;
            let first = i < 16;
            p.on_event(Event::Data {
                header: event(cookie, DIR_INGRESS, ts, REQUEST, first),
                payload: REQUEST,
            });
            p.on_event(Event::Data {
                header: event(cookie, DIR_EGRESS, ts + 5, RESPONSE, false),
                payload: RESPONSE,
            });
        }
        let elapsed = start.elapsed();
        let sink = p.finish();
        assert_eq!(sink.0, requests, "one span per request");
        println!(
            "replay: {requests} requests, {:.0} ns per request (events → spans, no exporter)",
            elapsed.as_nanos() as f64 / requests as f64
        );
    }
}
