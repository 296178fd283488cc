//! A fake Kubernetes API server for tests: answers requests in order with recorded responses.

use std::{
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

pub struct Reply {
    status: u16,
    body: String,
    /// A watch: no length, one line at a time, the end of the stream is the connection's.
    stream: bool,
}

impl Reply {
    pub fn json(status: u16, body: &str) -> Self {
        Self {
            status,
            body: body.to_owned(),
            stream: false,
        }
    }

    pub fn stream(status: u16, body: &str) -> Self {
        Self {
            status,
            body: body.to_owned(),
            stream: true,
        }
    }
}

pub struct Server {
    port: u16,
    done: Arc<AtomicBool>,
    requests: Arc<Mutex<Vec<String>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Server {
    pub fn start(replies: Vec<Reply>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a local port");
        let port = listener.local_addr().expect("local address").port();
        let done = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (done, requests) = (done.clone(), requests.clone());
            std::thread::spawn(move || serve(listener, replies, &done, &requests))
        };
        Self {
            port,
            done,
            requests,
            thread: Mutex::new(Some(thread)),
        }
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Request targets (path and query) in the order received.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Stops answering (later connections are refused) and waits for the server thread.
    pub fn finish(&self) {
        self.done.store(true, Ordering::SeqCst);
        // Wake the accept() up.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
    }
}

fn serve(
    listener: TcpListener,
    replies: Vec<Reply>,
    done: &AtomicBool,
    requests: &Mutex<Vec<String>>,
) {
    let mut replies = replies.into_iter();
    for conn in listener.incoming() {
        if done.load(Ordering::SeqCst) {
            return;
        }
        let Ok(mut conn) = conn else { continue };
        let mut reader = BufReader::new(conn.try_clone().expect("clone socket"));
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).is_err() {
            continue;
        }
        loop {
            let mut header = String::new();
            match reader.read_line(&mut header) {
                Ok(0) | Err(_) => break,
                Ok(_) if header == "\r\n" => break,
                Ok(_) => {}
            }
        }
        let target = request_line
            .split(' ')
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        if let Ok(mut r) = requests.lock() {
            r.push(target);
        }
        match replies.next() {
            Some(reply) => answer(&mut conn, &reply),
            // Out of script: an empty watch that ends shortly, like a server timeout.
            None => {
                std::thread::sleep(Duration::from_millis(50));
                answer(&mut conn, &Reply::stream(200, ""));
            }
        }
    }
}

fn answer(conn: &mut TcpStream, reply: &Reply) {
    let head = if reply.stream {
        format!(
            "HTTP/1.1 {} OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n",
            reply.status
        )
    } else {
        format!(
            "HTTP/1.1 {} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            reply.status,
            reply.body.len()
        )
    };
    let _ = conn.write_all(head.as_bytes());
    if reply.stream {
        for line in reply.body.split_inclusive('\n') {
            let _ = conn.write_all(line.as_bytes());
            let _ = conn.flush();
            std::thread::sleep(Duration::from_millis(5));
        }
    } else {
        let _ = conn.write_all(reply.body.as_bytes());
    }
    let _ = conn.shutdown(std::net::Shutdown::Both);
}
