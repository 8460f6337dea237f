//! Drivers started in-process for tests. A test driver reports what it saw with
//! `C4:FireEvent(text)`; the test reads those notices in order, each wait bounded.

use crossbeam_channel::Receiver;
use luadriver::driver::{
    self, DriverEvent, DriverHandle, DriverNotice, DriverSpec, InitType, IoThread,
};
use luadriver::package::DriverPackage;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::path::Path;
use std::time::{Duration, Instant};

pub const WAIT: Duration = Duration::from_secs(10);

/// Lua for test drivers: `say(...)` fires one event holding the arguments' `tostring`,
/// space-separated. Global, so snippets run with `loadstring` can call it too.
pub const SAY: &str = r#"
function say(...)
  local parts = {}
  for i = 1, select('#', ...) do parts[#parts + 1] = tostring((select(i, ...))) end
  C4:FireEvent(table.concat(parts, " "))
end
"#;

pub struct TestDriver {
    pub handle: Option<DriverHandle>,
    pub notices: Receiver<DriverNotice>,
    pub dir: tempfile::TempDir,
    /// Events fired before `Initialized` (by the chunk or `OnDriverInit`).
    early: RefCell<VecDeque<String>>,
}

impl TestDriver {
    /// Writes `source` as `driver.lua` in a fresh folder and starts it up to `LateInit`.
    pub fn start(source: &str) -> TestDriver {
        Self::start_with(source, &[], &[])
    }

    /// Also writes extra files (modules) beside it and sets properties.
    pub fn start_with(source: &str, files: &[(&str, &str)], props: &[(&str, &str)]) -> TestDriver {
        Self::start_placed(source, files, props, IoThread::Own)
    }

    /// [`TestDriver::start_with`], its MQTT on the given I/O thread.
    pub fn start_placed(
        source: &str,
        files: &[(&str, &str)],
        props: &[(&str, &str)],
        io: IoThread,
    ) -> TestDriver {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("driver.lua"), source).expect("write driver");
        for (name, text) in files {
            let path = dir.path().join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).expect("module folder");
            }
            std::fs::write(path, text).expect("write module");
        }
        let package =
            luadriver::package::load(&dir.path().join("driver.lua")).expect("load package");
        Self::start_package(package, dir, props, io)
    }

    pub fn start_package(
        package: DriverPackage,
        dir: tempfile::TempDir,
        props: &[(&str, &str)],
        io: IoThread,
    ) -> TestDriver {
        let (tx, notices) = crossbeam_channel::unbounded();
        let spec = DriverSpec {
            id: 42,
            package,
            properties: props
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            init_type: InitType::Adding,
            persist_path: None,
            io,
        };
        let handle = driver::spawn(spec, tx).expect("spawn driver");
        let d = TestDriver {
            handle: Some(handle),
            notices,
            dir,
            early: RefCell::new(VecDeque::new()),
        };
        loop {
            match d.notices.recv_timeout(WAIT) {
                Ok(DriverNotice::Initialized { .. }) => break,
                Ok(DriverNotice::Event { name, .. }) => d.early.borrow_mut().push_back(name),
                other => panic!("driver did not initialize: {other:?}"),
            }
        }
        d.send(DriverEvent::LateInit);
        d
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn send(&self, event: DriverEvent) {
        assert!(
            self.handle.as_ref().expect("running").send(event),
            "driver loop ended"
        );
    }

    /// The next `C4:FireEvent` text, skipping nothing; panics after `WAIT`.
    pub fn next(&self) -> String {
        self.next_within(WAIT)
            .unwrap_or_else(|| panic!("no event from the driver within {WAIT:?}"))
    }

    pub fn next_within(&self, timeout: Duration) -> Option<String> {
        if let Some(e) = self.early.borrow_mut().pop_front() {
            return Some(e);
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.notices.recv_deadline(deadline) {
                Ok(DriverNotice::Event { name, .. }) => return Some(name),
                Ok(DriverNotice::Stopped { .. }) => return None,
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    /// Asserts the next events are exactly `expected`, in order.
    pub fn expect(&self, expected: &[&str]) {
        for want in expected {
            assert_eq!(&self.next(), want);
        }
    }

    /// Waits for an event satisfying `pred`, returning those passed over.
    pub fn wait_for(&self, pred: impl Fn(&str) -> bool) -> (String, Vec<String>) {
        self.wait_for_within(WAIT, pred)
    }

    /// `wait_for` with a bound of its own, counted from now.
    pub fn wait_for_within(
        &self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> (String, Vec<String>) {
        let deadline = Instant::now() + timeout;
        let mut skipped = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(e) = self.next_within(left) else {
                panic!(
                    "the awaited event did not come within {timeout:?}; came instead: {skipped:#?}"
                );
            };
            if pred(&e) {
                return (e, skipped);
            }
            skipped.push(e);
        }
    }

    /// Stops the driver (OnDriverDestroyed) and returns the events it fired meanwhile.
    pub fn stop(mut self) -> Vec<String> {
        if let Some(h) = self.handle.take() {
            h.stop("TEST_DONE");
        }
        self.notices
            .try_iter()
            .filter_map(|n| match n {
                DriverNotice::Event { name, .. } => Some(name),
                _ => None,
            })
            .collect()
    }
}
