//! Shared support for integration tests: real brokers on ephemeral loopback ports.
#![allow(dead_code)]

/// A test run twice: with the driver's MQTT on its own thread (`…::own_thread`) and on the
/// process's shared I/O thread (`…::shared_thread`). The test is `fn name(io: IoThread)`.
#[allow(unused_macros)]
macro_rules! on_either_io_thread {
    ($name:ident) => {
        mod $name {
            use luadriver::driver::IoThread;
            #[test]
            fn own_thread() {
                super::$name(IoThread::Own)
            }
            #[test]
            fn shared_thread() {
                super::$name(IoThread::Shared)
            }
        }
    };
}

pub mod certs;
pub mod drivers;
pub mod mosquitto;
pub mod proxy;

use std::time::{Duration, Instant};

/// Polls `cond` until it holds or `timeout` passes; returns whether it held. For waiting on
/// something a test cannot be told about (a port opening), never as a stand-in for an event.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A free TCP port on 127.0.0.1, chosen by the OS.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}
