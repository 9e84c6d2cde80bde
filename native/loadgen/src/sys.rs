//! Thin wrappers over the few Linux calls the client makes (non-blocking
//! TCP sockets, epoll and a timerfd), each returning `std::io::Result`.

use std::io;
use std::net::Ipv4Addr;

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn sockaddr(ip: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// A non-blocking TCP socket bound to `src` (any port), connecting to
/// `dst:port`. Returns the descriptor once the connect is under way.
pub fn connect(src: Ipv4Addr, dst: Ipv4Addr, port: u16) -> io::Result<i32> {
    // SAFETY: plain syscall with constant arguments; the result is checked.
    let fd = check(unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })?;
    let one: libc::c_int = 1;
    let local = sockaddr(src, 0);
    let remote = sockaddr(dst, port);
    let size = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: `fd` is the socket just created; the option value and the
    // addresses are live locals of the sizes passed.
    let rc = unsafe {
        if libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) < 0
            || libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), size) < 0
        {
            -1
        } else {
            libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), size)
        }
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            close(fd);
            return Err(e);
        }
    }
    Ok(fd)
}

/// The pending error of a socket whose connect finished (0 = connected).
pub fn so_error(fd: i32) -> i32 {
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `err` and `len` are live locals of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    } else {
        err
    }
}

/// User + system CPU seconds this process has used so far.
pub fn cpu_seconds() -> f64 {
    // SAFETY: an all-zero `rusage` is a valid value of this plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a live, writable `rusage` for the call to fill.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

pub fn close(fd: i32) {
    // SAFETY: the caller owns `fd` and never uses it again.
    unsafe {
        libc::close(fd);
    }
}

/// Bytes sent; 0 when the socket would block.
pub fn send(fd: i32, data: &[u8]) -> io::Result<usize> {
    // SAFETY: `data` is a live slice of the length passed.
    let n = unsafe { libc::send(fd, data.as_ptr().cast(), data.len(), libc::MSG_NOSIGNAL) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::WouldBlock {
            Ok(0)
        } else {
            Err(e)
        };
    }
    Ok(n as usize)
}

/// Bytes received (0 = end of stream); WouldBlock when there is nothing.
pub fn recv(fd: i32, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a live, writable slice of the length passed.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

pub struct Epoll {
    fd: i32,
    events: Vec<libc::epoll_event>,
}

pub const IN: u32 = libc::EPOLLIN as u32;
pub const OUT: u32 = libc::EPOLLOUT as u32;
pub const HUP_ERR: u32 = (libc::EPOLLHUP | libc::EPOLLERR) as u32;

impl Epoll {
    pub fn new(capacity: usize) -> io::Result<Self> {
        // SAFETY: plain syscall; the result is checked.
        let fd = check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        let events = vec![libc::epoll_event { events: 0, u64: 0 }; capacity.max(1)];
        Ok(Epoll { fd, events })
    }

    fn ctl(&self, op: libc::c_int, fd: i32, events: u32, key: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: key };
        // SAFETY: `ev` is a live local; `self.fd` is our epoll descriptor.
        check(unsafe { libc::epoll_ctl(self.fd, op, fd, &mut ev) }).map(|_| ())
    }

    pub fn add(&self, fd: i32, events: u32, key: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, events, key)
    }

    pub fn modify(&self, fd: i32, events: u32, key: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, events, key)
    }

    /// Waits up to `timeout_ms`; returns the ready `(key, events)` pairs.
    pub fn wait(&mut self, timeout_ms: i32) -> io::Result<Vec<(u64, u32)>> {
        // SAFETY: `events` is a live buffer of the capacity passed.
        let n = unsafe {
            libc::epoll_wait(
                self.fd,
                self.events.as_mut_ptr(),
                self.events.len() as libc::c_int,
                timeout_ms,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(Vec::new())
            } else {
                Err(e)
            };
        }
        Ok(self.events[..n as usize]
            .iter()
            .map(|e| (e.u64, e.events))
            .collect())
    }
}

/// A one-shot monotonic timer readable through epoll, with the kernel's
/// hrtimer precision (epoll_wait's own timeout counts whole milliseconds).
pub struct Timer {
    pub fd: i32,
}

impl Timer {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall with constant arguments; the result is checked.
        let fd = check(unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        })?;
        Ok(Timer { fd })
    }

    /// Fires once, `after` from now (re-arming replaces the previous time).
    pub fn arm(&self, after: std::time::Duration) -> io::Result<()> {
        let after = after.max(std::time::Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: `spec` is a live local; a null old-value pointer is allowed.
        check(unsafe { libc::timerfd_settime(self.fd, 0, &spec, std::ptr::null_mut()) }).map(|_| ())
    }

    /// Consumes an expiry so the descriptor stops being readable.
    pub fn clear(&self) {
        let mut n = [0u8; 8];
        // SAFETY: `n` is a live, writable 8-byte buffer, the size a timerfd
        // read needs; a would-block result is fine and ignored.
        unsafe {
            libc::read(self.fd, n.as_mut_ptr().cast(), n.len());
        }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        close(self.fd);
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        close(self.fd);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_seconds_counts_this_process_working() {
        let before = cpu_seconds();
        let t = std::time::Instant::now();
        let mut x = 0u64;
        // busy work until 50 ms of CPU show (the machine may be shared, so
        // no fixed wall time), within a generous bound
        while cpu_seconds() - before < 0.05 {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(10),
                "CPU time never grew"
            );
            for _ in 0..10_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
        }
    }

    #[test]
    fn timer_fires_once_through_epoll_and_clears() {
        let mut ep = Epoll::new(4).unwrap();
        let t = Timer::new().unwrap();
        ep.add(t.fd, IN, 7).unwrap();
        assert!(ep.wait(0).unwrap().is_empty(), "not armed yet");
        t.arm(std::time::Duration::from_micros(200)).unwrap();
        let got = ep.wait(5000).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, 7);
        t.clear();
        assert!(ep.wait(0).unwrap().is_empty(), "one shot, and cleared");
        // re-arming replaces the earlier expiry
        t.arm(std::time::Duration::from_secs(3600)).unwrap();
        t.arm(std::time::Duration::from_micros(100)).unwrap();
        assert_eq!(ep.wait(5000).unwrap().len(), 1);
    }
}
