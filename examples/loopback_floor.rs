//! The floor of a loopback request-response on this machine: server CPU per request for a server
//! that does nothing but read a request and write a reply.
//!
//! `request_cpu.py` measures the worker's CPU per request (gRPC, perf_analyzer). This example
//! measures, on the same machine and with the same pattern (C client threads, each sending a
//! request and waiting for its reply on its own 127.0.0.1 TCP connection), what a server that
//! does no protocol and no work costs: the system calls, the loopback TCP path and the wake-ups.
//! What the worker spends above this floor is its own; what the floor itself costs is the
//! machine's.
//!
//! Two servers, each in a child process so that its CPU time is its own:
//! - `tokio`: tokio's current-thread runtime on one thread (the worker's runtime with one I/O
//!   thread), one task per connection, `read` then `write_all`;
//! - `threads`: one OS thread per connection, blocking `read` then `write_all` (two system calls
//!   per request, no epoll at all).
//!
//! ```sh
//! cargo build --release --example loopback_floor
//! target/release/examples/loopback_floor --concurrency 1,16 --seconds 5 --rounds 2
//! ```
//!
//! Prints, per server and concurrency: requests per second, and the server's CPU per request
//! (utime + stime from /proc/PID/stat over the requests the client completed), user and system.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Bytes of a request: about what perf_analyzer sends for `linear` (64 f32 and gRPC framing).
const REQUEST_BYTES: usize = 330;
/// Bytes of a reply: about what the worker writes back (HEADERS, DATA and trailers).
const REPLY_BYTES: usize = 360;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() >= 3 && args[1] == "--serve" {
        return serve(&args[2]);
    }
    let mut concurrency = vec![1usize, 16];
    let mut seconds = 5.0f64;
    let mut rounds = 2usize;
    let mut servers = vec!["tokio".to_string(), "threads".to_string()];
    let mut i = 1;
    while i < args.len() {
        let value = args.get(i + 1).ok_or("every flag takes a value")?;
        match args[i].as_str() {
            "--concurrency" => {
                concurrency = value.split(',').map(str::parse).collect::<Result<_, _>>()?;
            }
            "--seconds" => seconds = value.parse()?,
            "--rounds" => rounds = value.parse()?,
            "--servers" => servers = value.split(',').map(str::to_string).collect(),
            other => return Err(format!("unknown flag {other}").into()),
        }
        i += 2;
    }
    let ticks_per_second = clock_ticks_per_second()?;
    println!("| round | server | c | requests/s | server CPU µs/request (user + sys) |");
    println!("| --- | --- | --- | --- | --- |");
    for round in 1..=rounds {
        for &c in &concurrency {
            for server in &servers {
                let (child, port) = spawn_server(server)?;
                let result = measure(child.id(), port, c, seconds, ticks_per_second);
                stop(child);
                let (rate, user, sys) = result?;
                println!("| {round} | {server} | {c} | {rate:.0} | {:.1} ({user:.1} + {sys:.1}) |", user + sys);
            }
        }
    }
    Ok(())
}

/// The child: binds a free port, prints it, and serves until killed.
fn serve(kind: &str) -> Result<(), Box<dyn std::error::Error>> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    println!("{}", listener.local_addr()?.port());
    std::io::stdout().flush()?;
    match kind {
        "threads" => loop {
            let (stream, _) = listener.accept()?;
            std::thread::spawn(move || serve_blocking(stream));
        },
        "tokio" => {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async move {
                listener.set_nonblocking(true)?;
                let listener = tokio::net::TcpListener::from_std(listener)?;
                loop {
                    let (stream, _) = listener.accept().await?;
                    tokio::spawn(serve_async(stream));
                }
            })
        }
        other => Err(format!("unknown server {other}: tokio or threads").into()),
    }
}

fn serve_blocking(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut request = [0u8; REQUEST_BYTES];
    let reply = [7u8; REPLY_BYTES];
    while stream.read_exact(&mut request).is_ok() {
        if stream.write_all(&reply).is_err() {
            return;
        }
    }
}

async fn serve_async(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = stream.set_nodelay(true);
    let mut request = [0u8; REQUEST_BYTES];
    let reply = [7u8; REPLY_BYTES];
    while stream.read_exact(&mut request).await.is_ok() {
        if stream.write_all(&reply).await.is_err() {
            return;
        }
    }
}

fn spawn_server(kind: &str) -> Result<(Child, u16), Box<dyn std::error::Error>> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe).args(["--serve", kind]).stdout(Stdio::piped()).spawn()?;
    let out = child.stdout.take().ok_or("the server's stdout")?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line)?;
    Ok((child, line.trim().parse()?))
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs `c` client threads for `seconds` (after a one-second warm-up) and returns requests per
/// second and the server's user and system CPU per request in microseconds.
fn measure(
    pid: u32,
    port: u16,
    c: usize,
    seconds: f64,
    ticks_per_second: f64,
) -> Result<(f64, f64, f64), Box<dyn std::error::Error>> {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..c {
        let mut stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_nodelay(true)?;
        let done = Arc::clone(&done);
        let stop = Arc::clone(&stop);
        clients.push(std::thread::spawn(move || {
            let request = [1u8; REQUEST_BYTES];
            let mut reply = [0u8; REPLY_BYTES];
            while !stop.load(Ordering::Relaxed) {
                if stream.write_all(&request).is_err() || stream.read_exact(&mut reply).is_err() {
                    return;
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    std::thread::sleep(Duration::from_secs(1));
    let (user0, sys0) = cpu_ticks(pid)?;
    let count0 = done.load(Ordering::Relaxed);
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let (user1, sys1) = cpu_ticks(pid)?;
    let count1 = done.load(Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        let _ = client.join();
    }
    let requests = (count1 - count0).max(1) as f64;
    let per = |ticks: u64| ticks as f64 / ticks_per_second / requests * 1e6;
    Ok((requests / elapsed, per(user1 - user0), per(sys1 - sys0)))
}

/// (utime, stime) of a process, in clock ticks (/proc/PID/stat fields 14 and 15).
fn cpu_ticks(pid: u32) -> Result<(u64, u64), Box<dyn std::error::Error>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').ok_or("/proc/PID/stat without a command name")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Ok((fields[11].parse()?, fields[12].parse()?))
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`), 100 on Linux.
fn clock_ticks_per_second() -> Result<f64, Box<dyn std::error::Error>> {
    let out = Command::new("getconf").arg("CLK_TCK").output()?;
    Ok(String::from_utf8(out.stdout)?.trim().parse()?)
}
