//! `memdial probe`: a health check that needs nothing but this binary, for
//! container images without curl. It GETs one URL of a node's admin port
//! over HTTP/1.0 and succeeds on `200` only; any other status, a refused
//! or unresolvable address, or no status line within the timeout fails
//! (exit 1). Only the status line is read.

use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use memdial::config::HostPort;

/// The longest status line read before giving up on the answer.
const MAX_STATUS_LINE: usize = 1024;

#[derive(clap::Args)]
pub struct ProbeArgs {
    /// `http://HOST:PORT/PATH` to GET (HOST an IP or a name), e.g. a node's
    /// `/ready` or `/health`.
    #[arg(long, default_value = "http://127.0.0.1:9000/ready")]
    url: String,
    /// Fail when no status line has come within this long (name lookup and
    /// connect included).
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
}

/// Exits 0 (Ok) on HTTP 200; every failure is an error (exit 1).
pub fn main(args: ProbeArgs) -> anyhow::Result<()> {
    let (addr, path) = parse_url(&args.url)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let wait = Duration::from_millis(args.timeout_ms);
    let answer = runtime.block_on(async {
        tokio::time::timeout(wait, status(&addr, &path))
            .await
            .unwrap_or_else(|_| bail!("no answer within {} ms", args.timeout_ms))
    });
    // A name lookup still running in a blocking thread must not hold the
    // exit.
    runtime.shutdown_background();
    match answer.with_context(|| args.url.clone())? {
        200 => {
            println!("{}: 200", args.url);
            Ok(())
        }
        code => bail!("{}: HTTP {code}", args.url),
    }
}

/// `http://host:port/path` → (host:port, /path). The path defaults to `/`.
fn parse_url(url: &str) -> anyhow::Result<(HostPort, String)> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("{url}: only http:// URLs are probed"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    let addr = authority
        .parse::<HostPort>()
        .with_context(|| format!("{url}: the address"))?;
    Ok((addr, path.to_string()))
}

/// The status code of `GET path` on `addr`.
async fn status(addr: &HostPort, path: &str) -> anyhow::Result<u16> {
    let mut stream = TcpStream::connect(addr.target())
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: memdial-probe\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut buf = Vec::with_capacity(128);
    let line = loop {
        if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
            break String::from_utf8_lossy(&buf[..end]).into_owned();
        }
        if buf.len() > MAX_STATUS_LINE {
            bail!("no HTTP status line in the first {MAX_STATUS_LINE} bytes");
        }
        let mut chunk = [0u8; 256];
        match stream.read(&mut chunk).await? {
            0 => bail!("connection closed before a status line"),
            n => buf.extend_from_slice(&chunk[..n]),
        }
    };
    // `HTTP/1.x NNN reason`
    let mut parts = line.split(' ');
    match (parts.next(), parts.next().map(str::parse::<u16>)) {
        (Some(v), Some(Ok(code))) if v.starts_with("HTTP/1.") => Ok(code),
        _ => bail!("not an HTTP status line: {line:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_an_address_and_a_path() {
        let (a, p) = parse_url("http://127.0.0.1:9000/ready").unwrap();
        assert_eq!((a.target(), p.as_str()), (("127.0.0.1", 9000), "/ready"));
        let (a, p) = parse_url("http://memdial-1:9000").unwrap();
        assert_eq!((a.target(), p.as_str()), (("memdial-1", 9000), "/"));
        let (a, _) = parse_url("http://[::1]:9000/health").unwrap();
        assert_eq!(a.target(), ("::1", 9000));
        assert!(parse_url("https://127.0.0.1:9000/ready").is_err());
        assert!(parse_url("http://127.0.0.1/ready").is_err(), "no port");
    }
}
