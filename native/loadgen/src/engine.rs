//! The epoll loop: connections, the session handshake, the closed loop of
//! messages and the counts.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::hist::Hist;
use crate::sys::{self, Epoll, HUP_ERR, IN, OUT};
use crate::{mp, ws};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The gateway's session protocol: hello/welcome, msg/ack, deliver.
    Gateway,
    /// Any WebSocket echo server: every frame sent comes back.
    Echo,
}

#[derive(Debug)]
pub struct Plan {
    pub host: Ipv4Addr,
    pub port: u16,
    pub path: String,
    pub mode: Mode,
    pub connections: usize,
    pub window: usize,
    pub size: usize,
    pub duration: f64,
    pub max_runtime: f64,
    pub max_pending: usize,
    /// New connections per second; 0 = as fast as `max_pending` allows.
    pub ramp: f64,
    /// Messages per second over the active connections (open loop, each
    /// connection still at most `window` in flight); 0 = closed loop.
    pub rate: f64,
    /// Connections that send: the first `active`; the rest stay idle.
    pub active: usize,
    pub tokens: Vec<String>,
    pub src_ips: Vec<Ipv4Addr>,
    pub origin: Option<String>,
    pub platform: String,
}

impl Default for Plan {
    fn default() -> Self {
        Plan {
            host: Ipv4Addr::LOCALHOST,
            port: 0,
            path: "/v1/ws".into(),
            mode: Mode::Gateway,
            connections: 100,
            window: 1,
            size: 230,
            duration: 10.0,
            max_runtime: 600.0,
            max_pending: 2000,
            ramp: 0.0,
            rate: 0.0,
            active: usize::MAX,
            tokens: Vec::new(),
            src_ips: vec![Ipv4Addr::LOCALHOST],
            origin: None,
            platform: "web".into(),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Idle,
    Connecting,
    Upgrading,
    Hello,
    Open,
    Closed,
}

struct Conn {
    fd: i32,
    state: State,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    inflight: VecDeque<(u64, Instant)>,
    next_id: u64,
    last_seq: u64,
    acked_seq: u64,
    t_open: Instant,
}

/// Counters with the names the Python engine uses.
#[derive(Default)]
struct Counts {
    connected: u64,
    connect_errors: u64,
    handshake_rejected: u64,
    disconnects: u64,
    sent: u64,
    acked: u64,
    dup_acks: u64,
    delivered: u64,
    pings_answered: u64,
}

struct Engine<'a> {
    p: &'a Plan,
    ep: Epoll,
    conns: Vec<Conn>,
    counts: Counts,
    errors: BTreeMap<String, u64>,
    closes: BTreeMap<String, u64>,
    connect_h: Hist,
    rtt_h: Hist,
    sec_h: Hist,
    sec_hists: Vec<(u64, String)>,
    timeline: Vec<String>,
    masker: ws::Masker,
    body: Vec<u8>,
    pending: usize,
    open_now: usize,
    sending: bool,
    /// CPU seconds used while sending (from all connections open to the end).
    send_cpu: f64,
    retry: BinaryHeap<Reverse<(Instant, usize)>>,
    scratch: Vec<u8>,
    recv_buf: Vec<u8>,
    /// Open loop: messages owed, and the next connection to send on.
    credit: f64,
    rr: usize,
    /// Open loop: wakes the loop when the next message is owed.
    timer: Option<sys::Timer>,
}

/// The epoll key of the pacing timer (connection keys are indexes).
const TIMER_KEY: u64 = u64::MAX;
/// The open loop never wakes more often than this.
const MIN_PACE: Duration = Duration::from_micros(20);

const RECV_SIZE: usize = 256 * 1024;
/// The client acknowledges deliveries every this many frames.
const ACK_EVERY: u64 = 16;
/// A refused message is sent again after this long without a retry_after.
const RETRY: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

fn body(size: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ size as u64;
    (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b"0123456789abcdef"[(x & 15) as usize]
        })
        .collect()
}

impl<'a> Engine<'a> {
    fn new(p: &'a Plan) -> std::io::Result<Self> {
        let now = Instant::now();
        let conns = (0..p.connections)
            .map(|_| Conn {
                fd: -1,
                state: State::Idle,
                rbuf: Vec::new(),
                wbuf: Vec::new(),
                inflight: VecDeque::new(),
                next_id: 1,
                last_seq: 0,
                acked_seq: 0,
                t_open: now,
            })
            .collect();
        let seed = now.elapsed().as_nanos() as u64 ^ std::process::id() as u64;
        let ep = Epoll::new(4096)?;
        let timer = if p.rate > 0.0 {
            let t = sys::Timer::new()?;
            ep.add(t.fd, IN, TIMER_KEY)?;
            Some(t)
        } else {
            None
        };
        Ok(Engine {
            p,
            ep,
            conns,
            counts: Counts::default(),
            errors: BTreeMap::new(),
            closes: BTreeMap::new(),
            connect_h: Hist::new(),
            rtt_h: Hist::new(),
            sec_h: Hist::new(),
            sec_hists: Vec::new(),
            timeline: Vec::new(),
            masker: ws::Masker::new(seed.wrapping_mul(0x2545_f491_4f6c_dd1d)),
            body: body(p.size),
            pending: 0,
            open_now: 0,
            sending: false,
            send_cpu: 0.0,
            retry: BinaryHeap::new(),
            scratch: Vec::with_capacity(512),
            recv_buf: vec![0; RECV_SIZE],
            credit: 0.0,
            rr: 0,
            timer,
        })
    }

    fn err(&mut self, key: String) {
        *self.errors.entry(key).or_insert(0) += 1;
    }

    fn start_connect(&mut self, i: usize) {
        let p = self.p;
        let src = p.src_ips[i % p.src_ips.len()];
        match sys::connect(src, p.host, p.port) {
            Ok(fd) => {
                if let Err(e) = self.ep.add(fd, IN | OUT, i as u64) {
                    sys::close(fd);
                    self.err(format!("connect:{e}"));
                    self.counts.connect_errors += 1;
                    return;
                }
                let c = &mut self.conns[i];
                c.fd = fd;
                c.state = State::Connecting;
                c.t_open = Instant::now();
                self.pending += 1;
            }
            Err(e) => {
                self.counts.connect_errors += 1;
                self.err(format!("connect:{}", errno_name(e.raw_os_error())));
            }
        }
    }

    fn close(&mut self, i: usize, reason: Option<String>) {
        let c = &mut self.conns[i];
        match c.state {
            State::Idle | State::Closed => return,
            State::Open => self.open_now -= 1,
            _ => self.pending -= 1,
        }
        sys::close(c.fd);
        c.fd = -1;
        c.state = State::Closed;
        c.rbuf = Vec::new();
        c.wbuf = Vec::new();
        if let Some(r) = reason {
            // closed by the server or the network, not by us
            *self.closes.entry(r).or_insert(0) += 1;
            self.counts.disconnects += 1;
        }
    }

    /// Sends what the connection has gathered; keeps the rest for EPOLLOUT.
    fn flush(&mut self, i: usize) {
        let c = &mut self.conns[i];
        if c.wbuf.is_empty() || c.fd < 0 {
            return;
        }
        match sys::send(c.fd, &c.wbuf) {
            Ok(n) if n == c.wbuf.len() => c.wbuf.clear(),
            Ok(n) => {
                c.wbuf.drain(..n);
                let _ = self.ep.modify(c.fd, IN | OUT, i as u64);
            }
            Err(_) => self.close(i, Some("send_error".into())),
        }
    }

    fn frame(&mut self, i: usize, op: u8, payload: &[u8]) {
        let c = &mut self.conns[i];
        ws::frame(&mut c.wbuf, op, payload, &mut self.masker);
    }

    fn send_msg(&mut self, i: usize, now: Instant) {
        let c = &mut self.conns[i];
        let id = c.next_id;
        c.next_id += 1;
        c.inflight.push_back((id, now));
        self.counts.sent += 1;
        match self.p.mode {
            Mode::Echo => {
                ws::frame(&mut c.wbuf, ws::OP_TEXT, &self.body, &mut self.masker);
            }
            Mode::Gateway => {
                let m = &mut self.scratch;
                m.clear();
                mp::map(m, 3);
                mp::str(m, "t");
                mp::str(m, "msg");
                mp::str(m, "id");
                mp::uint(m, id);
                mp::str(m, "body");
                mp::bin(m, &self.body);
                ws::frame(&mut c.wbuf, ws::OP_BINARY, m, &mut self.masker);
            }
        }
    }

    /// Whether connection `i` runs the closed loop (sends again on each ack).
    fn looping(&self, i: usize) -> bool {
        self.sending && self.p.rate == 0.0 && i < self.p.active
    }

    fn fill(&mut self, i: usize, now: Instant) {
        while self.has_room(i) {
            self.send_msg(i, now);
        }
    }

    fn hello(&mut self, i: usize) {
        let mut m = Vec::with_capacity(512);
        mp::map(&mut m, 4);
        mp::str(&mut m, "t");
        mp::str(&mut m, "hello");
        mp::str(&mut m, "v");
        mp::uint(&mut m, 1);
        mp::str(&mut m, "platform");
        mp::str(&mut m, &self.p.platform);
        mp::str(&mut m, "token");
        mp::str(&mut m, &self.p.tokens[i % self.p.tokens.len()]);
        self.frame(i, ws::OP_BINARY, &m);
    }

    fn opened(&mut self, i: usize, now: Instant) {
        let c = &mut self.conns[i];
        c.state = State::Open;
        self.pending -= 1;
        self.open_now += 1;
        self.counts.connected += 1;
        self.connect_h
            .record(now.duration_since(c.t_open).as_micros().max(1) as u64);
        if self.looping(i) {
            self.fill(i, now);
        }
    }

    fn acked(&mut self, i: usize, pos: usize, now: Instant) {
        let Some((_, t)) = self.conns[i].inflight.remove(pos) else {
            return;
        };
        let us = now.duration_since(t).as_micros().max(1) as u64;
        self.rtt_h.record(us);
        self.sec_h.record(us);
        self.counts.acked += 1;
        if self.looping(i) {
            self.send_msg(i, now);
        }
    }

    fn on_app_frame(&mut self, i: usize, payload: &[u8], now: Instant) {
        if self.p.mode == Mode::Echo {
            if !self.conns[i].inflight.is_empty() {
                self.acked(i, 0, now);
            }
            return;
        }
        let Some(f) = mp::read_frame(payload) else {
            self.err("bad_server_payload".into());
            return;
        };
        match f.t {
            b"ack" => {
                let c = &self.conns[i];
                if let Some(pos) =
                    f.id.and_then(|id| c.inflight.iter().position(|m| m.0 == id))
                {
                    self.acked(i, pos, now);
                } else {
                    self.counts.dup_acks += 1;
                }
            }
            b"deliver" => {
                let c = &mut self.conns[i];
                if let Some(seq) = f.seq.filter(|&s| s > c.last_seq) {
                    c.last_seq = seq;
                    self.counts.delivered += 1;
                }
                if c.last_seq - c.acked_seq >= ACK_EVERY {
                    c.acked_seq = c.last_seq;
                    let mut m = Vec::with_capacity(24);
                    mp::map(&mut m, 2);
                    mp::str(&mut m, "t");
                    mp::str(&mut m, "ack");
                    mp::str(&mut m, "seq");
                    mp::uint(&mut m, c.last_seq);
                    self.frame(i, ws::OP_BINARY, &m);
                }
            }
            b"welcome" if self.conns[i].state == State::Hello => self.opened(i, now),
            b"ping" => {
                let mut m = Vec::with_capacity(24);
                mp::map(&mut m, 2);
                mp::str(&mut m, "t");
                mp::str(&mut m, "pong");
                mp::str(&mut m, "ts");
                mp::uint(&mut m, f.ts.unwrap_or(0).max(0) as u64);
                self.frame(i, ws::OP_BINARY, &m);
                self.counts.pings_answered += 1;
            }
            b"error" => {
                self.err(format!("code:{}", f.code.unwrap_or(0)));
                let c = &mut self.conns[i];
                if let Some(pos) =
                    f.id.and_then(|id| c.inflight.iter().position(|m| m.0 == id))
                {
                    c.inflight.remove(pos);
                    let wait = f
                        .retry_after
                        .filter(|&ms| ms > 0 && ms < 600_000)
                        .map_or(RETRY, |ms| Duration::from_millis(ms as u64));
                    self.retry.push(Reverse((now + wait, i)));
                }
            }
            b"goaway" => self.err("goaway".into()),
            _ => {}
        }
    }

    /// Handles the frames at the start of `data`; returns the bytes used,
    /// or None when the connection was closed.
    fn frames(&mut self, i: usize, data: &[u8], now: Instant) -> Option<usize> {
        let mut at = 0;
        loop {
            match ws::parse(&data[at..]) {
                ws::Parsed::NeedMore => return Some(at),
                ws::Parsed::Bad(why) => {
                    self.err("bad_server_frame".into());
                    self.close(i, Some(format!("bad_server_frame:{why}")));
                    return None;
                }
                ws::Parsed::Frame(op, r, used) => {
                    let payload = &data[at + r.start..at + r.end];
                    match op {
                        ws::OP_TEXT | ws::OP_BINARY => self.on_app_frame(i, payload, now),
                        ws::OP_PING => {
                            self.frame(i, ws::OP_PONG, payload);
                            self.counts.pings_answered += 1;
                        }
                        ws::OP_CLOSE => {
                            let code = match payload {
                                [a, b, ..] => u16::from_be_bytes([*a, *b]),
                                _ => 1005,
                            };
                            self.close(i, Some(format!("close:{code}")));
                            return None;
                        }
                        _ => {}
                    }
                    at += used;
                }
            }
        }
    }

    fn readable(&mut self, i: usize, now: Instant) {
        let mut buf = std::mem::take(&mut self.recv_buf);
        let n = match sys::recv(self.conns[i].fd, &mut buf) {
            Ok(0) => {
                self.recv_buf = buf;
                self.close(i, Some("eof".into()));
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                self.recv_buf = buf;
                return;
            }
            Err(_) => {
                self.recv_buf = buf;
                self.close(i, Some("recv_error".into()));
                return;
            }
        };
        let mut rbuf = std::mem::take(&mut self.conns[i].rbuf);
        let joined = !rbuf.is_empty();
        if joined {
            rbuf.extend_from_slice(&buf[..n]);
        }
        let data: &[u8] = if joined { &rbuf } else { &buf[..n] };
        let keep = self.consume(i, data, now);
        if let Some(used) = keep {
            let rest = &data[used..];
            if !rest.is_empty() {
                let tail = rest.to_vec();
                self.conns[i].rbuf = tail;
            }
            self.flush(i);
        }
        self.recv_buf = buf;
    }

    /// Handles received bytes; returns how many were used (the rest waits
    /// for more), None when the connection was closed.
    fn consume(&mut self, i: usize, data: &[u8], now: Instant) -> Option<usize> {
        let mut start = 0;
        if self.conns[i].state == State::Upgrading {
            match ws::upgrade_response(data) {
                Ok(None) => return Some(0),
                Ok(Some(head)) => {
                    start = head;
                    self.conns[i].state = State::Hello;
                    if self.p.mode == Mode::Echo {
                        self.opened(i, now);
                    } else {
                        self.hello(i);
                    }
                }
                Err(status) => {
                    self.counts.handshake_rejected += 1;
                    self.err(format!("http:{status}"));
                    self.close(i, None);
                    return None;
                }
            }
        }
        self.frames(i, &data[start..], now).map(|used| start + used)
    }

    fn writable(&mut self, i: usize) {
        let c = &mut self.conns[i];
        if c.state == State::Connecting {
            let err = sys::so_error(c.fd);
            if err != 0 {
                self.counts.connect_errors += 1;
                self.err(format!("connect:{}", errno_name(Some(err))));
                self.close(i, None);
                return;
            }
            let _ = self.ep.modify(c.fd, IN, i as u64);
            c.state = State::Upgrading;
            let authority = format!("{}:{}", self.p.host, self.p.port);
            let req = ws::upgrade_request(&authority, &self.p.path, self.p.origin.as_deref());
            c.wbuf.extend_from_slice(&req);
            self.flush(i);
            return;
        }
        if !c.wbuf.is_empty() {
            let fd = c.fd;
            self.flush(i);
            let c = &self.conns[i];
            if c.state != State::Closed && c.wbuf.is_empty() {
                let _ = self.ep.modify(fd, IN, i as u64);
            }
        } else {
            let _ = self.ep.modify(c.fd, IN, i as u64);
        }
    }

    fn has_room(&self, i: usize) -> bool {
        let c = &self.conns[i];
        c.state == State::Open && c.inflight.len() < self.p.window
    }

    /// Open loop: sends what `elapsed` seconds at `rate` owe, round robin
    /// over the active connections that have room in their window; a backlog
    /// of more than one second's worth is dropped (and counted) rather than
    /// sent in a burst.
    fn pace(&mut self, now: Instant, elapsed: f64) {
        let active = self.p.active.min(self.conns.len());
        if active == 0 {
            return;
        }
        self.credit += elapsed * self.p.rate;
        let mut budget = (self.credit as usize).min(active);
        let mut tried = 0;
        while budget > 0 && tried < active {
            let i = self.rr % active;
            self.rr = self.rr.wrapping_add(1);
            tried += 1;
            if self.has_room(i) {
                self.send_msg(i, now);
                self.flush(i);
                budget -= 1;
                self.credit -= 1.0;
            }
        }
        if self.credit > self.p.rate {
            self.err("send_backlog".into());
            self.credit = 0.0;
        }
    }

    fn sample(&mut self, t: f64, second: u64) {
        self.timeline.push(format!(
            "[{t:.3},{},{},{}]",
            self.open_now, self.counts.acked, self.counts.delivered
        ));
        if self.sec_h.total() > 0 {
            self.sec_hists.push((second, self.sec_h.json()));
            self.sec_h = Hist::new();
        }
    }

    fn run(&mut self) -> std::io::Result<(Option<f64>, f64)> {
        let p = self.p;
        let start = Instant::now();
        let hard_stop = start + Duration::from_secs_f64(p.max_runtime);
        let mut next = 0;
        let mut all_open: Option<Instant> = None;
        let mut cpu_at_open: Option<f64> = None;
        let mut send_until = hard_stop;
        let mut last_sample = start;
        let mut last_tick = start;
        loop {
            let now = Instant::now();
            if now >= hard_stop || now >= send_until {
                break;
            }
            let allowed = if p.ramp > 0.0 {
                ((now.duration_since(start).as_secs_f64() * p.ramp) as usize + 1).min(p.connections)
            } else {
                p.connections
            };
            while next < allowed && self.pending < p.max_pending {
                self.start_connect(next);
                next += 1;
            }
            if all_open.is_none() && next == p.connections && self.pending == 0 {
                all_open = Some(now);
                cpu_at_open = Some(sys::cpu_seconds());
                send_until = now + Duration::from_secs_f64(p.duration);
                self.sending = true;
                last_tick = now;
                for i in 0..self.conns.len() {
                    if self.looping(i) {
                        self.fill(i, now);
                        self.flush(i);
                    }
                }
            }
            if self.sending && p.rate > 0.0 {
                self.pace(now, now.duration_since(last_tick).as_secs_f64());
            }
            last_tick = now;
            if self.pending > 0 {
                let stuck: Vec<usize> = (0..self.conns.len())
                    .filter(|&i| {
                        let c = &self.conns[i];
                        !matches!(c.state, State::Idle | State::Open | State::Closed)
                            && now.duration_since(c.t_open) > CONNECT_TIMEOUT
                    })
                    .collect();
                for i in stuck {
                    self.err("connect_timeout".into());
                    self.close(i, None);
                }
            }
            while let Some(Reverse((when, i))) = self.retry.peek().copied() {
                if when > now {
                    break;
                }
                self.retry.pop();
                if self.looping(i) {
                    self.fill(i, now);
                } else if self.sending && self.p.rate > 0.0 && self.has_room(i) {
                    self.send_msg(i, now);
                }
                self.flush(i);
            }
            if now.duration_since(last_sample) >= Duration::from_secs(1) {
                last_sample = now;
                let t = now.duration_since(start).as_secs_f64();
                self.sample(t, t as u64);
            }
            let until = send_until.min(last_sample + Duration::from_secs(1));
            let wait = until
                .saturating_duration_since(now)
                .as_millis()
                .clamp(1, 50) as i32;
            if let (true, Some(t)) = (self.sending, &self.timer) {
                // wake when the next message is owed, to the microsecond, so
                // sends are spread evenly rather than sent in 1 ms bursts
                let owed = Duration::from_secs_f64((1.0 - self.credit).max(0.0) / p.rate);
                t.arm(owed.max(MIN_PACE))?;
            }
            for (key, ev) in self.ep.wait(wait)? {
                if key == TIMER_KEY {
                    if let Some(t) = &self.timer {
                        t.clear();
                    }
                    continue;
                }
                let i = key as usize;
                if self.conns[i].state == State::Closed {
                    continue;
                }
                let now = Instant::now();
                if ev & OUT != 0 || (self.conns[i].state == State::Connecting && ev & HUP_ERR != 0)
                {
                    self.writable(i);
                    if self.conns[i].state == State::Closed {
                        continue;
                    }
                }
                if ev & (IN | HUP_ERR) != 0 && self.conns[i].state != State::Connecting {
                    self.readable(i, now);
                }
            }
        }
        let end = Instant::now();
        // the CPU of the sending window only (not the ramp): what the
        // report's "busiest client process" compares with the send time
        self.send_cpu = cpu_at_open.map_or(0.0, |c| sys::cpu_seconds() - c);
        let t = end.duration_since(start).as_secs_f64();
        self.sample(t, t as u64);
        let ramp = all_open.map(|a| a.duration_since(start).as_secs_f64());
        let send = all_open.map_or(0.0, |a| end.min(send_until).duration_since(a).as_secs_f64());
        Ok((ramp, send))
    }

    fn json(&self, ramp: Option<f64>, send: f64) -> String {
        let c = &self.counts;
        let mut s = String::new();
        let _ = write!(
            s,
            "{{\"counts\":{{\"connected\":{},\"connect_errors\":{},\"handshake_rejected\":{},\
             \"disconnects\":{},\"sent\":{},\"acked\":{},\"dup_acks\":{},\"delivered\":{},\
             \"pings_answered\":{}}}",
            c.connected,
            c.connect_errors,
            c.handshake_rejected,
            c.disconnects,
            c.sent,
            c.acked,
            c.dup_acks,
            c.delivered,
            c.pings_answered
        );
        for (name, map) in [("errors", &self.errors), ("closes", &self.closes)] {
            let items: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{}:{v}", json_str(k)))
                .collect();
            let _ = write!(s, ",\"{name}\":{{{}}}", items.join(","));
        }
        let _ = write!(
            s,
            ",\"open_at_end\":{},\"ramp_seconds\":{},\"send_seconds\":{send:.6},\
             \"send_cpu_seconds\":{:.6},\
             \"timeline\":[{}],\"hist_pairs\":{{\"connect_us\":{},\"rtt_us\":{}}},\
             \"sec_pairs\":[{}]}}",
            self.open_now,
            ramp.map_or("null".to_string(), |r| format!("{r:.6}")),
            self.send_cpu,
            self.timeline.join(","),
            self.connect_h.json(),
            self.rtt_h.json(),
            self.sec_hists
                .iter()
                .map(|(t, h)| format!("[{t},{h}]"))
                .collect::<Vec<_>>()
                .join(",")
        );
        s
    }
}

/// Runs the plan; the result as one JSON object.
pub fn run(p: &Plan) -> std::io::Result<String> {
    let mut e = Engine::new(p)?;
    let (ramp, send) = e.run()?;
    let out = e.json(ramp, send);
    for i in 0..e.conns.len() {
        let st = e.conns[i].state;
        if !matches!(st, State::Idle | State::Closed) {
            sys::close(e.conns[i].fd);
            e.conns[i].state = State::Closed;
        }
    }
    Ok(out)
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for ch in s.chars() {
        match ch {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn errno_name(code: Option<i32>) -> String {
    match code {
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(libc::EADDRNOTAVAIL) => "EADDRNOTAVAIL".into(),
        Some(libc::ETIMEDOUT) => "ETIMEDOUT".into(),
        Some(libc::EMFILE) => "EMFILE".into(),
        Some(n) => format!("errno{n}"),
        None => "unknown".into(),
    }
}
