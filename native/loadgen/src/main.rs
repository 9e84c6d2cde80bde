//! gw-loadgen: the native engine of `gateway loadtest` (`--engine native`).
//!
//! One process, one epoll loop: opens `--connections` WebSocket connections
//! (upgrade, then the gateway's `hello` unless `--mode echo`), and once all
//! are open keeps `--window` messages in flight on each for `--duration`
//! seconds (closed loop: the next message leaves when one is acknowledged,
//! or echoed), or with `--rate` sends that many messages per second round
//! robin over the first `--active` connections (open loop). Prints one JSON
//! object (counts, errors, latency histograms as `[microseconds, count]`
//! pairs, a per-second timeline) on stdout.
//!
//! It exists so the load client costs a few microseconds per message: the
//! Python engine needs ~20 µs, which on a 2-core machine leaves the server
//! under test one core whatever the server is.

mod engine;
mod hist;
mod mp;
mod sys;
mod ws;

use std::net::Ipv4Addr;
use std::process::ExitCode;

use engine::{Mode, Plan};

const USAGE: &str = "usage: gw-loadgen --host IP --port N [--path /v1/ws] [--mode gateway|echo] \
[--connections N] [--window N] [--size BYTES] [--duration S] [--max-runtime S] \
[--tokens FILE] [--src-ips IP,IP...] [--origin URL] [--platform NAME] [--max-pending N] \
[--ramp PER_S] [--rate MSGS_PER_S] [--active N]";

fn parse(args: &[String]) -> Result<Plan, String> {
    let mut p = Plan::default();
    let mut tokens_file: Option<String> = None;
    let mut it = args.iter();
    while let Some(k) = it.next() {
        let v = it.next().ok_or_else(|| format!("{k} needs a value"))?;
        let num = |what: &str| -> Result<u64, String> {
            v.parse::<u64>()
                .map_err(|_| format!("{what}: not a whole number: {v}"))
        };
        let secs = |what: &str| -> Result<f64, String> {
            v.parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .ok_or_else(|| format!("{what}: not a non-negative number: {v}"))
        };
        match k.as_str() {
            "--host" => {
                p.host = v
                    .parse()
                    .map_err(|_| format!("--host: not an IPv4 address: {v}"))?
            }
            "--port" => {
                p.port =
                    u16::try_from(num("--port")?).map_err(|_| "--port: too large".to_string())?
            }
            "--path" => p.path = v.clone(),
            "--mode" => {
                p.mode = match v.as_str() {
                    "gateway" => Mode::Gateway,
                    "echo" => Mode::Echo,
                    _ => return Err(format!("--mode: gateway or echo, not {v}")),
                }
            }
            "--connections" => p.connections = num("--connections")? as usize,
            "--window" => p.window = num("--window")?.clamp(1, 1024) as usize,
            "--size" => p.size = num("--size")?.clamp(1, 1 << 20) as usize,
            "--duration" => p.duration = secs("--duration")?,
            "--max-runtime" => p.max_runtime = secs("--max-runtime")?,
            "--ramp" => p.ramp = secs("--ramp")?,
            "--rate" => p.rate = secs("--rate")?,
            "--active" => p.active = num("--active")? as usize,
            "--max-pending" => p.max_pending = num("--max-pending")?.max(1) as usize,
            "--tokens" => tokens_file = Some(v.clone()),
            "--src-ips" => {
                p.src_ips = v
                    .split(',')
                    .map(|s| {
                        s.parse::<Ipv4Addr>()
                            .map_err(|_| format!("--src-ips: bad address {s}"))
                    })
                    .collect::<Result<_, _>>()?
            }
            "--origin" => p.origin = Some(v.clone()),
            "--platform" => p.platform = v.clone(),
            _ => return Err(format!("unknown option {k}")),
        }
    }
    if p.port == 0 {
        return Err("--port is required".into());
    }
    if let Some(f) = tokens_file {
        let text = std::fs::read_to_string(&f).map_err(|e| format!("--tokens {f}: {e}"))?;
        p.tokens = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
    }
    if p.mode == Mode::Gateway && p.tokens.is_empty() {
        return Err("--mode gateway needs --tokens".into());
    }
    if p.connections > 0 && p.src_ips.is_empty() {
        return Err("--src-ips: at least one address".into());
    }
    Ok(p)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let plan = match parse(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("gw-loadgen: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match engine::run(&plan) {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gw-loadgen: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn options_and_their_errors() {
        let p = parse(&a(
            "--host 127.0.0.2 --port 80 --mode echo --window 5000 --size 10",
        ))
        .unwrap();
        assert_eq!(
            (p.port, p.window, p.size, p.mode),
            (80, 1024, 10, Mode::Echo)
        );
        assert_eq!(p.host, Ipv4Addr::new(127, 0, 0, 2));
        for (bad, msg) in [
            ("--port 70000", "too large"),
            ("--port 1 --mode x", "gateway or echo"),
            ("--port 1", "needs --tokens"),
            (
                "--port 1 --tokens /nonexistent/t",
                "--tokens /nonexistent/t",
            ),
            ("--port 1 --duration -1", "non-negative"),
            ("--port 1 --rate x", "--rate: not a non-negative"),
            ("--port", "needs a value"),
            ("--bogus 1", "unknown option"),
            ("--mode echo", "--port is required"),
            ("--port 1 --mode echo --src-ips 1.2.3", "bad address"),
        ] {
            let e = parse(&a(bad)).unwrap_err();
            assert!(e.contains(msg), "{bad}: {e}");
        }
    }
}
