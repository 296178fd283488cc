//! Real HTTP/1.1 servers on loopback ports, killed on drop.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use crate::process::{ChildGuard, POLL, TestDir, pids, poll_until, read_text, tail};
use crate::{fixture, free_port, nginx_bin, node_bin, port_open, python_bin};

/// Body of `/hello` on the python and node servers.
pub const HELLO_BODY: &str = "hello\n";
/// Size of `/large` on the python and node servers (`LARGE_SIZE` in the scripts).
pub const LARGE_SIZE: usize = 300 * 1024;
/// Chunks the node server writes for `/chunked` (`CHUNK_SIZES` in node_server.js).
pub const NODE_CHUNK_SIZES: [usize; 5] = [100, 2000, 30000, 7, 1];
/// nginx static files.
pub const NGINX_HELLO_PATH: &str = "/hello.txt";
pub const NGINX_HELLO_BODY: &str = "hello from nginx\n";
pub const NGINX_LARGE_PATH: &str = "/large.bin";
pub const NGINX_LARGE_SIZE: usize = 300 * 1024 + 123;

const START_TIMEOUT: Duration = Duration::from_secs(15);

/// What tests need from any server fixture.
pub trait HttpServer {
    /// The loopback port it listens on.
    fn port(&self) -> u16;
    /// The process that accepts connections and answers requests.
    fn pid(&self) -> u32;
    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port())
    }
}

/// A server script that prints `READY port=<port> pid=<pid>` once it listens.
pub struct ScriptServer {
    child: ChildGuard,
    port: u16,
    stdout: PathBuf,
    stderr: PathBuf,
    _dir: TestDir,
}

impl ScriptServer {
    fn start(
        name: &str,
        program: &Path,
        script: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> ScriptServer {
        let mut cmd = Command::new(program);
        cmd.arg(script)
            .arg("0")
            .args(args)
            .env_remove("OTEL_SERVICE_NAME");
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::start_command(name, cmd)
    }

    /// Spawns `cmd` (any server that prints `READY port=<port> ...` on stdout) and waits for
    /// its READY line (15 s).
    pub fn start_command(name: &str, cmd: Command) -> ScriptServer {
        let dir = TestDir::new(name);
        let stdout = dir.join("stdout");
        let stderr = dir.join("stderr");
        let mut child = ChildGuard::spawn(name, cmd, &stdout, &stderr);
        let started = Instant::now();
        let port = loop {
            let out = read_text(&stdout);
            if let Some(port) = parse_ready(&out) {
                break port;
            }
            if let Some(status) = child.try_wait() {
                panic!(
                    "{name} exited with {status} before it was ready\nstdout:\n{}\nstderr:\n{}",
                    tail(&out, 20),
                    tail(&read_text(&stderr), 40)
                );
            }
            if started.elapsed() > crate::scaled(START_TIMEOUT) {
                panic!(
                    "{name} did not print READY within {:?}\nstderr:\n{}",
                    crate::scaled(START_TIMEOUT),
                    tail(&read_text(&stderr), 40)
                );
            }
            thread::sleep(POLL);
        };
        ScriptServer {
            child,
            port,
            stdout,
            stderr,
            _dir: dir,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process that was spawned (with `ip netns exec`, the program itself: ip execs it).
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Everything the server printed on stdout so far.
    pub fn stdout(&self) -> String {
        read_text(&self.stdout)
    }

    pub fn stderr(&self) -> String {
        read_text(&self.stderr)
    }
}

impl Drop for ScriptServer {
    fn drop(&mut self) {
        self.child.kill();
        if thread::panicking() {
            eprintln!(
                "[e2e] {} (pid {}, port {}) stderr:\n{}",
                self.child.name(),
                self.child.pid(),
                self.port,
                tail(&read_text(&self.stderr), 30)
            );
        }
    }
}

fn parse_ready(stdout: &str) -> Option<u16> {
    stdout.lines().find_map(|line| {
        line.strip_prefix("READY port=")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// `tests/fixtures/py_server.py`: python `http.server` (ThreadingHTTPServer, HTTP/1.1 keep-alive).
/// Routes: `/hello` 200, `/boom` 500, `/large` (LARGE_SIZE), POST `/echo`, `/users/{id}`, else 404.
pub struct PyServer(ScriptServer);

impl PyServer {
    pub fn start() -> PyServer {
        Self::start_with_env(&[])
    }

    /// With extra environment variables (e.g. `OTEL_SERVICE_NAME`).
    pub fn start_with_env(env: &[(&str, &str)]) -> PyServer {
        PyServer(ScriptServer::start(
            "py_server",
            python_bin(),
            &fixture("py_server.py"),
            &[],
            env,
        ))
    }

    /// With extra command-line arguments after the port (the script ignores them; they show
    /// in the process's command line).
    pub fn start_with_args(args: &[&str]) -> PyServer {
        PyServer(ScriptServer::start(
            "py_server",
            python_bin(),
            &fixture("py_server.py"),
            args,
            &[],
        ))
    }
}

impl PyServer {
    /// Started as a user would type `program` (a name looked up in `path`, which is also the
    /// server's PATH): its command name and executable are whatever that resolves to.
    pub fn start_program(program: &str, path: &Path) -> PyServer {
        let mut cmd = Command::new(program);
        cmd.env("PATH", path)
            .arg(fixture("py_server.py"))
            .arg("0")
            .env_remove("OTEL_SERVICE_NAME");
        PyServer(ScriptServer::start_command("py_server", cmd))
    }
}

impl HttpServer for PyServer {
    fn port(&self) -> u16 {
        self.0.port
    }
    fn pid(&self) -> u32 {
        self.0.child.pid()
    }
}

/// `tests/fixtures/node_server.js`: node `http` server, the python routes plus `/chunked`.
pub struct NodeServer(ScriptServer);

impl NodeServer {
    pub fn start() -> NodeServer {
        Self::start_with_env(&[])
    }

    /// With extra environment variables (`E2E_TLS_CERT`/`E2E_TLS_KEY`: HTTPS).
    pub fn start_with_env(env: &[(&str, &str)]) -> NodeServer {
        NodeServer(ScriptServer::start(
            "node_server",
            node_bin(),
            &fixture("node_server.js"),
            &[],
            env,
        ))
    }
}

impl HttpServer for NodeServer {
    fn port(&self) -> u16 {
        self.0.port
    }
    fn pid(&self) -> u32 {
        self.0.child.pid()
    }
}

/// nginx (master + 1 worker) from `tests/fixtures/nginx.conf.template` in a private prefix:
/// static `/hello.txt` and `/large.bin` (served with sendfile), `/boom` → 500, else 404.
pub struct NginxServer {
    child: ChildGuard,
    port: u16,
    worker_pid: u32,
    dir: TestDir,
}

impl NginxServer {
    pub fn start() -> NginxServer {
        let dir = TestDir::new("nginx");
        let prefix = dir.path();
        fs::create_dir_all(prefix.join("html")).expect("create nginx html dir");
        fs::create_dir_all(prefix.join("tmp")).expect("create nginx tmp dir");
        fs::write(prefix.join("html/hello.txt"), NGINX_HELLO_BODY).expect("write hello.txt");
        let large: Vec<u8> = (0..NGINX_LARGE_SIZE).map(|i| (i % 251) as u8).collect();
        fs::write(prefix.join("html/large.bin"), large).expect("write large.bin");
        let template =
            fs::read_to_string(fixture("nginx.conf.template")).expect("read nginx.conf.template");
        Self::start_in(dir, &template, None)
    }

    /// nginx with another configuration: `template` with `@PREFIX@` (its private directory)
    /// and `@PORT@` replaced, as in the fixture; its master (so its worker too) pinned on
    /// `cpu` with `taskset -c` when given (the benchmark's nginx).
    pub fn start_with(template: &str, cpu: Option<&str>) -> NginxServer {
        Self::start_in(TestDir::new("nginx"), template, cpu)
    }

    fn start_in(dir: TestDir, template: &str, cpu: Option<&str>) -> NginxServer {
        let prefix = dir.path();
        let mut last_error = String::new();
        for attempt in 0..3 {
            let port = free_port();
            let conf = prefix.join("nginx.conf");
            fs::write(
                &conf,
                template
                    .replace("@PREFIX@", &prefix.display().to_string())
                    .replace("@PORT@", &port.to_string()),
            )
            .expect("write nginx.conf");
            // taskset execs nginx: the child's pid is the master's.
            let mut cmd = match cpu {
                Some(cpu) => {
                    let mut cmd = Command::new("taskset");
                    cmd.args(["-c", cpu]).arg(nginx_bin());
                    cmd
                }
                None => Command::new(nginx_bin()),
            };
            cmd.arg("-p")
                .arg(prefix)
                .arg("-c")
                .arg(&conf)
                .arg("-e")
                .arg(prefix.join("error.log"));
            let stdout = dir.join(&format!("nginx-{attempt}.out"));
            let stderr = dir.join(&format!("nginx-{attempt}.err"));
            let mut child = ChildGuard::spawn("nginx", cmd, &stdout, &stderr);
            let master = child.pid();
            let ready = poll_until(START_TIMEOUT, || {
                if child.try_wait().is_some() {
                    return Some(None);
                }
                if !port_open(port) {
                    return None;
                }
                children_of(master).first().map(|w| Some(*w))
            });
            match ready {
                Some(Some(worker_pid)) => {
                    return NginxServer {
                        child,
                        port,
                        worker_pid,
                        dir,
                    };
                }
                _ => {
                    last_error = format!(
                        "attempt {attempt} on port {port}: exited={:?}\nstderr:\n{}\nerror.log:\n{}",
                        child.try_wait(),
                        tail(&read_text(&stderr), 20),
                        tail(&read_text(&prefix.join("error.log")), 20)
                    );
                }
            }
        }
        panic!("could not start nginx: {last_error}");
    }

    pub fn master_pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn worker_pid(&self) -> u32 {
        self.worker_pid
    }

    /// Its private directory (`@PREFIX@` of its configuration: logs, pid file).
    pub fn prefix(&self) -> &Path {
        self.dir.path()
    }

    pub fn error_log(&self) -> String {
        read_text(&self.dir.join("error.log"))
    }
}

impl HttpServer for NginxServer {
    fn port(&self) -> u16 {
        self.port
    }
    /// The worker: it accepts and answers.
    fn pid(&self) -> u32 {
        self.worker_pid
    }
}

impl Drop for NginxServer {
    fn drop(&mut self) {
        self.child.kill();
        if thread::panicking() {
            eprintln!(
                "[e2e] nginx (master {}, worker {}, port {}) error.log:\n{}",
                self.child.pid(),
                self.worker_pid,
                self.port,
                tail(&self.error_log(), 30)
            );
        }
    }
}

/// Pids whose parent is `parent` (from /proc/*/stat).
pub fn children_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for pid in pids() {
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the parenthesised comm: state ppid ...
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let ppid = after
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u32>().ok());
        if ppid == Some(parent) {
            out.push(pid);
        }
    }
    out.sort_unstable();
    out
}
