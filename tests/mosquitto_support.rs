mod common;

use common::mosquitto::Mosquitto;
use std::net::TcpStream;

#[test]
fn a_test_mosquitto_can_be_killed_and_restarted_on_its_port() {
    if !Mosquitto::available() {
        eprintln!("skipped: mosquitto not on PATH");
        return;
    }
    let mut broker = Mosquitto::start();
    assert_ne!(broker.port, 1883);
    assert!(TcpStream::connect(("127.0.0.1", broker.port)).is_ok());
    broker.kill();
    assert!(TcpStream::connect(("127.0.0.1", broker.port)).is_err());
    broker.restart();
    assert!(TcpStream::connect(("127.0.0.1", broker.port)).is_ok());
}
