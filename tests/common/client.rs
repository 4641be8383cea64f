//! The one blocking memcached text-protocol client of the tests: it sends
//! bytes and reads until a whole reply has arrived, framing `VALUE` data
//! blocks by their declared length (so data holding `END\r\n` cannot end a
//! reply early). Also a plain HTTP GET for the admin port and a reader of
//! Prometheus samples.
#![allow(dead_code)] // each test binary uses a different part of the harness

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Read and write timeout of every connection, and the longest
/// [`Client::read_until`] waits.
pub const IO_WAIT: Duration = Duration::from_secs(20);

/// What a `get` found: key → (flags, data).
pub type Values = BTreeMap<Vec<u8>, (u32, Vec<u8>)>;

/// Lossy text of bytes, for comparisons and assertion messages.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// One connection to 127.0.0.1 and the bytes read past the last reply.
pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub fn connect(port: u16) -> Client {
        Client::try_connect(port).unwrap_or_else(|e| panic!("connect to 127.0.0.1:{port}: {e}"))
    }

    pub fn try_connect(port: u16) -> io::Result<Client> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(IO_WAIT))?;
        stream.set_write_timeout(Some(IO_WAIT))?;
        stream.set_nodelay(true)?;
        Ok(Client {
            stream,
            buf: Vec::new(),
        })
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    /// Reads more into the buffer; EOF is an error.
    fn fill(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 65536];
        // A read on a socket with a timeout fails with EINTR whenever this
        // process is interrupted, whatever SA_RESTART says (signal(7));
        // like `read_exact`, try again.
        let n = loop {
            match self.stream.read(&mut chunk) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r?,
            }
        };
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("closed; have {:?}", text(&self.buf)),
            ));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// Reads until the buffer holds at least `n` bytes.
    fn fill_to(&mut self, n: usize) -> io::Result<()> {
        while self.buf.len() < n {
            self.fill()?;
        }
        Ok(())
    }

    /// The end (past `\r\n`) of the line that starts at `from`.
    fn line_end(&mut self, from: usize) -> io::Result<usize> {
        let mut searched = from;
        loop {
            if let Some(i) = self.buf[searched..].windows(2).position(|w| w == b"\r\n") {
                return Ok(searched + i + 2);
            }
            searched = self.buf.len().saturating_sub(1).max(from);
            self.fill()?;
        }
    }

    /// Reads one whole reply: `VALUE` blocks (data read by its declared
    /// length) up to `END`, `STAT` lines up to `END`, or one line. An error
    /// line ends a multi-line reply too.
    pub fn read_reply(&mut self) -> io::Result<Vec<u8>> {
        let mut at = 0;
        loop {
            let end = self.line_end(at)?;
            let line = &self.buf[at..end - 2];
            if let Some(rest) = line.strip_prefix(b"VALUE ") {
                let len = text(rest)
                    .split(' ')
                    .nth(2)
                    .and_then(|l| l.parse::<usize>().ok())
                    .ok_or_else(|| invalid(format!("bad VALUE line {:?}", text(line))))?;
                at = end + len + 2;
                self.fill_to(at)?;
                if &self.buf[at - 2..at] != b"\r\n" {
                    return Err(invalid(format!(
                        "data of {:?} not followed by CRLF",
                        text(&self.buf[..end - 2])
                    )));
                }
            } else if line.starts_with(b"STAT ") {
                at = end;
            } else {
                return Ok(self.buf.drain(..end).collect());
            }
        }
    }

    /// Sends `request` and reads one whole reply.
    pub fn try_call(&mut self, request: &[u8]) -> io::Result<Vec<u8>> {
        self.stream.write_all(request)?;
        self.read_reply()
    }

    /// Sends `request` and reads one whole reply; panics on an I/O error.
    pub fn call(&mut self, request: &[u8]) -> Vec<u8> {
        self.try_call(request).unwrap_or_else(|e| {
            panic!(
                "reply to {:?}: {e}",
                text(&request[..request.len().min(80)])
            )
        })
    }

    /// Reads until the bytes read end with `suffix`; returns them all. For
    /// comparing raw bytes, whatever their framing (a sentinel reply marks
    /// the end).
    pub fn read_until(&mut self, suffix: &[u8]) -> Vec<u8> {
        let deadline = Instant::now() + IO_WAIT;
        while !self.buf.ends_with(suffix) {
            assert!(
                Instant::now() < deadline,
                "timed out; have {:?}",
                text(&self.buf)
            );
            self.fill().expect("read");
        }
        std::mem::take(&mut self.buf)
    }

    /// Reads exactly `n` bytes.
    pub fn read_exact_len(&mut self, n: usize) -> Vec<u8> {
        self.fill_to(n).expect("read");
        self.buf.drain(..n).collect()
    }

    /// Reads until the peer closes; returns everything read.
    pub fn read_to_eof(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.buf);
        self.stream.read_to_end(&mut out).expect("read to eof");
        out
    }

    /// Sends a request answered by one line; returns it without `\r\n`.
    pub fn one_line(&mut self, request: &[u8]) -> io::Result<String> {
        let reply = self.try_call(request)?;
        Ok(text(reply.strip_suffix(b"\r\n").unwrap_or(&reply)))
    }

    pub fn set(&mut self, key: &str, flags: u32, exptime: i64, value: &[u8]) -> io::Result<String> {
        let mut req = format!("set {key} {flags} {exptime} {}\r\n", value.len()).into_bytes();
        req.extend_from_slice(value);
        req.extend_from_slice(b"\r\n");
        self.one_line(&req)
    }

    pub fn delete(&mut self, key: &str) -> io::Result<String> {
        self.one_line(format!("delete {key}\r\n").as_bytes())
    }

    pub fn incr(&mut self, key: &str, delta: u64) -> io::Result<String> {
        self.one_line(format!("incr {key} {delta}\r\n").as_bytes())
    }

    /// `get` of many keys in batches of 50; returns what was found.
    pub fn get_many<K: AsRef<[u8]>>(&mut self, keys: &[K]) -> io::Result<Values> {
        let mut out = BTreeMap::new();
        for batch in keys.chunks(50) {
            let mut req = b"get".to_vec();
            for k in batch {
                req.push(b' ');
                req.extend_from_slice(k.as_ref());
            }
            req.extend_from_slice(b"\r\n");
            let reply = self.try_call(&req)?;
            let mut rest = &reply[..];
            while rest != b"END\r\n" {
                let nl = rest.windows(2).position(|w| w == b"\r\n").unwrap_or(0);
                let line = text(&rest[..nl]);
                let parts: Vec<&str> = line.split(' ').collect();
                if parts.len() < 4 || parts[0] != "VALUE" {
                    return Err(invalid(format!("unexpected get reply line {line:?}")));
                }
                let flags: u32 = parts[2].parse().map_err(|_| invalid(line.clone()))?;
                // read_reply checked the length and the CRLF after the data.
                let len: usize = parts[3].parse().map_err(|_| invalid(line.clone()))?;
                let data = rest[nl + 2..nl + 2 + len].to_vec();
                out.insert(parts[1].as_bytes().to_vec(), (flags, data));
                rest = &rest[nl + 2 + len + 2..];
            }
        }
        Ok(out)
    }

    pub fn get(&mut self, key: &str) -> io::Result<Option<(u32, Vec<u8>)>> {
        Ok(self.get_many(&[key])?.remove(key.as_bytes()))
    }

    /// `stats [section]` as name → value; any line but `STAT <name>
    /// <value>` before `END` is an error.
    pub fn stats(&mut self, section: &str) -> io::Result<BTreeMap<String, String>> {
        let req = if section.is_empty() {
            "stats\r\n".to_string()
        } else {
            format!("stats {section}\r\n")
        };
        let reply = text(&self.try_call(req.as_bytes())?);
        let body = reply
            .strip_suffix("END\r\n")
            .ok_or_else(|| invalid(format!("{req:?} answered {reply:?}")))?;
        let mut out = BTreeMap::new();
        for line in body.split_terminator("\r\n") {
            let (name, value) = line
                .strip_prefix("STAT ")
                .and_then(|rest| rest.split_once(' '))
                .ok_or_else(|| invalid(format!("not a STAT name value line: {line:?}")))?;
            out.insert(name.to_string(), value.to_string());
        }
        Ok(out)
    }

    /// `lru_crawler metadump <what>` (`all`, `hash`): its lines end in a
    /// bare `\n`, only the final `END` in `\r\n`. Returns the lines (without
    /// `END`), or the one line of a refusal (`BUSY ...`, `ERROR ...`).
    pub fn metadump(&mut self, what: &str) -> io::Result<Vec<String>> {
        self.stream
            .write_all(format!("lru_crawler metadump {what}\r\n").as_bytes())?;
        loop {
            let refusal = ["BUSY", "ERROR", "CLIENT_ERROR", "SERVER_ERROR"]
                .iter()
                .any(|r| self.buf.starts_with(r.as_bytes()));
            if refusal && let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = text(&self.buf[..i]);
                self.buf.drain(..i + 2);
                return Ok(vec![line]);
            }
            if self.buf == b"END\r\n" || self.buf.ends_with(b"\nEND\r\n") {
                let all = std::mem::take(&mut self.buf);
                return Ok(all[..all.len() - 5]
                    .split(|&b| b == b'\n')
                    .map(|l| text(l.strip_suffix(b"\r").unwrap_or(l)))
                    .filter(|l| !l.is_empty())
                    .collect());
            }
            self.fill()?;
        }
    }
}

/// GET `path` on 127.0.0.1:`port`; the body of a 200 answer.
pub fn http_get(port: u16, path: &str) -> io::Result<String> {
    match http_status(port, path)? {
        (200, body) => Ok(body),
        (status, body) => Err(invalid(format!("HTTP {status}: {body:?}"))),
    }
}

/// GET `path` on 127.0.0.1:`port`; the status code and the body, whatever
/// the status.
pub fn http_status(port: u16, path: &str) -> io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(IO_WAIT))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out
        .split_once("\r\n\r\n")
        .ok_or_else(|| invalid("no HTTP header end"))?;
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| invalid(format!("HTTP answer {head:?}")))?;
    Ok((status, body.to_string()))
}

/// The value of one sample in Prometheus text, name and labels exactly as
/// exported, e.g. `metric(text, "memdial_peer_up{peer=\"2\"}")`.
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(sample)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}
