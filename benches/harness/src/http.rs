//! A small HTTP/1.1 client for the benches: wait for the first 200, and a closed-loop load
//! at fixed concurrency over keep-alive connections (one thread per connection).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Errors of the HTTP client.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("connecting to or talking with {addr}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr} answered {status:?} instead of 200")]
    Status { addr: SocketAddr, status: String },
    #[error("{addr} sent a response without content-length")]
    NoLength { addr: SocketAddr },
    #[error("no 200 from {addr} within {secs} s")]
    Timeout { addr: SocketAddr, secs: u64 },
    #[error("no request of the load on {addr} succeeded")]
    NoneSucceeded { addr: SocketAddr },
}

/// One keep-alive connection that sends GETs.
struct Conn {
    addr: SocketAddr,
    path: String,
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Conn {
    fn open(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Conn, HttpError> {
        let io = |source| HttpError::Io { addr, source };
        let s = TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
        s.set_nodelay(true).map_err(io)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(io)?;
        let r = BufReader::new(s.try_clone().map_err(io)?);
        Ok(Conn {
            addr,
            path: path.to_string(),
            w: s,
            r,
        })
    }

    /// One GET; Ok with the body when the answer was a 200.
    fn get(&mut self) -> Result<Vec<u8>, HttpError> {
        let addr = self.addr;
        let io = |source| HttpError::Io { addr, source };
        let req = format!(
            "GET {} HTTP/1.1\r\nhost: {}\r\nuser-agent: hostd-bench\r\n\r\n",
            self.path, addr
        );
        self.w.write_all(req.as_bytes()).map_err(io)?;
        let mut line = String::new();
        self.r.read_line(&mut line).map_err(io)?;
        let status = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let mut len = None;
        let mut chunked = false;
        loop {
            line.clear();
            if self.r.read_line(&mut line).map_err(io)? == 0 {
                return Err(io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.trim().eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse::<u64>().ok();
                }
                if k.trim().eq_ignore_ascii_case("transfer-encoding")
                    && v.to_ascii_lowercase().contains("chunked")
                {
                    chunked = true;
                }
            }
        }
        let mut body = Vec::new();
        if chunked {
            self.skip_chunked().map_err(io)?;
        } else {
            let len = len.ok_or(HttpError::NoLength { addr })?;
            (&mut self.r).take(len).read_to_end(&mut body).map_err(io)?;
        }
        if status != "200" {
            return Err(HttpError::Status { addr, status });
        }
        Ok(body)
    }
}

impl Conn {
    /// Reads a chunked body to its end (the last chunk and the trailers).
    fn skip_chunked(&mut self) -> std::io::Result<()> {
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "bad chunk size");
        let mut line = String::new();
        loop {
            line.clear();
            if self.r.read_line(&mut line)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let size = line.trim().split(';').next().unwrap_or("");
            let size = u64::from_str_radix(size, 16).map_err(|_| bad())?;
            if size == 0 {
                // Trailers, up to the empty line.
                loop {
                    line.clear();
                    if self.r.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
                        return Ok(());
                    }
                }
            }
            std::io::copy(&mut (&mut self.r).take(size + 2), &mut std::io::sink())?;
        }
    }
}

/// Polls `GET path` on `addr` (a new connection each try, 2 ms apart) until a 200 comes
/// back; returns when it did.
pub fn wait_for_200(addr: SocketAddr, path: &str, limit: Duration) -> Result<Instant, HttpError> {
    let start = Instant::now();
    loop {
        let ok = Conn::open(addr, path, Duration::from_millis(500)).and_then(|mut c| c.get());
        if ok.is_ok() {
            return Ok(Instant::now());
        }
        if start.elapsed() > limit {
            return Err(HttpError::Timeout {
                addr,
                secs: limit.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// One `GET path` on a new connection; the body of its 200.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Vec<u8>, HttpError> {
    let mut c = Conn::open(addr, path, Duration::from_secs(5))?;
    c.w.set_read_timeout(Some(timeout))
        .and_then(|_| c.r.get_ref().set_read_timeout(Some(timeout)))
        .map_err(|source| HttpError::Io { addr, source })?;
    c.get()
}

/// What a load run measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Load {
    pub requests: u64,
    pub errors: u64,
    pub requests_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// `concurrency` connections each sending GETs back to back for `duration`; latencies
/// of the 200s only, errors counted (a connection that fails is reopened).
pub fn load(
    addr: SocketAddr,
    path: &str,
    concurrency: usize,
    duration: Duration,
) -> Result<Load, HttpError> {
    let start = Instant::now();
    let threads: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let path = path.to_string();
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                let mut errors = 0u64;
                let mut conn = None;
                while start.elapsed() < duration {
                    if conn.is_none() {
                        match Conn::open(addr, &path, Duration::from_secs(2)) {
                            Ok(c) => conn = Some(c),
                            Err(_) => {
                                errors += 1;
                                std::thread::sleep(Duration::from_millis(5));
                                continue;
                            }
                        }
                    }
                    let Some(c) = conn.as_mut() else { continue };
                    let t = Instant::now();
                    match c.get() {
                        Ok(_) => lat.push(t.elapsed().as_secs_f64() * 1e3),
                        Err(_) => {
                            errors += 1;
                            conn = None;
                        }
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for t in threads {
        if let Ok((lat, e)) = t.join() {
            all.extend(lat);
            errors += e;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    if all.is_empty() {
        return Err(HttpError::NoneSucceeded { addr });
    }
    Ok(Load {
        requests: all.len() as u64,
        errors,
        requests_per_s: all.len() as f64 / secs,
        p50_ms: crate::percentile(all.clone(), 50.0),
        p99_ms: crate::percentile(all, 99.0),
    })
}
