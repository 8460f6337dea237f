//! A Mosquitto broker of the test's own: started on an ephemeral loopback port with a
//! generated config, killed by pid and restarted on the same port for fault tests.
//! Never touches the system broker on 1883.

use super::{free_port, wait_until};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// What the generated `mosquitto.conf` says beyond an anonymous plain listener.
#[derive(Debug, Clone, Default)]
pub struct MosquittoConfig {
    /// Lines added to the config verbatim (e.g. `max_inflight_messages 20`).
    pub extra: Vec<String>,
    /// Lines added inside the listener block (e.g. `certfile ...`, `password_file ...`).
    pub listener_extra: Vec<String>,
    /// `allow_anonymous false` when set.
    pub deny_anonymous: bool,
}

pub struct Mosquitto {
    pub port: u16,
    config: MosquittoConfig,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Mosquitto {
    /// Is the `mosquitto` binary on PATH? Tests that need it skip with a message when not,
    /// so `cargo test` passes on a fresh machine; `.ci/run` sets
    /// `LUADRIVER_REQUIRE_MOSQUITTO=1`, which turns a missing binary into a failure.
    pub fn available() -> bool {
        let found = Command::new("mosquitto")
            .arg("-h")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found && std::env::var_os("LUADRIVER_REQUIRE_MOSQUITTO").is_some() {
            panic!("LUADRIVER_REQUIRE_MOSQUITTO is set but mosquitto is not on PATH");
        }
        if !found {
            eprintln!("skipped: mosquitto is not on PATH");
        }
        found
    }

    pub fn start() -> Mosquitto {
        Self::start_with(MosquittoConfig::default())
    }

    /// A broker that holds, without limit, what a slow subscriber has not read yet.
    pub fn start_with_unlimited_queues() -> Mosquitto {
        Self::start_with(MosquittoConfig {
            extra: vec!["max_queued_messages 0".into()],
            ..Default::default()
        })
    }

    pub fn start_with(config: MosquittoConfig) -> Mosquitto {
        let dir = tempfile::tempdir().expect("temp dir for mosquitto");
        let mut broker = Mosquitto {
            port: free_port(),
            config,
            dir,
            child: None,
        };
        broker.spawn();
        broker
    }

    /// The folder holding the config and log: a place for password files and certificates.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, by pid: the broker vanishes without a word to its clients.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start again on the same port with the same config.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// The broker's log so far, for assertion messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    fn spawn(&mut self) {
        let conf_path = self.dir.path().join("mosquitto.conf");
        let log_path = self.dir.path().join("mosquitto.log");
        let mut conf = vec![
            "persistence false".to_string(),
            format!("log_dest file {}", log_path.display()),
            "log_type all".to_string(),
            format!("allow_anonymous {}", !self.config.deny_anonymous),
        ];
        conf.extend(self.config.extra.iter().cloned());
        conf.push(format!("listener {} 127.0.0.1", self.port));
        conf.extend(self.config.listener_extra.iter().cloned());
        std::fs::write(&conf_path, conf.join("\n") + "\n").expect("write mosquitto.conf");

        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto (is it on PATH?)");
        self.child = Some(child);
        let port = self.port;
        let up = wait_until(Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(
            up,
            "mosquitto did not open port {port}; log:\n{}",
            self.log()
        );
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}
