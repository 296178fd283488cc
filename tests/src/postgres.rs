//! Real PostgreSQL for the end-to-end tests: a private cluster ([`PgServer`]) and real clients
//! (psql, pgbench, psycopg 3) that report what they sent and when.
//!
//! The server runs as the `postgres` OS user when the tests run as root (PostgreSQL refuses to
//! run as root), as the current user otherwise. It listens on 127.0.0.1 only, or on a network
//! namespace's address ([`PgServer::start_in`]); every client here connects over TCP, never
//! the Unix socket. Without SSL; it logs every statement with the
//! backend pid and the client's port: [`PgServer::statements`] is the server's own account of
//! what it executed, the ground truth to compare spans with.
//!
//! Every client connects with `sslmode=disable gssencmode=disable`, so the first bytes on the
//! wire are the StartupMessage (no SSLRequest / GSSENCRequest).

use serde_json::Value;
use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::Duration;

use crate::clients::{Timing, unix_nanos_now};
use crate::process::{
    ChildGuard, TestDir, poll_until, read_text, run_gated, run_to_completion, tail,
};
use crate::servers::children_of;
use crate::{fixture, free_port, python_bin};

/// The database superuser (`initdb -U`), also the OS user the server runs as under root.
pub const PG_USER: &str = "postgres";
/// `relation "nope" does not exist`.
pub const SQLSTATE_UNDEFINED_TABLE: &str = "42P01";
/// `duplicate key value violates unique constraint`.
pub const SQLSTATE_UNIQUE_VIOLATION: &str = "23505";

/// A script for [`psql_run`]: DDL, DML, a query returning rows, and two failing statements.
pub const PSQL_DEMO: [&str; 8] = [
    "CREATE TABLE e2e_items (id int PRIMARY KEY, name text NOT NULL)",
    "INSERT INTO e2e_items VALUES (1, 'one'), (2, 'two'), (3, 'three')",
    "SELECT id, name FROM e2e_items WHERE id >= 2 ORDER BY id",
    "SELECT * FROM nope",
    "UPDATE e2e_items SET name = 'TWO' WHERE id = 2",
    "INSERT INTO e2e_items VALUES (1, 'again')",
    "DELETE FROM e2e_items WHERE id = 3",
    "DROP TABLE e2e_items",
];
/// The failing statements of [`PSQL_DEMO`]: (index, SQLSTATE).
pub const PSQL_DEMO_ERRORS: [(usize, &str); 2] = [
    (3, SQLSTATE_UNDEFINED_TABLE),
    (5, SQLSTATE_UNIQUE_VIOLATION),
];

/// Statements pgbench runs on its setup connection before the client connections open (for a
/// builtin script with `-n`): `select count(*) from pgbench_branches` and a query of the
/// partitioning of `pgbench_accounts`.
pub const PGBENCH_SETUP_STATEMENTS: usize = 2;

/// How every cluster is made (`initdb -D <data>` and these): trust authentication, the
/// superuser [`PG_USER`], C locale (English messages), no fsync of the new files.
pub const INITDB_OPTIONS: [&str; 9] = [
    "-A",
    "trust",
    "-U",
    PG_USER,
    "-E",
    "UTF8",
    "--locale=C",
    "--no-sync",
    "--no-instructions",
];
/// Settings of every cluster, besides its port, listen address and socket directory: no SSL
/// (the first bytes on the wire are the StartupMessage), no fsync, no autovacuum (no
/// background workers come and go), English messages.
pub const SERVER_SETTINGS: [&str; 4] = ["ssl=off", "fsync=off", "autovacuum=off", "lc_messages=C"];
/// What the end-to-end tests' clusters add: every statement and connection logged (the
/// ground truth of [`PgServer::statements`]), fewer durability costs and connections.
const TEST_SETTINGS: [&str; 7] = [
    "synchronous_commit=off",
    "full_page_writes=off",
    "max_connections=30",
    "log_statement=all",
    "log_min_error_statement=error",
    "log_connections=on",
    "log_disconnections=on",
];

const START_TIMEOUT: Duration = Duration::from_secs(15);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
const LOG_LINE_PREFIX: &str = "PGLOG pid=%p remote=%r sqlstate=%e app=%a| ";

/// The directory of the PostgreSQL server binaries (`initdb`, `postgres`, `psql`, `pgbench`):
/// `E2E_PG_BINDIR`, else the newest `/usr/lib/postgresql/<major>/bin` (Debian's layout; the
/// `/usr/bin` wrappers are perl scripts that pick a cluster, not wanted here).
pub fn pg_bindir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("E2E_PG_BINDIR") {
            return PathBuf::from(dir);
        }
        let mut majors: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let major = e.file_name().to_str()?.parse::<u32>().ok()?;
                let bin = e.path().join("bin");
                bin.join("postgres").exists().then_some((major, bin))
            })
            .collect();
        majors.sort();
        majors.pop().map(|(_, bin)| bin).unwrap_or_else(|| {
            panic!(
                "no PostgreSQL server under /usr/lib/postgresql/*/bin (or set E2E_PG_BINDIR); \
                 install it: apt-get install -y postgresql"
            )
        })
    })
}

/// A PostgreSQL program from [`pg_bindir`].
pub fn pg_bin(program: &str) -> PathBuf {
    let path = pg_bindir().join(program);
    assert!(
        path.exists(),
        "{} is missing; apt-get install -y postgresql",
        path.display()
    );
    path
}

/// uid/gid of the `postgres` OS user when running as root (None otherwise: run as ourselves).
fn server_os_user() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    static USER: OnceLock<(u32, u32)> = OnceLock::new();
    Some(*USER.get_or_init(|| {
        let name = CString::new(PG_USER).expect("no NUL in user name");
        // SAFETY: getpwnam returns NULL or a pointer to static storage, read at once; the
        // OnceLock keeps other threads of this crate from calling it concurrently here.
        let pw = unsafe { libc::getpwnam(name.as_ptr()) };
        assert!(
            !pw.is_null(),
            "running as root, PostgreSQL needs an unprivileged OS user `{PG_USER}` to run as \
             (created by `apt-get install -y postgresql`)"
        );
        // SAFETY: non-null pointer returned by getpwnam.
        unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
    }))
}

fn run_as(cmd: &mut Command, user: Option<(u32, u32)>) {
    if let Some((uid, gid)) = user {
        cmd.uid(uid).gid(gid);
    }
}

fn make_dir_for(path: &Path, user: Option<(u32, u32)>) {
    fs::create_dir_all(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown {} to {PG_USER}: {e}", path.display()));
    }
}

/// Where clusters live: `E2E_PG_DATA_ROOT`, else `/dev/shm/agent-e2e` (tmpfs: on this VM's
/// disk, copying a cluster takes 0.6-1.2 s and initdb 1-1.6 s; on tmpfs 0.1 s and 0.7 s), else
/// `<tmp>/agent-e2e`.
fn data_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        if let Some(root) = std::env::var_os("E2E_PG_DATA_ROOT") {
            return PathBuf::from(root);
        }
        let shm = Path::new("/dev/shm/agent-e2e");
        let probe = shm.join(format!(".probe-{}", std::process::id()));
        if fs::create_dir_all(&probe).is_ok() {
            let _ = fs::remove_dir(&probe);
            return shm.to_path_buf();
        }
        std::env::temp_dir().join("agent-e2e")
    })
}

/// A cluster's data directory under [`data_root`]; like a [`TestDir`], removed on drop unless
/// the test is panicking or `E2E_KEEP` is set.
struct DataDir(PathBuf);

impl DataDir {
    fn new() -> DataDir {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = data_root().join(format!("pg-data-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        DataDir(path)
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        if thread::panicking() || std::env::var_os("E2E_KEEP").is_some() {
            eprintln!("[e2e] kept {} for inspection", self.0.display());
        } else {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// The data directory of a cluster made by initdb for this PostgreSQL version and OS user,
/// never started, copied by every [`PgServer::start`]. Made once and kept (about 30 MB) under
/// [`data_root`]; made in a private directory and renamed into place, so concurrent test
/// binaries never see a half-made one.
fn pg_template(user: Option<(u32, u32)>) -> &'static Path {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let mut version = Command::new(pg_bin("postgres"));
        version.arg("--version");
        let (_, out, _, _) = run_to_completion("postgres-version", version, START_TIMEOUT);
        // `postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)`
        let version = out
            .split_whitespace()
            .nth(2)
            .unwrap_or("unknown")
            .to_string();
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        let base = data_root();
        fs::create_dir_all(base).unwrap_or_else(|e| panic!("create {}: {e}", base.display()));
        // Bump the suffix when the initdb options below change.
        let dir = base.join(format!("pg-template-{version}-uid{euid}-v1"));
        let data = dir.join("data");
        if data.join("PG_VERSION").exists() {
            return data;
        }
        let building = base.join(format!(
            "pg-template-{version}-uid{euid}-v1.tmp-{}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&building);
        make_dir_for(&building, user);
        let mut initdb = Command::new(pg_bin("initdb"));
        initdb
            .arg("-D")
            .arg(building.join("data"))
            .args(INITDB_OPTIONS)
            .current_dir(&building)
            .env("LC_ALL", "C");
        run_as(&mut initdb, user);
        let (status, stdout, stderr, _) = run_to_completion("initdb", initdb, START_TIMEOUT);
        assert!(
            status.success(),
            "initdb failed ({status})\nstdout:\n{}\nstderr:\n{}",
            tail(&stdout, 20),
            tail(&stderr, 20)
        );
        if fs::rename(&building, &dir).is_err() {
            // Another test binary got there first.
            let _ = fs::remove_dir_all(&building);
        }
        assert!(
            data.join("PG_VERSION").exists(),
            "no template cluster at {}",
            data.display()
        );
        data
    })
}

/// A private PostgreSQL cluster on 127.0.0.1:<free port>: a copy of a cluster made once by
/// initdb, on tmpfs when there is one (`/dev/shm/agent-e2e/pg-data-*`); log and Unix socket in
/// a [`TestDir`]. Dropping it does a fast shutdown (SIGINT), then SIGKILLs the process group,
/// also while a test panics (then the server log's tail is printed and the directories kept).
///
/// Made with [`INITDB_OPTIONS`], run with [`SERVER_SETTINGS`] and, for the tests, every
/// statement and connection logged.
pub struct PgServer {
    child: ChildGuard,
    /// The address it listens on (127.0.0.1, or a network namespace's address).
    address: String,
    port: u16,
    data: DataDir,
    socket_dir: PathBuf,
    log: PathBuf,
    dir: TestDir,
    /// Started with `ssl=on`: clients connect with `sslmode=require`.
    tls: bool,
}

impl PgServer {
    /// Copies the template cluster and starts it, waiting until the postmaster accepts
    /// connections: about 0.2 s (plus about 1 s for initdb the first time on a machine).
    pub fn start() -> PgServer {
        Self::start_impl(None, None, None)
    }

    /// The same cluster with `ssl = on`, serving the certificate `cert` with key `key` (PEM
    /// files, copied into the server's directory, owned by its OS user with mode 0600 as
    /// PostgreSQL demands). Its clients ([`PgServer::client_command`], [`PgServer::conninfo`])
    /// connect with `sslmode=require`.
    pub fn start_tls(cert: &Path, key: &Path) -> PgServer {
        Self::start_impl(None, None, Some((cert, key)))
    }

    /// The cluster as `cargo xtask bench` measures it: [`SERVER_SETTINGS`] only (no
    /// statement or connection log: each would cost every query a log write), the postmaster
    /// pinned on `cpu` with `taskset -c` (every backend it forks inherits that).
    pub fn start_bench(cpu: &str) -> PgServer {
        Self::start_impl(None, Some(cpu), None)
    }

    /// The same cluster in a network namespace ("host"), listening on the host's address
    /// only: `ip netns exec <ns> setpriv --reuid postgres ... postgres ...` (the pid is the
    /// postmaster's: both exec). Clients anywhere reach it at [`PgServer::address`].
    pub fn start_in(host: &crate::netns::Host) -> PgServer {
        Self::start_impl(Some(host), None, None)
    }

    /// `bench_cpu`: benchmark settings, pinned on that CPU (see [`PgServer::start_bench`]).
    /// `tls`: certificate and key to serve with `ssl=on`.
    fn start_impl(
        host: Option<&crate::netns::Host>,
        bench_cpu: Option<&str>,
        tls: Option<(&Path, &Path)>,
    ) -> PgServer {
        let address = host.map_or_else(|| "127.0.0.1".to_string(), |h| h.ip().to_string());
        let dir = TestDir::new("pg");
        let user = server_os_user();
        let root = dir.join("pg");
        make_dir_for(&root, user);
        let socket_dir = root.join("sock");
        make_dir_for(&socket_dir, user);
        let tls_settings: Vec<String> = match tls {
            None => Vec::new(),
            Some((cert, key)) => {
                let mut settings = vec!["ssl=on".to_string()];
                for (from, name, setting) in [
                    (cert, "server.crt", "ssl_cert_file"),
                    (key, "server.key", "ssl_key_file"),
                ] {
                    let to = root.join(name);
                    fs::copy(from, &to).unwrap_or_else(|e| {
                        panic!("copy {} to {}: {e}", from.display(), to.display())
                    });
                    {
                        use std::os::unix::fs::PermissionsExt as _;
                        fs::set_permissions(&to, fs::Permissions::from_mode(0o600))
                            .unwrap_or_else(|e| panic!("chmod 0600 {}: {e}", to.display()));
                    }
                    if let Some((uid, gid)) = user {
                        std::os::unix::fs::chown(&to, Some(uid), Some(gid))
                            .unwrap_or_else(|e| panic!("chown {} to {PG_USER}: {e}", to.display()));
                    }
                    settings.push(format!("{setting}={}", to.display()));
                }
                settings
            }
        };
        let data = DataDir::new();
        let data_dir = data.0.clone();

        let mut copy = Command::new("cp");
        copy.arg("-a").arg(pg_template(user)).arg(&data_dir);
        let (status, _, stderr, _) = run_to_completion("cp-pgdata", copy, START_TIMEOUT);
        assert!(
            status.success(),
            "copying the template cluster failed: {stderr}"
        );

        let mut last_error = String::new();
        for attempt in 0..3 {
            let port = free_port();
            let log = dir.join(&format!("postgres-{attempt}.log"));
            let mut cmd = match (host, user) {
                (None, _) => match bench_cpu {
                    // taskset execs postgres: the child's pid is the postmaster's.
                    Some(cpu) => {
                        let mut cmd = Command::new("taskset");
                        cmd.args(["-c", cpu]).arg(pg_bin("postgres"));
                        cmd
                    }
                    None => Command::new(pg_bin("postgres")),
                },
                (Some(host), None) => host.command(pg_bin("postgres")),
                // `ip netns exec` needs root: drop to the postgres user inside, and keep the
                // parent-death signal (a change of uid clears it).
                (Some(host), Some((uid, gid))) => {
                    let mut cmd = host.command("setpriv");
                    cmd.args(["--reuid", &uid.to_string(), "--regid", &gid.to_string()])
                        .args(["--clear-groups", "--pdeathsig", "KILL", "--"])
                        .arg(pg_bin("postgres"));
                    cmd
                }
            };
            cmd.arg("-D").arg(&data_dir).arg("-p").arg(port.to_string());
            let socket_setting = format!("unix_socket_directories={}", socket_dir.display());
            let prefix_setting = format!("log_line_prefix={LOG_LINE_PREFIX}");
            let listen_setting = format!("listen_addresses={address}");
            // In a namespace, clients come from other hosts' addresses: trust them all (the
            // template's pg_hba.conf trusts loopback only).
            let hba_file = root.join("pg_hba.conf");
            let hba_setting = format!("hba_file={}", hba_file.display());
            if host.is_some() {
                fs::write(
                    &hba_file,
                    "local all all trust\nhost all all 0.0.0.0/0 trust\n",
                )
                .unwrap_or_else(|e| panic!("write {}: {e}", hba_file.display()));
            }
            let mut settings = vec![listen_setting.as_str(), socket_setting.as_str()];
            if host.is_some() {
                settings.push(hba_setting.as_str());
            }
            // `ssl=on` replaces the default settings' `ssl=off`.
            settings.extend(
                SERVER_SETTINGS
                    .iter()
                    .filter(|s| tls.is_none() || !s.starts_with("ssl=")),
            );
            settings.extend(tls_settings.iter().map(String::as_str));
            if bench_cpu.is_none() {
                settings.extend(TEST_SETTINGS);
                settings.push(prefix_setting.as_str());
            }
            for setting in settings {
                cmd.arg("-c").arg(setting);
            }
            cmd.current_dir(&root).env("LC_ALL", "C");
            if host.is_none() {
                run_as(&mut cmd, user);
            }
            let mut child = ChildGuard::spawn("postgres", cmd, &log, &log);
            let pid_file = data_dir.join("postmaster.pid");
            let ready = poll_until(START_TIMEOUT, || {
                if child.try_wait().is_some() {
                    return Some(false);
                }
                // The last line of postmaster.pid is the postmaster's status ("ready" once it
                // accepts connections, PostgreSQL >= 10).
                let status = read_text(&pid_file);
                let ready = status.lines().nth(7).map(str::trim) == Some("ready");
                // (No TCP probe: a probe is a connection, logged and seen by the agent.)
                ready.then_some(true)
            });
            if ready == Some(true) {
                return PgServer {
                    child,
                    address,
                    port,
                    data,
                    socket_dir,
                    log,
                    dir,
                    tls: tls.is_some(),
                };
            }
            let text = read_text(&log);
            last_error = format!(
                "attempt {attempt} on port {port}: exited={:?}\nlog:\n{}",
                child.try_wait(),
                tail(&text, 30)
            );
            drop(child);
            if !text.contains("could not bind") && !text.contains("could not create listen") {
                break;
            }
        }
        panic!("could not start PostgreSQL: {last_error}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address it listens on: 127.0.0.1, or its network namespace's address.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The postmaster: it accepts connections and forks one backend per connection.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data.0
    }

    /// The [`TestDir`] with the server log and the Unix socket directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The server log so far (statements, connections, errors; see [`PgServer::log_entries`]).
    pub fn log(&self) -> String {
        read_text(&self.log)
    }

    /// A client of this server: `program` without any inherited `PG*` variable, with libpq's
    /// variables set to reach database `db` over TCP as [`PG_USER`], without SSL or GSS
    /// (with `sslmode=require` when the server was started with [`PgServer::start_tls`]).
    pub fn client_command(&self, program: impl AsRef<OsStr>, db: &str) -> Command {
        let mut cmd = Command::new(program);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                cmd.env_remove(key);
            }
        }
        cmd.env("PGHOST", &self.address)
            .env("PGPORT", self.port.to_string())
            .env("PGUSER", PG_USER)
            .env("PGDATABASE", db)
            .env("PGSSLMODE", self.ssl_mode())
            .env("PGGSSENCMODE", "disable")
            .env("PGCONNECT_TIMEOUT", "10");
        cmd
    }

    /// libpq connection string for `db` over TCP, e.g. for psycopg.
    pub fn conninfo(&self, db: &str) -> String {
        format!(
            "host={} port={} user={PG_USER} dbname={db} sslmode={} gssencmode=disable",
            self.address,
            self.port,
            self.ssl_mode()
        )
    }

    /// `require` for a server started with [`PgServer::start_tls`], else `disable`.
    pub fn ssl_mode(&self) -> &'static str {
        if self.tls { "require" } else { "disable" }
    }

    /// The same as a URL: `postgresql://postgres@127.0.0.1:<port>/<db>?sslmode=disable`.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgresql://{PG_USER}@{}:{}/{db}?sslmode={}&gssencmode=disable",
            self.address,
            self.port,
            self.ssl_mode()
        )
    }

    /// Every child of the postmaster: background processes (checkpointer, background writer,
    /// walwriter, autovacuum launcher, logical replication launcher) and client backends.
    pub fn children(&self) -> Vec<u32> {
        children_of(self.pid())
    }

    /// The client backends alive now (one per open connection), from their process titles.
    pub fn backends(&self) -> Vec<PgBackend> {
        self.children()
            .into_iter()
            .filter_map(|pid| {
                let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                parse_backend_title(pid, &String::from_utf8_lossy(&raw))
            })
            .collect()
    }

    /// Pids of [`PgServer::backends`].
    pub fn backend_pids(&self) -> Vec<u32> {
        self.backends().into_iter().map(|b| b.pid).collect()
    }

    /// Runs `sql` with `psql -c` in database `postgres`; panics if it fails; returns the
    /// unaligned, tuples-only output. (It opens a connection of its own: a backend, and
    /// statements in the log, with application `e2e-admin`.)
    pub fn psql(&self, sql: &str) -> String {
        self.psql_in("postgres", sql)
    }

    /// [`PgServer::psql`] in database `db`.
    pub fn psql_in(&self, db: &str, sql: &str) -> String {
        let mut cmd = self.client_command(pg_bin("psql"), db);
        cmd.env("PGAPPNAME", "e2e-admin").args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ]);
        let (status, stdout, stderr, _) = run_to_completion("psql", cmd, CLIENT_TIMEOUT);
        assert!(
            status.success(),
            "psql -c {sql:?} on port {} failed ({status})\nstdout:\n{}\nstderr:\n{}\nserver log:\n{}",
            self.port,
            tail(&stdout, 20),
            tail(&stderr, 20),
            tail(&self.log(), 20)
        );
        stdout.trim_end().to_string()
    }

    /// `CREATE DATABASE <name>`.
    pub fn createdb(&self, name: &str) {
        self.psql(&format!("CREATE DATABASE \"{name}\""));
    }

    /// The server log parsed into entries (continuation lines joined with `\n`).
    pub fn log_entries(&self) -> Vec<PgLogEntry> {
        parse_pg_log(&self.log())
    }

    /// Every statement the server logged, in order: what it executed (`statement:` for the
    /// simple query protocol, `execute <name>:` for the extended one) and what failed, with
    /// the SQLSTATE. Logged before execution, so complete once the client got its answer.
    pub fn statements(&self) -> Vec<ServerStatement> {
        server_statements(&self.log_entries())
    }

    /// The backend that served the client connection from 127.0.0.1:`client_port`
    /// (`connection received` log line).
    pub fn backend_for_client_port(&self, client_port: u16) -> Option<u32> {
        self.log_entries()
            .iter()
            .find(|e| {
                e.message
                    .strip_prefix("connection received: host=127.0.0.1 port=")
                    .and_then(|p| p.trim().parse::<u16>().ok())
                    == Some(client_port)
            })
            .map(|e| e.pid)
    }

    /// Fast shutdown (SIGINT: open sessions are terminated, a checkpoint is written) and the
    /// log; panics if the postmaster is still there after 5 s.
    pub fn stop(mut self) -> String {
        let done = self.fast_shutdown();
        let log = self.log();
        assert!(
            done,
            "PostgreSQL (postmaster {}) did not finish a fast shutdown within {STOP_TIMEOUT:?}\nlog:\n{}",
            self.pid(),
            tail(&log, 30)
        );
        log
    }

    fn fast_shutdown(&mut self) -> bool {
        if self.child.try_wait().is_none() {
            self.child.signal(libc::SIGINT);
        }
        let done = self.child.wait_timeout(STOP_TIMEOUT).is_some();
        // Whatever is left of the group (nothing after a clean shutdown).
        self.child.kill();
        done
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "[e2e] PostgreSQL (postmaster {}, port {}, dir {}) log:\n{}",
                self.pid(),
                self.port,
                self.dir.path().display(),
                tail(&self.log(), 40)
            );
        }
        if !self.fast_shutdown() {
            eprintln!(
                "[e2e] PostgreSQL (postmaster {}) ignored the fast shutdown; killed",
                self.pid()
            );
        }
    }
}

/// A client backend, from its process title
/// (`postgres: <user> <database> <host>(<port>) <state>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgBackend {
    pub pid: u32,
    pub user: String,
    pub database: String,
    /// The client's port (None for a Unix-socket connection, `[local]`).
    pub client_port: Option<u16>,
    /// The whole title, e.g. `postgres: postgres bench 127.0.0.1(53728) idle`.
    pub title: String,
}

fn parse_backend_title(pid: u32, cmdline: &str) -> Option<PgBackend> {
    let title = cmdline.trim_end_matches(['\0', ' ']).replace('\0', " ");
    let words: Vec<&str> = title
        .strip_prefix("postgres: ")?
        .split_whitespace()
        .collect();
    let at = words
        .iter()
        .position(|w| *w == "[local]" || (w.ends_with(')') && w.contains('(')))?;
    if at < 2 {
        return None;
    }
    let client_port = words[at]
        .rsplit_once('(')
        .and_then(|(_, p)| p.trim_end_matches(')').parse().ok());
    Some(PgBackend {
        pid,
        user: words[at - 2].to_string(),
        database: words[at - 1].to_string(),
        client_port,
        title: title.trim().to_string(),
    })
}

/// One message of the server log (`log_line_prefix` = `PGLOG pid=%p remote=%r sqlstate=%e
/// app=%a| `).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgLogEntry {
    /// The process that logged it (a backend, or the postmaster and background processes).
    pub pid: u32,
    /// The client's port of that backend's connection.
    pub remote_port: Option<u16>,
    /// `00000` unless an error.
    pub sqlstate: String,
    /// The client's `application_name` (`[unknown]` before authentication).
    pub application: String,
    /// `LOG`, `ERROR`, `DETAIL`, `STATEMENT`, `FATAL`, ...
    pub severity: String,
    pub message: String,
}

pub fn parse_pg_log(text: &str) -> Vec<PgLogEntry> {
    let mut entries: Vec<PgLogEntry> = Vec::new();
    for line in text.lines() {
        if let Some(entry) = parse_pg_log_line(line) {
            entries.push(entry);
        } else if let (Some(cont), Some(last)) = (line.strip_prefix('\t'), entries.last_mut()) {
            last.message.push('\n');
            last.message.push_str(cont);
        }
    }
    entries
}

fn parse_pg_log_line(line: &str) -> Option<PgLogEntry> {
    let rest = line.strip_prefix("PGLOG pid=")?;
    let (pid, rest) = rest.split_once(" remote=")?;
    let (remote, rest) = rest.split_once(" sqlstate=")?;
    let (sqlstate, rest) = rest.split_once(" app=")?;
    let (application, rest) = rest.split_once("| ")?;
    let (severity, message) = rest.split_once(":  ")?;
    Some(PgLogEntry {
        pid: pid.parse().ok()?,
        remote_port: remote
            .rsplit_once('(')
            .and_then(|(_, p)| p.trim_end_matches(')').parse().ok()),
        sqlstate: sqlstate.to_string(),
        application: application.to_string(),
        severity: severity.to_string(),
        message: message.to_string(),
    })
}

/// How a logged statement reached the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerProtocol {
    /// Simple query protocol (`Query` message; logged as `statement: ...`).
    Simple,
    /// Extended protocol: the `Execute` of prepared statement `name` (`<unnamed>` for the
    /// unnamed statement; `name/portal` when the portal is named).
    Extended { name: String },
    /// Failed before the server logged it (syntax error in a Query, error at Parse or Bind):
    /// known only from the error's `STATEMENT:` line.
    NotLogged,
}

/// A statement as the server saw it (see [`PgServer::statements`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerStatement {
    pub backend_pid: u32,
    pub client_port: Option<u16>,
    pub application: String,
    pub protocol: ServerProtocol,
    /// The text as received (placeholders `$1`..., psql's trailing `;` included).
    pub sql: String,
    /// Bind parameters as logged (`$1 = '4789'`), extended protocol only.
    pub parameters: Option<String>,
    /// The SQLSTATE of the error it raised.
    pub sqlstate: Option<String>,
    pub error_message: Option<String>,
}

pub fn server_statements(entries: &[PgLogEntry]) -> Vec<ServerStatement> {
    /// What a backend's previous entry left open.
    #[derive(Clone, Copy)]
    enum Last {
        /// A statement was just logged: an ERROR next may be its own.
        Statement(usize),
        /// An ERROR (entry index), waiting for its STATEMENT line; `candidate` is the statement
        /// logged just before it (the error is its own if the texts match, else that of a
        /// statement that failed before it could be logged, e.g. at Parse in a pipeline).
        Error {
            candidate: Option<usize>,
            entry: usize,
        },
        Other,
    }
    fn set_error(s: &mut ServerStatement, error: &PgLogEntry) {
        s.sqlstate = Some(error.sqlstate.clone());
        s.error_message = Some(error.message.clone());
    }
    /// An ERROR that got no STATEMENT line belongs to the statement logged before it.
    fn close(last: Last, out: &mut [ServerStatement], entries: &[PgLogEntry]) {
        if let Last::Error {
            candidate: Some(i),
            entry,
        } = last
        {
            set_error(&mut out[i], &entries[entry]);
        }
    }
    let mut out: Vec<ServerStatement> = Vec::new();
    let mut last: HashMap<u32, Last> = HashMap::new();
    for (n, e) in entries.iter().enumerate() {
        let prev = last.remove(&e.pid).unwrap_or(Last::Other);
        let new_statement = |protocol: ServerProtocol, sql: &str| ServerStatement {
            backend_pid: e.pid,
            client_port: e.remote_port,
            application: e.application.clone(),
            protocol,
            sql: sql.to_string(),
            parameters: None,
            sqlstate: None,
            error_message: None,
        };
        let next = match (e.severity.as_str(), prev) {
            ("DETAIL", Last::Statement(i)) => {
                if let Some(params) = e.message.strip_prefix("parameters: ") {
                    out[i].parameters = Some(params.to_string());
                }
                prev
            }
            // Details of an error come between its ERROR and STATEMENT lines.
            ("DETAIL" | "HINT" | "CONTEXT", Last::Error { .. }) => prev,
            ("STATEMENT", Last::Error { candidate, entry }) => {
                match candidate {
                    Some(i) if out[i].sql == e.message && out[i].sqlstate.is_none() => {
                        set_error(&mut out[i], &entries[entry]);
                    }
                    _ => {
                        let mut s = new_statement(ServerProtocol::NotLogged, &e.message);
                        set_error(&mut s, &entries[entry]);
                        out.push(s);
                    }
                }
                Last::Other
            }
            ("ERROR", prev) => {
                close(prev, &mut out, entries);
                let candidate = match prev {
                    Last::Statement(i) => Some(i),
                    _ => None,
                };
                Last::Error {
                    candidate,
                    entry: n,
                }
            }
            ("LOG", prev) => {
                close(prev, &mut out, entries);
                if let Some(sql) = e.message.strip_prefix("statement: ") {
                    out.push(new_statement(ServerProtocol::Simple, sql));
                    Last::Statement(out.len() - 1)
                } else if let Some((name, sql)) = e
                    .message
                    .strip_prefix("execute ")
                    .and_then(|m| m.split_once(": "))
                {
                    let protocol = ServerProtocol::Extended {
                        name: name.to_string(),
                    };
                    out.push(new_statement(protocol, sql));
                    Last::Statement(out.len() - 1)
                } else {
                    Last::Other
                }
            }
            (_, prev) => {
                close(prev, &mut out, entries);
                Last::Other
            }
        };
        last.insert(e.pid, next);
    }
    for (_, open) in last {
        close(open, &mut out, entries);
    }
    out
}

/// A statement's error as psql reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgError {
    pub sqlstate: String,
    pub message: String,
}

/// One statement of a [`psql_run`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PsqlStatement {
    /// What the server receives: the statement with psql's terminating `;`.
    pub sql: String,
    pub error: Option<PgError>,
    /// psql's own `\timing` of the statement (send → result), microsecond resolution.
    pub client_duration_nanos: u64,
}

/// The outcome of [`psql_run`].
#[derive(Debug, Clone)]
pub struct PsqlRun {
    /// The psql process (application_name `psql`).
    pub pid: u32,
    pub statements: Vec<PsqlStatement>,
    /// Window: from before psql was spawned to after it exited (one connection, every statement).
    pub timing: Timing,
    pub stdout: String,
    pub stderr: String,
}

impl PsqlRun {
    /// (index, SQLSTATE) of the failed statements.
    pub fn errors(&self) -> Vec<(usize, &str)> {
        self.statements
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((i, s.error.as_ref()?.sqlstate.as_str())))
            .collect()
    }
}

/// Runs `statements` (one line each, no trailing `;`) as a script file with `psql -f` on one
/// TCP connection to `db`: psql sends each statement as its own Query message (simple query
/// protocol) and goes on after errors. Nothing else is sent (`-X`: no psqlrc; `\timing` is
/// client-side). Panics unless psql exits 0 and reports a timing for every statement.
pub fn psql_run(server: &PgServer, db: &str, statements: &[&str]) -> PsqlRun {
    psql_run_impl(server, db, statements, None::<fn(u32) -> bool>)
}

/// [`psql_run`] held at a gate until `open(pid)` says go (e.g. the agent attached to psql's
/// TLS library): psql starts connected over the server's Unix socket (nothing the agent
/// parses) and reads its script from stdin, which opens with `\connect` to the server's TCP
/// address (with the server's `sslmode`); the script is written once the gate opens, so the
/// TCP connection, its start-up and every statement come after it.
pub fn psql_run_gated(
    server: &PgServer,
    db: &str,
    statements: &[&str],
    open: impl FnMut(u32) -> bool,
) -> PsqlRun {
    psql_run_impl(server, db, statements, Some(open))
}

fn psql_run_impl(
    server: &PgServer,
    db: &str,
    statements: &[&str],
    gate: Option<impl FnMut(u32) -> bool>,
) -> PsqlRun {
    let dir = TestDir::new("psql_run");
    let script = dir.join("script.sql");
    let mut text = String::from("\\timing on\n");
    if gate.is_some() {
        text.push_str(&format!(
            "\\connect 'host={} port={} user={PG_USER} dbname={db} sslmode={} gssencmode=disable'\n",
            server.address(),
            server.port(),
            server.ssl_mode()
        ));
    }
    // The script line of the first statement.
    let first_line = if gate.is_some() { 3 } else { 2 };
    for sql in statements {
        assert!(
            !sql.contains('\n') && !sql.trim_end().ends_with(';'),
            "psql_run statements are single lines without `;`: {sql:?}"
        );
        text.push_str(sql);
        text.push_str(";\n");
    }
    fs::write(&script, &text).expect("write psql script");
    let mut cmd = server.client_command(pg_bin("psql"), db);
    cmd.args(["-X", "-v", "VERBOSITY=verbose", "-f"]);
    let mut start = unix_nanos_now();
    let (status, stdout, stderr, pid) = match gate {
        None => {
            cmd.arg(&script);
            run_to_completion("psql", cmd, CLIENT_TIMEOUT)
        }
        Some(mut open) => {
            cmd.arg("-").env("PGHOST", server.socket_dir());
            run_gated(
                "psql",
                cmd,
                |pid| {
                    start = unix_nanos_now();
                    open(pid)
                },
                text.as_bytes(),
                CLIENT_TIMEOUT,
            )
        }
    };
    let end = unix_nanos_now();
    let durations: Vec<u64> = stdout.lines().filter_map(parse_psql_timing).collect();
    let mut errors: HashMap<usize, PgError> = HashMap::new();
    for line in stderr.lines() {
        if let Some((line_no, error)) = parse_psql_error(line) {
            // Line 1 is `\timing on` (then the `\connect`); statement i follows.
            errors.insert(line_no.saturating_sub(first_line), error);
        }
    }
    if !status.success() || durations.len() != statements.len() {
        panic!(
            "psql -f (pid {pid}) failed: exit {status}, {} timings for {} statements\nstdout:\n{}\nstderr:\n{}",
            durations.len(),
            statements.len(),
            tail(&stdout, 40),
            tail(&stderr, 40)
        );
    }
    PsqlRun {
        pid,
        statements: statements
            .iter()
            .zip(durations)
            .enumerate()
            .map(|(i, (sql, duration))| PsqlStatement {
                sql: format!("{sql};"),
                error: errors.remove(&i),
                client_duration_nanos: duration,
            })
            .collect(),
        timing: Timing {
            start_unix_nanos: start,
            end_unix_nanos: end,
            duration_nanos: end - start,
        },
        stdout,
        stderr,
    }
}

/// `Time: 0.304 ms` or `Time: 1234.567 ms (00:01.235)`.
fn parse_psql_timing(line: &str) -> Option<u64> {
    let ms: f64 = line
        .strip_prefix("Time: ")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((ms * 1e6).round() as u64)
}

/// `psql:/path/script.sql:5: ERROR:  42P01: relation "nope" does not exist`.
fn parse_psql_error(line: &str) -> Option<(usize, PgError)> {
    let (location, rest) = line.split_once(": ERROR:  ")?;
    let line_no = location.rsplit(':').next()?.parse().ok()?;
    let (sqlstate, message) = rest.split_once(": ")?;
    (sqlstate.len() == 5).then(|| {
        (
            line_no,
            PgError {
                sqlstate: sqlstate.to_string(),
                message: message.to_string(),
            },
        )
    })
}

/// pgbench's `-M`: how each statement is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgbenchMode {
    /// One Query message per statement (parameters interpolated).
    Simple,
    /// Parse/Bind/Describe/Execute/Sync of the unnamed statement, every time.
    Extended,
    /// Parse of a named statement (`P_0`, `P_1`, ...) once per connection, then Bind/Execute.
    Prepared,
}

impl PgbenchMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PgbenchMode::Simple => "simple",
            PgbenchMode::Extended => "extended",
            PgbenchMode::Prepared => "prepared",
        }
    }
}

/// A builtin pgbench script (`-b`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgbenchScript {
    /// `BEGIN; UPDATE accounts; SELECT accounts; UPDATE tellers; UPDATE branches;
    /// INSERT history; END;`
    TpcbLike,
    /// `SELECT abalance FROM pgbench_accounts WHERE aid = :aid;`
    SelectOnly,
}

impl PgbenchScript {
    pub fn name(self) -> &'static str {
        match self {
            PgbenchScript::TpcbLike => "tpcb-like",
            PgbenchScript::SelectOnly => "select-only",
        }
    }

    /// SQL statements per transaction (checked against `pgbench --show-script` by the
    /// harness self-tests).
    pub fn statements_per_transaction(self) -> usize {
        match self {
            PgbenchScript::TpcbLike => 7,
            PgbenchScript::SelectOnly => 1,
        }
    }
}

/// The SQL statements of a builtin script, from `pgbench --show-script` (meta-commands such as
/// `\set` are client-side and not included).
pub fn pgbench_script_statements(script: PgbenchScript) -> Vec<String> {
    let mut cmd = Command::new(pg_bin("pgbench"));
    cmd.arg(format!("--show-script={}", script.name()));
    let (status, stdout, stderr, _) = run_to_completion("pgbench", cmd, CLIENT_TIMEOUT);
    assert!(status.success(), "pgbench --show-script failed: {stderr}");
    format!("{stdout}\n{stderr}")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("--") && !l.starts_with('\\'))
        .map(str::to_string)
        .collect()
}

/// The outcome of [`pgbench_init`].
#[derive(Debug, Clone)]
pub struct PgbenchInit {
    pub pid: u32,
    pub timing: Timing,
    pub stderr: String,
}

/// `pgbench -i -s <scale>` in `db` (creates and fills the pgbench tables; 100 000 accounts per
/// unit of scale).
pub fn pgbench_init(server: &PgServer, db: &str, scale: u32) -> PgbenchInit {
    let mut cmd = server.client_command(pg_bin("pgbench"), db);
    cmd.args(["-i", "-q", "-s", &scale.to_string()]);
    let start = unix_nanos_now();
    let (status, stdout, stderr, pid) = run_to_completion("pgbench-init", cmd, CLIENT_TIMEOUT);
    let end = unix_nanos_now();
    assert!(
        status.success(),
        "pgbench -i (pid {pid}) failed: {status}\nstdout:\n{}\nstderr:\n{}",
        tail(&stdout, 20),
        tail(&stderr, 20)
    );
    PgbenchInit {
        pid,
        timing: Timing {
            start_unix_nanos: start,
            end_unix_nanos: end,
            duration_nanos: end - start,
        },
        stderr,
    }
}

/// What [`pgbench`] runs: `pgbench -n -M <mode> -b <script> -c <clients> -j 1 -t <transactions>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PgbenchOptions {
    pub mode: PgbenchMode,
    pub script: PgbenchScript,
    /// Per client.
    pub transactions: u32,
    pub clients: u32,
}

impl Default for PgbenchOptions {
    fn default() -> Self {
        PgbenchOptions {
            mode: PgbenchMode::Simple,
            script: PgbenchScript::SelectOnly,
            transactions: 10,
            clients: 1,
        }
    }
}

/// One transaction from pgbench's per-transaction log (`-l`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PgbenchTransaction {
    pub client: u32,
    /// 1-based within its client.
    pub index: u64,
    /// pgbench's latency of the transaction (its first statement sent → last result).
    pub latency_nanos: u64,
    /// Wall clock when it completed (microsecond resolution).
    pub end_unix_nanos: u64,
}

/// The outcome of [`pgbench`].
#[derive(Debug, Clone)]
pub struct PgbenchRun {
    /// The pgbench process (one thread; application_name `pgbench`).
    pub pid: u32,
    pub options: PgbenchOptions,
    /// `number of transactions actually processed`.
    pub processed: u64,
    /// `number of failed transactions`.
    pub failed: u64,
    pub transactions: Vec<PgbenchTransaction>,
    /// Window: from before pgbench was spawned to after it exited.
    pub timing: Timing,
    pub stdout: String,
    pub stderr: String,
}

impl PgbenchRun {
    /// Statements sent on the client connections: processed × statements per transaction
    /// (the setup connection adds [`PGBENCH_SETUP_STATEMENTS`]).
    pub fn statements(&self) -> usize {
        self.processed as usize * self.options.script.statements_per_transaction()
    }
}

/// Runs pgbench without vacuum (`-n`) against tables made by [`pgbench_init`]. First a setup
/// connection runs [`PGBENCH_SETUP_STATEMENTS`] statements and closes, then each client opens
/// its own connection and runs its transactions. Panics unless every transaction succeeded.
pub fn pgbench(server: &PgServer, db: &str, options: PgbenchOptions) -> PgbenchRun {
    let dir = TestDir::new("pgbench");
    let log_prefix = dir.join("txn");
    let mut cmd = server.client_command(pg_bin("pgbench"), db);
    cmd.args(["-n", "-j", "1", "-M", options.mode.as_str()])
        .args(["-b", options.script.name()])
        .args(["-c", &options.clients.to_string()])
        .args(["-t", &options.transactions.to_string()])
        .arg("-l")
        .arg(format!("--log-prefix={}", log_prefix.display()));
    let start = unix_nanos_now();
    let (status, stdout, stderr, pid) = run_to_completion("pgbench", cmd, CLIENT_TIMEOUT);
    let end = unix_nanos_now();
    let field = |prefix: &str| {
        stdout.lines().find_map(|l| {
            l.strip_prefix(prefix)?
                .split(|c: char| !c.is_ascii_digit())
                .find(|s| !s.is_empty())?
                .parse::<u64>()
                .ok()
        })
    };
    let processed = field("number of transactions actually processed: ");
    let failed = field("number of failed transactions: ");
    let log_text: String = fs::read_dir(dir.path())
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("txn."))
        .map(|e| read_text(&e.path()))
        .collect();
    let mut transactions: Vec<PgbenchTransaction> = log_text
        .lines()
        .filter_map(parse_pgbench_log_line)
        .collect();
    transactions.sort_by_key(|t| (t.end_unix_nanos, t.client, t.index));
    let expected = u64::from(options.transactions) * u64::from(options.clients);
    if !status.success()
        || processed != Some(expected)
        || failed != Some(0)
        || transactions.len() as u64 != expected
    {
        panic!(
            "pgbench (pid {pid}, {options:?}) failed: exit {status}, processed {processed:?} of \
             {expected}, failed {failed:?}, {} logged transactions\nstdout:\n{}\nstderr:\n{}",
            transactions.len(),
            tail(&stdout, 30),
            tail(&stderr, 30)
        );
    }
    PgbenchRun {
        pid,
        options,
        processed: expected,
        failed: 0,
        transactions,
        timing: Timing {
            start_unix_nanos: start,
            end_unix_nanos: end,
            duration_nanos: end - start,
        },
        stdout,
        stderr,
    }
}

/// `client_id transaction_no time script_no time_epoch time_us` (time = latency in µs).
fn parse_pgbench_log_line(line: &str) -> Option<PgbenchTransaction> {
    let f: Vec<u64> = line
        .split_whitespace()
        .map(|s| s.parse().ok())
        .collect::<Option<Vec<u64>>>()?;
    if f.len() < 6 {
        return None;
    }
    Some(PgbenchTransaction {
        client: u32::try_from(f[0]).ok()?,
        index: f[1],
        latency_nanos: f[2] * 1_000,
        end_unix_nanos: f[4] * 1_000_000_000 + f[5] * 1_000,
    })
}

/// What [`psycopg_client`] runs on its one connection (see `tests/fixtures/pg_psycopg.py`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PsycopgPlan {
    /// `SELECT <i> AS simple`, simple query protocol.
    pub simple: usize,
    /// Executions of `SELECT $1::int * 2 AS doubled`, prepared once (`_pg3_0`).
    pub prepared: usize,
    /// Statements in the pipeline block (extended protocol, unnamed, one Sync at the end).
    pub pipeline: usize,
    /// The pipeline statement that fails (`SELECT * FROM nope`, 42P01); the server skips the
    /// ones after it.
    pub pipeline_fail_at: usize,
}

impl Default for PsycopgPlan {
    fn default() -> Self {
        PsycopgPlan {
            simple: 3,
            prepared: 4,
            pipeline: 5,
            pipeline_fail_at: 2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PsycopgPhase {
    Simple,
    Prepared,
    Pipeline,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatementOutcome {
    Ok,
    Error,
    /// Sent in the pipeline after the failing statement: the server skipped it.
    Skipped,
}

/// One statement of a [`psycopg_client`] run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PsycopgStatement {
    pub phase: PsycopgPhase,
    /// Within its phase.
    pub index: usize,
    /// The text the server receives (`$1` placeholders).
    pub query: String,
    pub params: Vec<String>,
    pub outcome: StatementOutcome,
    pub sqlstate: Option<String>,
    pub rows: u64,
    /// The statement's own window (execute → rows fetched); for pipeline statements the
    /// window of the whole pipeline block.
    pub timing: Timing,
}

/// The outcome of [`psycopg_client`], from the script's JSON summary.
#[derive(Debug, Clone)]
pub struct PsycopgRun {
    /// The python process (application_name `e2e-psycopg`).
    pub pid: u32,
    /// The backend that served the connection (`conn.info.backend_pid`).
    pub backend_pid: u32,
    /// The client's local port.
    pub local_port: u16,
    /// `psycopg.__version__`, e.g. `3.3.9`.
    pub psycopg_version: String,
    /// libpq version (e.g. 170006 for 17.6).
    pub libpq_version: u64,
    /// `binary`, `c` or `python`.
    pub implementation: String,
    /// libpq encrypted the connection (`PQsslInUse`).
    pub ssl_in_use: bool,
    pub statements: Vec<PsycopgStatement>,
    /// The pipeline block: from before the first execute to after the block exited.
    pub pipeline: Timing,
    /// The SQLSTATE psycopg raised for the pipeline.
    pub pipeline_error: Option<String>,
    /// Connect → close.
    pub timing: Timing,
    /// The JSON summary as printed.
    pub json: String,
}

impl PsycopgRun {
    pub fn phase(&self, phase: PsycopgPhase) -> Vec<&PsycopgStatement> {
        self.statements
            .iter()
            .filter(|s| s.phase == phase)
            .collect()
    }
}

/// Runs `tests/fixtures/pg_psycopg.py` (psycopg 3, one connection, autocommit) with `plan`.
/// Needs `pip install "psycopg[binary]"`. Panics unless it exits 0 with a summary that matches
/// the plan.
pub fn psycopg_client(server: &PgServer, db: &str, plan: PsycopgPlan) -> PsycopgRun {
    psycopg_client_impl(server, db, plan, None::<fn(u32) -> bool>)
}

/// [`psycopg_client`] held at a gate after psycopg (libpq, its TLS library) is loaded and
/// before it connects, until `open(pid)` says go (e.g. the agent attached to the library).
pub fn psycopg_client_gated(
    server: &PgServer,
    db: &str,
    plan: PsycopgPlan,
    open: impl FnMut(u32) -> bool,
) -> PsycopgRun {
    psycopg_client_impl(server, db, plan, Some(open))
}

fn psycopg_client_impl(
    server: &PgServer,
    db: &str,
    plan: PsycopgPlan,
    gate: Option<impl FnMut(u32) -> bool>,
) -> PsycopgRun {
    let conninfo = format!("{} application_name=e2e-psycopg", server.conninfo(db));
    let mut cmd = server.client_command(python_bin(), db);
    cmd.arg(fixture("pg_psycopg.py")).arg(conninfo).args([
        plan.simple.to_string(),
        plan.prepared.to_string(),
        plan.pipeline.to_string(),
        plan.pipeline_fail_at.to_string(),
    ]);
    let (status, stdout, stderr, pid) = match gate {
        None => run_to_completion("pg_psycopg", cmd, CLIENT_TIMEOUT),
        Some(mut open) => {
            cmd.env("E2E_TLS_GATE", "1");
            run_gated("pg_psycopg", cmd, &mut open, b"go\n", CLIENT_TIMEOUT)
        }
    };
    let line = stdout.lines().rev().find(|l| l.starts_with('{'));
    let parsed = line
        .ok_or_else(|| "no JSON line".to_string())
        .and_then(|l| {
            let value: Value = serde_json::from_str(l).map_err(|e| e.to_string())?;
            parse_psycopg_summary(&value, l).ok_or_else(|| format!("unexpected JSON shape: {l}"))
        });
    let run = match (status.success(), parsed) {
        (true, Ok(run)) => run,
        (_, parsed) => panic!(
            "pg_psycopg.py (pid {pid}) failed: exit {status} ({:?}); is psycopg installed \
             (pip install \"psycopg[binary]\")?\nstdout:\n{}\nstderr:\n{}",
            parsed.err(),
            tail(&stdout, 20),
            tail(&stderr, 40)
        ),
    };
    let expected = plan.simple + plan.prepared + plan.pipeline;
    assert!(
        run.pid == pid && run.statements.len() == expected,
        "pg_psycopg.py (pid {pid}) reported pid {} and {} statements, expected {expected}: {}",
        run.pid,
        run.statements.len(),
        run.json
    );
    run
}

fn parse_psycopg_summary(v: &Value, raw: &str) -> Option<PsycopgRun> {
    let timing = Timing::from_json;
    let opt_str = |o: &Value| -> Option<Option<String>> {
        match o {
            Value::Null => Some(None),
            other => Some(Some(other.as_str()?.to_string())),
        }
    };
    let mut statements = Vec::new();
    for s in v.get("statements")?.as_array()? {
        statements.push(PsycopgStatement {
            phase: match s.get("phase")?.as_str()? {
                "simple" => PsycopgPhase::Simple,
                "prepared" => PsycopgPhase::Prepared,
                "pipeline" => PsycopgPhase::Pipeline,
                _ => return None,
            },
            index: s.get("index")?.as_u64()? as usize,
            query: s.get("query")?.as_str()?.to_string(),
            params: s
                .get("params")?
                .as_array()?
                .iter()
                .map(|p| p.as_str().map(str::to_string))
                .collect::<Option<Vec<String>>>()?,
            outcome: match s.get("status")?.as_str()? {
                "ok" => StatementOutcome::Ok,
                "error" => StatementOutcome::Error,
                "skipped" => StatementOutcome::Skipped,
                _ => return None,
            },
            sqlstate: opt_str(s.get("sqlstate")?)?,
            rows: s.get("rows")?.as_u64()?,
            timing: timing(s)?,
        });
    }
    let pipeline = v.get("pipeline")?;
    Some(PsycopgRun {
        pid: u32::try_from(v.get("pid")?.as_u64()?).ok()?,
        backend_pid: u32::try_from(v.get("backend_pid")?.as_u64()?).ok()?,
        local_port: u16::try_from(v.get("local_port")?.as_u64()?).ok()?,
        psycopg_version: v.get("psycopg")?.as_str()?.to_string(),
        libpq_version: v.get("libpq")?.as_u64()?,
        implementation: v.get("impl")?.as_str()?.to_string(),
        ssl_in_use: v.get("ssl")?.as_bool()?,
        statements,
        pipeline: timing(pipeline)?,
        pipeline_error: opt_str(pipeline.get("error_sqlstate")?)?,
        timing: timing(v)?,
        json: raw.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
PGLOG pid=3847 remote= sqlstate=00000 app=| LOG:  database system is ready to accept connections
PGLOG pid=3955 remote=127.0.0.1(38436) sqlstate=00000 app=[unknown]| LOG:  connection received: host=127.0.0.1 port=38436
PGLOG pid=3955 remote=127.0.0.1(38436) sqlstate=00000 app=psql| LOG:  statement: CREATE TABLE t (id int primary key, v text);
PGLOG pid=3955 remote=127.0.0.1(38436) sqlstate=00000 app=psql| LOG:  statement: SELECT * FROM nope;
PGLOG pid=3955 remote=127.0.0.1(38436) sqlstate=42P01 app=psql| ERROR:  relation \"nope\" does not exist at character 15
PGLOG pid=3955 remote=127.0.0.1(38436) sqlstate=42P01 app=psql| STATEMENT:  SELECT * FROM nope;
PGLOG pid=3955 remote=127.0.0.1(38436) sqlstate=00000 app=psql| LOG:  statement: SELECT 1,
\t  2;
PGLOG pid=4420 remote=127.0.0.1(53728) sqlstate=00000 app=pgbench| LOG:  execute P_0: SELECT abalance FROM pgbench_accounts WHERE aid = $1;
PGLOG pid=4420 remote=127.0.0.1(53728) sqlstate=00000 app=pgbench| DETAIL:  parameters: $1 = '4789'
PGLOG pid=4393 remote=127.0.0.1(35556) sqlstate=00000 app=exp2| LOG:  execute <unnamed>: SELECT 11
PGLOG pid=4393 remote=127.0.0.1(35556) sqlstate=42P01 app=exp2| ERROR:  relation \"nope\" does not exist at character 15
PGLOG pid=4393 remote=127.0.0.1(35556) sqlstate=42P01 app=exp2| STATEMENT:  SELECT * FROM nope
";

    #[test]
    fn parses_the_server_log_into_statements() {
        let entries = parse_pg_log(LOG);
        assert_eq!(entries.len(), 12);
        assert_eq!(entries[0].pid, 3847);
        assert_eq!(entries[0].remote_port, None);
        assert_eq!(entries[1].remote_port, Some(38436));
        assert_eq!(entries[6].message, "statement: SELECT 1,\n  2;");
        let s = server_statements(&entries);
        let summary: Vec<(u32, &str, Option<&str>)> = s
            .iter()
            .map(|s| (s.backend_pid, s.sql.as_str(), s.sqlstate.as_deref()))
            .collect();
        assert_eq!(
            summary,
            vec![
                (3955, "CREATE TABLE t (id int primary key, v text);", None),
                (3955, "SELECT * FROM nope;", Some("42P01")),
                (3955, "SELECT 1,\n  2;", None),
                (
                    4420,
                    "SELECT abalance FROM pgbench_accounts WHERE aid = $1;",
                    None
                ),
                (4393, "SELECT 11", None),
                (4393, "SELECT * FROM nope", Some("42P01")),
            ]
        );
        assert_eq!(s[1].protocol, ServerProtocol::Simple);
        assert_eq!(
            s[3].protocol,
            ServerProtocol::Extended { name: "P_0".into() }
        );
        assert_eq!(s[3].parameters.as_deref(), Some("$1 = '4789'"));
        assert_eq!(s[3].application, "pgbench");
        assert_eq!(s[5].protocol, ServerProtocol::NotLogged);
        assert_eq!(s[5].client_port, Some(35556));
    }

    #[test]
    fn attributes_errors_with_details_and_without_statement_lines() {
        let log = "\
PGLOG pid=5 remote=127.0.0.1(1000) sqlstate=00000 app=psql| LOG:  statement: INSERT INTO t VALUES (1);
PGLOG pid=6 remote=127.0.0.1(1001) sqlstate=00000 app=x| LOG:  execute <unnamed>: SELECT 1/$1
PGLOG pid=5 remote=127.0.0.1(1000) sqlstate=23505 app=psql| ERROR:  duplicate key value violates unique constraint \"t_pkey\"
PGLOG pid=6 remote=127.0.0.1(1001) sqlstate=00000 app=x| DETAIL:  parameters: $1 = '0'
PGLOG pid=5 remote=127.0.0.1(1000) sqlstate=23505 app=psql| DETAIL:  Key (id)=(1) already exists.
PGLOG pid=6 remote=127.0.0.1(1001) sqlstate=22012 app=x| ERROR:  division by zero
PGLOG pid=5 remote=127.0.0.1(1000) sqlstate=23505 app=psql| STATEMENT:  INSERT INTO t VALUES (1);
PGLOG pid=5 remote=127.0.0.1(1000) sqlstate=42601 app=psql| ERROR:  syntax error at or near \"SELEC\" at character 1
PGLOG pid=5 remote=127.0.0.1(1000) sqlstate=42601 app=psql| STATEMENT:  SELEC 1;
";
        let s = server_statements(&parse_pg_log(log));
        let summary: Vec<(u32, &str, Option<&str>, &ServerProtocol)> = s
            .iter()
            .map(|s| {
                (
                    s.backend_pid,
                    s.sql.as_str(),
                    s.sqlstate.as_deref(),
                    &s.protocol,
                )
            })
            .collect();
        let unnamed = ServerProtocol::Extended {
            name: "<unnamed>".into(),
        };
        assert_eq!(
            summary,
            vec![
                (
                    5,
                    "INSERT INTO t VALUES (1);",
                    Some("23505"),
                    &ServerProtocol::Simple
                ),
                // No STATEMENT line (log_min_error_statement above error): still its error.
                (6, "SELECT 1/$1", Some("22012"), &unnamed),
                (5, "SELEC 1;", Some("42601"), &ServerProtocol::NotLogged),
            ]
        );
        assert_eq!(
            s[0].error_message.as_deref(),
            Some("duplicate key value violates unique constraint \"t_pkey\"")
        );
        assert_eq!(s[1].parameters.as_deref(), Some("$1 = '0'"));
    }

    #[test]
    fn parses_psql_output() {
        assert_eq!(parse_psql_timing("Time: 0.304 ms"), Some(304_000));
        assert_eq!(
            parse_psql_timing("Time: 1234.567 ms (00:01.235)"),
            Some(1_234_567_000)
        );
        assert_eq!(parse_psql_timing("Timing is on."), None);
        let (line, err) = parse_psql_error(
            "psql:/tmp/agent-e2e/psql_run-1-0/script.sql:5: ERROR:  42P01: relation \"nope\" does not exist",
        )
        .expect("parses");
        assert_eq!(line, 5);
        assert_eq!(err.sqlstate, "42P01");
        assert_eq!(err.message, "relation \"nope\" does not exist");
        assert!(parse_psql_error("LINE 1: SELECT * FROM nope;").is_none());
    }

    #[test]
    fn parses_pgbench_transaction_log() {
        let t = parse_pgbench_log_line("0 2 391 0 1795398762 260945").expect("parses");
        assert_eq!(t.client, 0);
        assert_eq!(t.index, 2);
        assert_eq!(t.latency_nanos, 391_000);
        assert_eq!(t.end_unix_nanos, 1_795_398_762_260_945_000);
        assert!(parse_pgbench_log_line("garbage").is_none());
    }

    #[test]
    fn parses_backend_titles() {
        let b = parse_backend_title(7, "postgres: postgres bench 127.0.0.1(53728) idle\0\0\0")
            .expect("a backend");
        assert_eq!(b.user, "postgres");
        assert_eq!(b.database, "bench");
        assert_eq!(b.client_port, Some(53728));
        assert_eq!(b.title, "postgres: postgres bench 127.0.0.1(53728) idle");
        let local = parse_backend_title(8, "postgres: postgres postgres [local] SELECT")
            .expect("a backend");
        assert_eq!(local.client_port, None);
        assert!(parse_backend_title(9, "postgres: checkpointer ").is_none());
        assert!(parse_backend_title(9, "postgres: logical replication launcher").is_none());
    }
}
