//! The publish benchmark suite: `cargo bench --bench publish [-- OPTIONS]`.
//!
//! In: command-line options (`--quick`, `--only SECTIONS`, `--json PATH`, `--markdown PATH`).
//! Out: a progress line per case on stderr, the result table on stdout, the figures as JSON
//! (default `target/bench-results.json`), and with `--markdown` a `BENCHMARKS.md`-style
//! page with the machine it ran on.
//!
//! Every figure that has a target is a ratio against a baseline measured in the same run,
//! because the machines this runs on are shared and noisy: a raw rumqttc program (tokio
//! current-thread runtime, same window, same payload) for throughput and round trip, the
//! 10-driver run for scale. The brokers are started here: a private Mosquitto on loopback
//! (its `max_inflight_messages` equal to the client window) and, as a second column, the
//! embedded broker (rumqttd) in this process.

use crossbeam_channel::{Receiver, Sender};
use luadriver::broker::EmbeddedBroker;
use luadriver::driver::{
    self, DriverEvent, DriverHandle, DriverLoop, DriverNotice, DriverSpec, EventSender, IoThread,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use serde_json::{Value as Json, json};
use std::fmt::Write as _;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PAYLOAD_LEN: usize = 64;
const TOPIC: &str = "bench/luadriver";
/// The requests channel of the raw rumqttc client (`AsyncClient::new(options, cap)`).
const RUMQTTC_CAP: usize = 1024;

// ---------------------------------------------------------------- options

struct Options {
    quick: bool,
    only: Vec<String>,
    json: PathBuf,
    markdown: Option<PathBuf>,
}

impl Options {
    fn parse() -> Options {
        let mut opts = Options {
            quick: false,
            only: Vec::new(),
            json: PathBuf::from(
                std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into()),
            )
            .join("bench-results.json"),
            markdown: None,
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--quick" => opts.quick = true,
                "--only" => {
                    if let Some(list) = args.next() {
                        opts.only = list.split(',').map(str::to_string).collect();
                    }
                }
                "--json" => {
                    if let Some(path) = args.next() {
                        opts.json = path.into();
                    }
                }
                "--markdown" => opts.markdown = args.next().map(PathBuf::from),
                // `cargo bench` passes `--bench`; a filter word selects sections too.
                "--bench" => {}
                "-h" | "--help" => {
                    eprintln!(
                        "cargo bench --bench publish -- [--quick] [--only throughput,call,rtt,scale] \
                         [--json PATH] [--markdown PATH]"
                    );
                    std::process::exit(0);
                }
                other if !other.starts_with('-') => opts.only.push(other.to_string()),
                other => eprintln!("ignored option {other}"),
            }
        }
        opts
    }

    fn wants(&self, section: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == section)
    }

    /// Full size, or a tenth of it (at least `min`) with `--quick`.
    fn size(&self, full: usize, min: usize) -> usize {
        if self.quick {
            (full / 10).max(min)
        } else {
            full
        }
    }
}

fn progress(line: &str) {
    eprintln!("[{:>6.1}s] {line}", started_at().elapsed().as_secs_f64());
}

fn started_at() -> Instant {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *START.get_or_init(Instant::now)
}

// ---------------------------------------------------------------- brokers

/// A private Mosquitto on an ephemeral loopback port, killed by pid when dropped.
struct Mosquitto {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    fn start(window: u16) -> Result<Mosquitto, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let port = free_port();
        let conf = format!(
            "persistence false\nlog_dest none\nallow_anonymous true\n\
             max_inflight_messages {window}\nmax_queued_messages 1000000\n\
             listener {port} 127.0.0.1\n"
        );
        let conf_path = dir.path().join("mosquitto.conf");
        std::fs::write(&conf_path, conf).map_err(|e| format!("mosquitto.conf: {e}"))?;
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start mosquitto (is it on PATH?): {e}"))?;
        let broker = Mosquitto {
            port,
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err(format!("mosquitto did not open port {port}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(broker)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// Raises the open-files limit to the hard limit, before Mosquitto (which inherits it)
/// starts: 1,000 drivers need 1,000 sockets here and 1,000 there.
fn raise_nofile_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        lim.rlim_cur
    }
}

/// A slow broker: a proxy in front of Mosquitto that holds every chunk, each way, for
/// `delay` before passing it on.
fn start_slow_proxy(rt: &tokio::runtime::Handle, upstream: u16, delay: Duration) -> u16 {
    let listener = match std::net::TcpListener::bind("127.0.0.1:0") {
        Ok(l) => l,
        Err(_) => return 0,
    };
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let _ = listener.set_nonblocking(true);
    rt.spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
            return;
        };
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await else {
                continue;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            for (mut from, mut to) in [
                (
                    Box::new(cr) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                    Box::new(sw) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
                ),
                (Box::new(sr) as _, Box::new(cw) as _),
            ] {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match from.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        tokio::time::sleep(delay).await;
                        if to.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        }
    });
    port
}

// ---------------------------------------------------------------- drivers

/// The benchmark driver. Commands: `flood` (publish n at qos, `done` when every
/// `OnPublish` arrived), `rtt` (one QoS 1 message at a time), `callcost` (time each
/// `Publish` call in bursts from a 1 ms timer), `clock` (the cost of timing itself).
const DRIVER_LUA: &str = r#"
local PORT, WINDOW, TOPIC, CLIENT = __PORT__, __WINDOW__, "__TOPIC__", "__CLIENT__"
local payload = string.rep("x", __PAYLOAD__)
local mqtt = C4:MQTT(CLIENT)
mqtt:SetMaxInflightMessages(WINDOW)
local mode, target, count, failed = nil, 0, 0, 0
local samples, t0 = {}, 0

mqtt:OnConnect(function(obj, rc, flags, msg)
  if rc == 0 then C4:FireEvent("connected") else C4:FireEvent("connect-failed " .. rc) end
end)

mqtt:OnPublish(function(obj, id, rc, msg)
  count = count + 1
  if rc >= 128 then failed = failed + 1 end
  if mode == "rtt" then
    samples[count] = bench_now() - t0
    if count < target then
      t0 = bench_now()
      mqtt:Publish(TOPIC, payload, 1)
    else
      mode = nil
      bench_put(samples)
      C4:FireEvent("done " .. failed)
    end
  elseif mode == "flood" and count == target then
    mode = nil
    C4:FireEvent("done " .. failed)
  end
end)

function ExecuteCommand(cmd, params)
  local n, qos = tonumber(params.n), tonumber(params.qos)
  if cmd == "flood" then
    mode, target, count, failed = "flood", n, 0, 0
    for i = 1, n do
      local rc = mqtt:Publish(TOPIC, payload, qos)
      if rc ~= 0 then C4:FireEvent("publish-error " .. rc); return end
    end
  elseif cmd == "rtt" then
    mode, target, count, failed, samples = "rtt", n, 0, 0, {}
    for i = 1, n do samples[i] = 0 end
    t0 = bench_now()
    mqtt:Publish(TOPIC, payload, 1)
  elseif cmd == "callcost" or cmd == "clock" then
    local burst, errors, filled = tonumber(params.burst), 0, 0
    mode, samples = nil, {}
    -- Sized up front: growing the table would be timed as part of a call.
    for i = 1, n + burst do samples[i] = 0 end
    local timer
    timer = C4:SetTimer(1, function()
      for j = 1, burst do
        local a, rc, b
        if cmd == "callcost" then
          a = bench_now(); rc = mqtt:Publish(TOPIC, payload, qos); b = bench_now()
          if rc ~= 0 then errors = errors + 1 end
        else
          a = bench_now(); b = bench_now()
        end
        filled = filled + 1
        samples[filled] = b - a
      end
      if filled >= n then
        for i = n + burst, filled + 1, -1 do samples[i] = nil end
        timer:Cancel()
        bench_put(samples)
        C4:FireEvent("done " .. errors)
      end
    end, true)
  end
end

mqtt:Connect("127.0.0.1", PORT, 60)
"#;

struct Host {
    rt: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
    next_id: u32,
}

/// One running benchmark driver: its event sender, its notices, and what `bench_put`
/// handed over.
struct BenchDriver {
    id: u32,
    events: EventSender,
    notices: Receiver<DriverNotice>,
    samples: Arc<Mutex<Vec<f64>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    handle: Option<DriverHandle>,
}

impl Host {
    fn new() -> Host {
        // For the slow-broker proxy; drivers run their MQTT on their own threads.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("mqtt")
            .build()
            .expect("tokio runtime");
        Host {
            rt,
            dir: tempfile::tempdir().expect("temp dir"),
            next_id: 1,
        }
    }

    fn spec(&mut self, port: u16, window: u16, io: IoThread) -> DriverSpec {
        let id = self.next_id;
        self.next_id += 1;
        let source = DRIVER_LUA
            .replace("__PORT__", &port.to_string())
            .replace("__WINDOW__", &window.to_string())
            .replace("__TOPIC__", TOPIC)
            .replace(
                "__CLIENT__",
                &format!("bench-lua-{}-{id}", std::process::id()),
            )
            .replace("__PAYLOAD__", &PAYLOAD_LEN.to_string());
        let folder = self.dir.path().join(format!("d{id}"));
        std::fs::create_dir_all(&folder).expect("driver folder");
        std::fs::write(folder.join("driver.lua"), source).expect("write driver");
        let package =
            luadriver::package::load(&folder.join("driver.lua")).expect("load bench driver");
        DriverSpec {
            id,
            package,
            properties: Vec::new(),
            init_type: driver::InitType::Adding,
            persist_path: None,
            io,
        }
    }

    /// A driver started the way the host starts drivers (`driver::spawn`).
    fn spawn(
        &mut self,
        port: u16,
        window: u16,
        io: IoThread,
        notices: Sender<DriverNotice>,
    ) -> BenchDriver {
        let spec = self.spec(port, window, io);
        let id = spec.id;
        // Events go through the handle and notices to `notices`, which the caller reads.
        let (events, _) = driver::event_channel();
        let (_, unused_notices) = crossbeam_channel::unbounded::<DriverNotice>();
        let handle = driver::spawn(spec, notices).expect("spawn");
        handle.send(DriverEvent::LateInit);
        BenchDriver {
            id,
            events,
            notices: unused_notices,
            samples: Arc::default(),
            thread: None,
            handle: Some(handle),
        }
    }

    /// A driver on its own thread with `bench_now()` (monotonic ns, as a number) and
    /// `bench_put(samples)` installed before its loop runs: `C4:GetTime("ns")` is epoch
    /// nanoseconds in a double, too coarse for sub-microsecond calls.
    /// With `cpu`, the driver's thread runs on that CPU only.
    fn spawn_clocked(&mut self, port: u16, window: u16, cpu: Option<usize>) -> BenchDriver {
        let spec = self.spec(port, window, IoThread::Own);
        let id = spec.id;
        let (events, events_rx) = driver::event_channel();
        let (notices_tx, notices) = crossbeam_channel::unbounded();
        let samples: Arc<Mutex<Vec<f64>>> = Arc::default();
        let sink = Arc::clone(&samples);
        let loop_tx = events.clone();
        let thread = std::thread::Builder::new()
            .name(format!("driver-bench-{id}"))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    set_affinity(0, &[cpu]);
                }
                match DriverLoop::load(spec, loop_tx, events_rx, Some(notices_tx.clone())) {
                    Ok(driver) => {
                        if let Err(e) = install_clock(driver.lua(), sink) {
                            let _ = notices_tx.send(DriverNotice::Failed {
                                id,
                                error: e.to_string(),
                            });
                            return;
                        }
                        driver.run()
                    }
                    Err(error) => {
                        let _ = notices_tx.send(DriverNotice::Failed { id, error });
                    }
                }
            })
            .expect("driver thread");
        let _ = events.send(DriverEvent::LateInit);
        BenchDriver {
            id,
            events,
            notices,
            samples,
            thread: Some(thread),
            handle: None,
        }
    }
}

fn install_clock(lua: &mlua::Lua, sink: Arc<Mutex<Vec<f64>>>) -> mlua::Result<()> {
    let base = Instant::now();
    let now = lua.create_function(move |_, ()| Ok(base.elapsed().as_nanos() as f64))?;
    let put = lua.create_function(move |_, t: mlua::Table| {
        let values: Vec<f64> = t.sequence_values::<f64>().collect::<mlua::Result<_>>()?;
        if let Ok(mut s) = sink.lock() {
            *s = values;
        }
        Ok(())
    })?;
    lua.globals().set("bench_now", now)?;
    lua.globals().set("bench_put", put)?;
    Ok(())
}

impl BenchDriver {
    fn command(&self, command: &str, params: &[(&str, String)]) {
        let event = DriverEvent::Command {
            command: command.into(),
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        };
        match &self.handle {
            Some(h) => {
                h.send(event);
            }
            None => {
                let _ = self.events.send(event);
            }
        }
    }

    /// Waits for a `C4:FireEvent` whose name starts with `prefix`; returns the rest.
    fn wait_event(&self, prefix: &str, limit: Duration) -> Result<String, String> {
        wait_event(&self.notices, Some(self.id), prefix, limit)
    }

    fn take_samples(&self) -> Vec<f64> {
        self.samples
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default()
    }

    fn stop(mut self) {
        if let Some(h) = self.handle.take() {
            h.stop("DRIVER_REMOVED");
        }
        let _ = self.events.send(DriverEvent::Stop {
            reason: "DRIVER_REMOVED".into(),
        });
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn wait_event(
    notices: &Receiver<DriverNotice>,
    id: Option<u32>,
    prefix: &str,
    limit: Duration,
) -> Result<String, String> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match notices.recv_timeout(left) {
            Ok(DriverNotice::Event { id: from, name })
                if id.is_none_or(|id| id == from) && name.starts_with(prefix) =>
            {
                return Ok(name[prefix.len()..].trim().to_string());
            }
            Ok(DriverNotice::Event { name, .. })
                if name.starts_with("connect-failed") && prefix == "connected" =>
            {
                return Err(format!("driver could not connect: {name}"));
            }
            Ok(DriverNotice::Event { name, .. }) if name.starts_with("publish-error") => {
                return Err(format!("driver: {name}"));
            }
            Ok(DriverNotice::Failed { error, .. }) => return Err(error),
            Ok(_) => {}
            Err(_) => return Err(format!("no `{prefix}` within {} s", limit.as_secs())),
        }
    }
}

// ---------------------------------------------------------------- the raw rumqttc baseline

fn qos_of(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn rumqttc_options(port: u16, window: u16, tag: &str) -> MqttOptions {
    let mut opts = MqttOptions::new(
        format!("bench-raw-{tag}-{}", std::process::id()),
        "127.0.0.1",
        port,
    );
    opts.set_inflight(window);
    opts.set_keep_alive(Duration::from_secs(60));
    opts
}

/// A plain rumqttc program: a current-thread runtime, a task publishing `n` messages, the
/// event loop polled until every one is complete (written for QoS 0, PUBACK for QoS 1,
/// PUBCOMP for QoS 2). Returns the seconds from the first publish to the last completion.
fn rumqttc_flood(port: u16, window: u16, qos: u8, n: usize) -> Result<f64, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let (client, mut eventloop) =
            raw_client(rumqttc_options(port, window, "flood"), RUMQTTC_CAP);
        wait_connack(&mut eventloop).await?;
        let payload = vec![b'x'; PAYLOAD_LEN];
        let start = Instant::now();
        let publisher = tokio::spawn(async move {
            for _ in 0..n {
                if client
                    .publish(TOPIC, qos_of(qos), false, payload.clone())
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        let mut done = 0;
        let limit = Instant::now() + Duration::from_secs(300);
        while done < n {
            let ev = tokio::time::timeout_at(limit.into(), eventloop.poll())
                .await
                .map_err(|_| format!("rumqttc: {done}/{n} after 300 s"))?
                .map_err(|e| format!("rumqttc: {e}"))?;
            match (qos, ev) {
                (0, Event::Outgoing(Outgoing::Publish(_)))
                | (1, Event::Incoming(Packet::PubAck(_)))
                | (2, Event::Incoming(Packet::PubComp(_))) => done += 1,
                _ => {}
            }
        }
        let secs = start.elapsed().as_secs_f64();
        let _ = publisher.await;
        Ok(secs)
    })
}

/// A raw rumqttc client with TCP_NODELAY, as luadriver sets it; `cap` is its request
/// channel's size.
fn raw_client(opts: MqttOptions, cap: usize) -> (AsyncClient, rumqttc::EventLoop) {
    let (client, mut eventloop) = AsyncClient::new(opts, cap);
    let mut net = eventloop.network_options();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    (client, eventloop)
}

async fn wait_connack(eventloop: &mut rumqttc::EventLoop) -> Result<(), String> {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), eventloop.poll())
            .await
            .map_err(|_| "rumqttc: no CONNACK in 10 s".to_string())?
            .map_err(|e| format!("rumqttc: {e}"))?;
        if let Event::Incoming(Packet::ConnAck(_)) = ev {
            return Ok(());
        }
    }
}

/// Raw rumqttc for the round trip: QoS 1, window 1, one connection kept across rounds.
struct RawRoundTrip {
    rt: tokio::runtime::Runtime,
    client: AsyncClient,
    eventloop: rumqttc::EventLoop,
}

impl RawRoundTrip {
    fn connect(port: u16) -> Result<RawRoundTrip, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let (client, mut eventloop) = raw_client(rumqttc_options(port, 1, "rtt"), 16);
        rt.block_on(wait_connack(&mut eventloop))?;
        Ok(RawRoundTrip {
            rt,
            client,
            eventloop,
        })
    }

    /// Publish, poll until its PUBACK, `n` times. Nanoseconds per round trip.
    fn run(&mut self, n: usize) -> Result<Vec<f64>, String> {
        let RawRoundTrip {
            rt,
            client,
            eventloop,
        } = self;
        rt.block_on(async move {
            let payload = vec![b'x'; PAYLOAD_LEN];
            let mut samples = Vec::with_capacity(n);
            for _ in 0..n {
                let t0 = Instant::now();
                client
                    .try_publish(TOPIC, QoS::AtLeastOnce, false, payload.clone())
                    .map_err(|e| format!("rumqttc: {e}"))?;
                loop {
                    let ev = tokio::time::timeout(Duration::from_secs(10), eventloop.poll())
                        .await
                        .map_err(|_| "rumqttc: no PUBACK in 10 s".to_string())?
                        .map_err(|e| format!("rumqttc: {e}"))?;
                    if let Event::Incoming(Packet::PubAck(_)) = ev {
                        break;
                    }
                }
                samples.push(t0.elapsed().as_nanos() as f64);
            }
            Ok(samples)
        })
    }
}

/// A subscriber on its own thread counting messages on [`TOPIC`]; ready once subscribed.
struct Subscriber {
    count: Arc<std::sync::atomic::AtomicUsize>,
    thread: std::thread::JoinHandle<()>,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl Subscriber {
    fn start(port: u16, qos: u8) -> Result<Subscriber, String> {
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = Arc::clone(&count);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let (stop, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                let _ = ready_tx.send(Err("runtime".into()));
                return;
            };
            rt.block_on(async move {
                let mut opts = rumqttc_options(port, 100, "sub");
                opts.set_max_packet_size(1 << 20, 1 << 20);
                let (client, mut eventloop) = AsyncClient::new(opts, 16);
                if client.subscribe(TOPIC, qos_of(qos)).await.is_err() {
                    let _ = ready_tx.send(Err("subscribe".into()));
                    return;
                }
                loop {
                    tokio::select! {
                        ev = eventloop.poll() => match ev {
                            Ok(Event::Incoming(Packet::SubAck(_))) => {
                                let _ = ready_tx.send(Ok(()));
                            }
                            Ok(Event::Incoming(Packet::Publish(_))) => {
                                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            Ok(_) => {}
                            Err(e) => {
                                let _ = ready_tx.send(Err(e.to_string()));
                                return;
                            }
                        },
                        _ = &mut stop_rx => return,
                    }
                }
            });
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| "subscriber: no SUBACK in 10 s".to_string())??;
        Ok(Subscriber {
            count,
            thread,
            stop,
        })
    }

    /// Waits until `n` messages arrived or none came for 3 s; returns how many came.
    fn finish(self, n: usize) -> usize {
        let mut last = self.count.load(std::sync::atomic::Ordering::Relaxed);
        let mut quiet_since = Instant::now();
        while last < n && quiet_since.elapsed() < Duration::from_secs(3) {
            std::thread::sleep(Duration::from_millis(50));
            let now = self.count.load(std::sync::atomic::Ordering::Relaxed);
            if now != last {
                last = now;
                quiet_since = Instant::now();
            }
        }
        let _ = self.stop.send(());
        let _ = self.thread.join();
        last
    }
}

// ---------------------------------------------------------------- statistics

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

fn median(v: &[f64]) -> f64 {
    percentile(&sorted(v.to_vec()), 0.5)
}

/// CPU time (user + system) this process has used so far, in seconds.
fn process_cpu_secs() -> f64 {
    // SAFETY: getrusage only writes the struct we hand it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return f64::NAN;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// A median with the range it came from: `139,870 (113k–165k)`.
fn fmt_spread(median: f64, (low, high): (f64, f64)) -> String {
    format!(
        "{} ({:.0}k–{:.0}k)",
        fmt_rate(median),
        low / 1000.0,
        high / 1000.0
    )
}

fn fmt_rate(r: f64) -> String {
    if r.is_nan() {
        return "—".into();
    }
    let r = r.round() as u64;
    let s = r.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn fmt_ratio(r: f64) -> String {
    if r.is_nan() {
        "—".into()
    } else {
        format!("{r:.2}x")
    }
}

fn fmt_us(ns: f64) -> String {
    if ns.is_nan() {
        "—".into()
    } else {
        format!("{:.2} µs", ns / 1000.0)
    }
}

fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "MISSED",
        None => "—",
    }
}

// ---------------------------------------------------------------- the report

#[derive(Default)]
struct Report {
    tables: Vec<String>,
    json: serde_json::Map<String, Json>,
    targets: Vec<(String, Option<bool>)>,
}

impl Report {
    fn target(&mut self, what: String, met: Option<bool>) -> &'static str {
        self.targets.push((what, met));
        verdict(met)
    }
}

// ---------------------------------------------------------------- throughput

struct BrokerUnderTest {
    name: &'static str,
    port: u16,
    _mosquitto: Option<Mosquitto>,
}

fn brokers(window: u16, embedded: &EmbeddedBroker) -> Vec<BrokerUnderTest> {
    let mut out = Vec::new();
    match Mosquitto::start(window) {
        Ok(m) => out.push(BrokerUnderTest {
            name: "mosquitto",
            port: m.port,
            _mosquitto: Some(m),
        }),
        Err(e) => progress(&format!("mosquitto column skipped: {e}")),
    }
    out.push(BrokerUnderTest {
        name: "embedded",
        port: embedded.port(),
        _mosquitto: None,
    });
    out
}

fn luadriver_flood(
    host: &mut Host,
    port: u16,
    window: u16,
    qos: u8,
    n: usize,
) -> Result<f64, String> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let mut d = host.spawn(port, window, IoThread::Own, tx);
    d.notices = rx;
    d.wait_event("connected", Duration::from_secs(10))?;
    let start = Instant::now();
    d.command("flood", &[("n", n.to_string()), ("qos", qos.to_string())]);
    let failed = d.wait_event("done", Duration::from_secs(300));
    let secs = start.elapsed().as_secs_f64();
    d.stop();
    match failed?.as_str() {
        "0" => Ok(secs),
        f => Err(format!("{f} publishes failed")),
    }
}

fn throughput(opts: &Options, host: &mut Host, embedded: &EmbeddedBroker, report: &mut Report) {
    let reps = if opts.quick { 1 } else { 3 };
    let cases: [(u8, usize); 3] = [
        (0, opts.size(200_000, 20_000)),
        (1, opts.size(100_000, 10_000)),
        (2, opts.size(50_000, 5_000)),
    ];
    let mut rows: Vec<Json> = Vec::new();
    let mut delivery: Vec<String> = Vec::new();
    let mut delivery_rows: Vec<Json> = Vec::new();
    let mut table = String::from(
        "### Throughput: 64-byte messages, counted at `OnPublish` (luadriver) / completion (raw rumqttc)\n\n\
         | QoS | window | N | broker | luadriver msg/s | rumqttc msg/s | ratio | target ≥ 0.9x | CPU µs/msg luadriver / rumqttc |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for window in [20u16, 100] {
        let under_test = brokers(window, embedded);
        for (qos, n) in cases {
            for b in &under_test {
                let mut ours = Vec::new();
                let mut raw = Vec::new();
                // CPU microseconds per message of this process (the client under test; the
                // embedded broker lives here too, so only Mosquitto rows report it).
                let mut ours_cpu = Vec::new();
                let mut raw_cpu = Vec::new();
                for rep in 0..reps {
                    // Alternate which goes first, so drift in the machine's load hits both.
                    let order: [bool; 2] = if rep % 2 == 0 {
                        [true, false]
                    } else {
                        [false, true]
                    };
                    for lua_first in order {
                        let cpu_before = process_cpu_secs();
                        let (who, result) = if lua_first {
                            ("luadriver", luadriver_flood(host, b.port, window, qos, n))
                        } else {
                            ("rumqttc", rumqttc_flood(b.port, window, qos, n))
                        };
                        match result {
                            Ok(secs) => {
                                let rate = n as f64 / secs;
                                let cpu_us = (process_cpu_secs() - cpu_before) * 1e6 / n as f64;
                                progress(&format!(
                                    "throughput qos{qos} window {window} {} {who} #{}: {} msg/s, {cpu_us:.2} µs CPU/msg",
                                    b.name,
                                    rep + 1,
                                    fmt_rate(rate)
                                ));
                                if lua_first {
                                    ours.push(rate);
                                    ours_cpu.push(cpu_us);
                                } else {
                                    raw.push(rate);
                                    raw_cpu.push(cpu_us);
                                }
                            }
                            Err(e) => progress(&format!(
                                "throughput qos{qos} window {window} {} {who}: FAILED: {e}",
                                b.name
                            )),
                        }
                    }
                }
                let (o, r) = (median(&ours), median(&raw));
                let ratio = o / r;
                let met = (!ratio.is_nan()).then_some(ratio >= 0.9);
                let v = if b.name == "mosquitto" {
                    report.target(format!("throughput qos{qos} w{window} ≥ 0.9x"), met)
                } else {
                    verdict(met)
                };
                let cpu = if b.name == "mosquitto" {
                    format!("{:.2} / {:.2}", median(&ours_cpu), median(&raw_cpu))
                } else {
                    "—".to_string()
                };
                let _ = writeln!(
                    table,
                    "| {qos} | {window} | {} | {} | {} | {} | {} | {v} | {cpu} |",
                    fmt_rate(n as f64),
                    b.name,
                    fmt_rate(o),
                    fmt_rate(r),
                    fmt_ratio(ratio)
                );
                rows.push(json!({
                    "qos": qos, "window": window, "n": n, "broker": b.name,
                    "luadriver_msgs_per_s": ours, "rumqttc_msgs_per_s": raw,
                    "luadriver_median": o, "rumqttc_median": r, "ratio": ratio,
                    "luadriver_cpu_us_per_msg": ours_cpu, "rumqttc_cpu_us_per_msg": raw_cpu,
                }));
            }
        }
        // Delivery, in a separate (untimed) run: a subscriber counts what Mosquitto passed on.
        if let Some(b) = under_test.iter().find(|b| b.name == "mosquitto")
            && window == 100
        {
            for (qos, n) in cases {
                let delivered = Subscriber::start(b.port, qos).and_then(|sub| {
                    luadriver_flood(host, b.port, window, qos, n)?;
                    Ok(sub.finish(n))
                });
                let line = match &delivered {
                    Ok(got) => format!("{got}/{n}"),
                    Err(e) => format!("failed: {e}"),
                };
                progress(&format!(
                    "delivery check qos{qos} window {window} mosquitto: {line}"
                ));
                delivery_rows.push(json!({"qos": qos, "window": window, "n": n, "delivered": delivered.as_ref().ok()}));
                delivery.push(format!("QoS {qos}: {line}"));
            }
        }
    }
    if !delivery.is_empty() {
        let _ = writeln!(
            table,
            "\nDelivery (separate run, luadriver → Mosquitto → a rumqttc subscriber at the same QoS): {}",
            delivery.join("; ")
        );
    }
    report.tables.push(table);
    report.json.insert("throughput".into(), Json::Array(rows));
    report
        .json
        .insert("delivery".into(), Json::Array(delivery_rows));
}

// ---------------------------------------------------------------- Publish call cost

fn call_cost(opts: &Options, host: &mut Host, report: &mut Report) {
    let n = opts.size(50_000, 5_000);
    let burst = 50;
    let mosquitto = match Mosquitto::start(20) {
        Ok(m) => m,
        Err(e) => return progress(&format!("call cost skipped: {e}")),
    };
    let slow = start_slow_proxy(host.rt.handle(), mosquitto.port, Duration::from_millis(50));
    let unreachable = free_port();
    let mut table = String::from(
        "### `Publish` call cost inside Lua (time for the call to return; timing overhead subtracted)\n\n\
         | broker | QoS | calls | median | p99 | max | target < 1 µs median, < 5 µs p99 |\n\
         |---|---|---|---|---|---|---|\n",
    );
    let mut rows = Vec::new();
    let cases: [(&str, u16, u8); 4] = [
        ("fast (mosquitto)", mosquitto.port, 0),
        ("fast (mosquitto)", mosquitto.port, 1),
        ("slow (50 ms proxy)", slow, 1),
        ("unreachable (queued)", unreachable, 1),
    ];
    for (name, port, qos) in cases {
        let d = host.spawn_clocked(port, 20, None);
        let expect = if port == unreachable {
            "connect-failed"
        } else {
            "connected"
        };
        if let Err(e) = d.wait_event(expect, Duration::from_secs(10)) {
            progress(&format!("call cost {name}: FAILED: {e}"));
            d.stop();
            continue;
        }
        let params = |n: usize| {
            [
                ("n", n.to_string()),
                ("qos", qos.to_string()),
                ("burst", burst.to_string()),
            ]
        };
        d.command("clock", &params(n.min(20_000)));
        let clock = d
            .wait_event("done", Duration::from_secs(60))
            .map(|_| median(&d.take_samples()));
        d.command("callcost", &params(n));
        let result = d.wait_event("done", Duration::from_secs(120));
        let samples = sorted(d.take_samples());
        d.stop();
        let (clock, errors) = match (clock, result) {
            (Ok(c), Ok(e)) => (c, e),
            (Err(e), _) | (_, Err(e)) => {
                progress(&format!("call cost {name}: FAILED: {e}"));
                continue;
            }
        };
        let net = |p: f64| (percentile(&samples, p) - clock).max(0.0);
        let (p50, p99, max) = (net(0.5), net(0.99), net(1.0));
        let met = Some(p50 < 1000.0 && p99 < 5000.0);
        let v = report.target(format!("Publish call cost, {name} qos{qos}"), met);
        progress(&format!(
            "call cost {name} qos{qos}: median {} p90 {} p97 {} p98 {} p99 {} (clock {:.0} ns, {errors} errors)",
            fmt_us(p50),
            fmt_us(net(0.9)),
            fmt_us(net(0.97)),
            fmt_us(net(0.98)),
            fmt_us(p99),
            clock
        ));
        let _ = writeln!(
            table,
            "| {name} | {qos} | {} | {} | {} | {} | {v} |",
            fmt_rate(samples.len() as f64),
            fmt_us(p50),
            fmt_us(p99),
            fmt_us(max)
        );
        rows.push(json!({
            "broker": name, "qos": qos, "calls": samples.len(), "errors": errors,
            "clock_overhead_ns": clock, "median_ns": p50, "p90_ns": net(0.9), "p99_ns": p99, "max_ns": max,
        }));
    }
    let _ = writeln!(
        table,
        "\nCalls made {burst} at a time from a 1 ms repeating timer, so `OnPublish` callbacks run between bursts. \
         The clock is a Rust function injected as a global (monotonic ns); the median cost of two back-to-back \
         clock reads is subtracted."
    );
    report.tables.push(table);
    report.json.insert("publish_call".into(), Json::Array(rows));
}

// ---------------------------------------------------------------- round trip

/// The round trips are measured in this many alternating rounds per client.
const RTT_ROUNDS: usize = 10;

/// Where the round trip runs. A round trip is two wake-ups (broker, then client), and on
/// this kind of VM a wake-up on an idle CPU costs tens of microseconds more than one on a
/// busy one: left to the scheduler, the same client measured 22 or 88 µs p50 from one
/// round to the next depending on where the threads happened to land. So both clients
/// run on CPU 0 and the broker on CPU 1, and each client meets the same case.
struct Pinning {
    /// Threads and processes to give back their CPUs at the end.
    pinned: Vec<i32>,
    /// The CPUs this process ran on before: `available_parallelism` counts only those of
    /// the calling thread, so once it is pinned it would say 1.
    before: Option<libc::cpu_set_t>,
    client_cpu: Option<usize>,
}

impl Pinning {
    fn for_round_trip(b: &BrokerUnderTest) -> Pinning {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        // SAFETY: `set` is a plain bit set whose size is passed along with it.
        let before = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            (libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0)
                .then_some(set)
        };
        if cpus < 2 || before.is_none() {
            return Pinning {
                pinned: Vec::new(),
                before: None,
                client_cpu: None,
            };
        }
        let mut broker = match &b._mosquitto {
            Some(m) => vec![m.child.id() as i32],
            // The embedded broker's threads, by name.
            None => threads_named(&["embedded-broke", "router-"]),
        };
        broker.retain(|&tid| set_affinity(tid, &[1]));
        // This thread runs the raw rumqttc client.
        set_affinity(0, &[0]);
        broker.push(0);
        Pinning {
            pinned: broker,
            before,
            client_cpu: Some(0),
        }
    }

    fn client_cpu(&self) -> Option<usize> {
        self.client_cpu
    }
}

impl Drop for Pinning {
    fn drop(&mut self) {
        let Some(before) = &self.before else { return };
        for &tid in &self.pinned {
            apply_affinity(tid, before);
        }
    }
}

/// Runs thread or process `tid` (0: the calling thread) on `cpus` only. False if refused.
fn set_affinity(tid: i32, cpus: &[usize]) -> bool {
    // SAFETY: `set` is a plain bit set, initialised by CPU_ZERO before use.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        for &cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        set
    };
    apply_affinity(tid, &set)
}

/// Runs thread or process `tid` (0: the calling thread) on the CPUs of `set`.
fn apply_affinity(tid: i32, set: &libc::cpu_set_t) -> bool {
    // SAFETY: `set` is a whole cpu_set_t and its size is passed along with it.
    unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), set) == 0 }
}

/// This process's threads whose names start with one of `prefixes`.
fn threads_named(prefixes: &[&str]) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| t.ok())
        .filter_map(|t| {
            let tid = t.file_name().to_str()?.parse::<i32>().ok()?;
            let name = std::fs::read_to_string(t.path().join("comm")).ok()?;
            prefixes.iter().any(|p| name.starts_with(p)).then_some(tid)
        })
        .collect()
}

fn round_trip(opts: &Options, host: &mut Host, embedded: &EmbeddedBroker, report: &mut Report) {
    let n = opts.size(10_000, 2_000);
    let mut table = String::from(
        "### QoS 1 round trip, window 1: `Publish` → `OnPublish` vs raw rumqttc publish → PUBACK\n\n\
         | broker | round trips | luadriver p50 | luadriver p99 | rumqttc p50 | rumqttc p99 | p99 ratio | target ≤ 1.2x |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    let mut rows = Vec::new();
    for b in brokers(1, embedded) {
        let pinning = Pinning::for_round_trip(&b);
        let d = host.spawn_clocked(b.port, 1, pinning.client_cpu());
        let measured = d
            .wait_event("connected", Duration::from_secs(10))
            .and_then(|_| {
                let mut raw = RawRoundTrip::connect(b.port)?;
                // Warm up both connections and the JIT.
                d.command("rtt", &[("n", "500".into())]);
                d.wait_event("done", Duration::from_secs(60))?;
                d.take_samples();
                raw.run(500)?;
                // Then alternate, so a noisy spell on the shared machine lands on both.
                let per_round = n.div_ceil(RTT_ROUNDS);
                let (mut ours, mut theirs) = (Vec::new(), Vec::new());
                for round in 0..RTT_ROUNDS {
                    let luadriver_round = |ours: &mut Vec<f64>| -> Result<(), String> {
                        d.command("rtt", &[("n", per_round.to_string())]);
                        d.wait_event("done", Duration::from_secs(120))?;
                        ours.extend(d.take_samples());
                        Ok(())
                    };
                    if round % 2 == 0 {
                        luadriver_round(&mut ours)?;
                        theirs.extend(raw.run(per_round)?);
                    } else {
                        theirs.extend(raw.run(per_round)?);
                        luadriver_round(&mut ours)?;
                    }
                }
                Ok((sorted(ours), sorted(theirs)))
            });
        d.stop();
        let (ours, raw) = match measured {
            Ok(both) => both,
            Err(e) => {
                progress(&format!("round trip {}: FAILED: {e}", b.name));
                continue;
            }
        };
        let (o50, o99) = (percentile(&ours, 0.5), percentile(&ours, 0.99));
        let (r50, r99) = (percentile(&raw, 0.5), percentile(&raw, 0.99));
        let ratio = o99 / r99;
        let met = Some(ratio <= 1.2);
        let v = if b.name == "mosquitto" {
            report.target("QoS 1 round trip p99 ≤ 1.2x".into(), met)
        } else {
            verdict(met)
        };
        progress(&format!(
            "round trip {}: luadriver p50 {} p99 {}; rumqttc p50 {} p99 {}",
            b.name,
            fmt_us(o50),
            fmt_us(o99),
            fmt_us(r50),
            fmt_us(r99)
        ));
        let _ = writeln!(
            table,
            "| {} | {} | {} | {} | {} | {} | {} | {v} |",
            b.name,
            fmt_rate(ours.len() as f64),
            fmt_us(o50),
            fmt_us(o99),
            fmt_us(r50),
            fmt_us(r99),
            fmt_ratio(ratio)
        );
        rows.push(json!({
            "broker": b.name, "n": n, "luadriver_p50_ns": o50, "luadriver_p99_ns": o99,
            "rumqttc_p50_ns": r50, "rumqttc_p99_ns": r99, "p99_ratio": ratio,
        }));
    }
    let _ = writeln!(
        table,
        "\nEach client is measured in {RTT_ROUNDS} alternating rounds on one connection each, after \
         500 warm-up round trips. With 2 CPUs or more, both clients run on CPU 0 and the \
         broker on CPU 1: left to the scheduler, the same client measured 22 or 88 µs p50 \
         from one round to the next, depending on whether it shared a CPU with the broker."
    );
    report.tables.push(table);
    report.json.insert("round_trip".into(), Json::Array(rows));
}

// ---------------------------------------------------------------- scale

/// One scale case: `drivers` drivers, their MQTT placed on `io`.
struct ScaleRun {
    drivers: usize,
    rss_per_driver: f64,
    start_secs: f64,
    msgs_per_s: f64,
}

fn scale_run(
    host: &mut Host,
    port: u16,
    count: usize,
    per_driver: usize,
    io: IoThread,
) -> Result<ScaleRun, String> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let rss_before = rss_bytes();
    let start = Instant::now();
    let mut drivers = Vec::with_capacity(count);
    for _ in 0..count {
        drivers.push(host.spawn(port, 20, io, tx.clone()));
    }
    let limit = Duration::from_secs(60);
    for _ in 0..count {
        wait_event(&rx, None, "connected", limit)?;
    }
    let start_secs = start.elapsed().as_secs_f64();
    let rss_per_driver = rss_bytes().saturating_sub(rss_before) as f64 / count as f64;
    let t0 = Instant::now();
    for d in &drivers {
        d.command(
            "flood",
            &[("n", per_driver.to_string()), ("qos", "1".into())],
        );
    }
    for _ in 0..count {
        let failed = wait_event(&rx, None, "done", Duration::from_secs(300))?;
        if failed != "0" {
            return Err(format!("{failed} publishes failed"));
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    for d in drivers {
        d.stop();
    }
    Ok(ScaleRun {
        drivers: count,
        rss_per_driver,
        start_secs,
        msgs_per_s: (count * per_driver) as f64 / secs,
    })
}

/// Raw rumqttc at the same scale: `count` clients on one current-thread runtime, each
/// publishing `per_client` QoS 1 messages with window 20; aggregate messages per second
/// from the first publish to the last PUBACK.
fn rumqttc_scale(port: u16, count: usize, per_client: usize) -> Result<f64, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let mut clients = Vec::with_capacity(count);
        for i in 0..count {
            let (client, mut eventloop) =
                raw_client(rumqttc_options(port, 20, &format!("scale{i}")), RUMQTTC_CAP);
            wait_connack(&mut eventloop).await?;
            clients.push((client, eventloop));
        }
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for (client, mut eventloop) in clients {
            tasks.spawn(async move {
                let payload = vec![b'x'; PAYLOAD_LEN];
                let publisher = tokio::spawn(async move {
                    for _ in 0..per_client {
                        let publish =
                            client.publish(TOPIC, QoS::AtLeastOnce, false, payload.clone());
                        if publish.await.is_err() {
                            return;
                        }
                    }
                });
                let mut acked = 0;
                while acked < per_client {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                        Ok(_) => {}
                        Err(e) => return Err(format!("rumqttc: {e}")),
                    }
                }
                let _ = publisher.await;
                Ok(())
            });
        }
        let limit = tokio::time::Instant::now() + Duration::from_secs(300);
        while let Some(done) = tokio::time::timeout_at(limit, tasks.join_next())
            .await
            .map_err(|_| "rumqttc scale: not done after 300 s".to_string())?
        {
            done.map_err(|e| e.to_string())??;
        }
        Ok((count * per_client) as f64 / start.elapsed().as_secs_f64())
    })
}

fn io_arg(io: IoThread) -> &'static str {
    match io {
        IoThread::Own => "own",
        IoThread::Shared => "shared",
    }
}

/// Runs one scale case in a child process (this bench binary, `--scale-child`).
fn scale_in_child(
    port: u16,
    count: usize,
    per_driver: usize,
    io: IoThread,
) -> Result<ScaleRun, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current exe: {e}"))?;
    let out = std::process::Command::new(exe)
        .args([
            "--scale-child",
            &count.to_string(),
            &port.to_string(),
            &per_driver.to_string(),
            io_arg(io),
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot start the scale child: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("SCALE "))
        .ok_or_else(|| format!("the scale child failed ({})", out.status))?;
    let f: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    match f[..] {
        [drivers, rss, start, rate] => Ok(ScaleRun {
            drivers: drivers as usize,
            rss_per_driver: rss,
            start_secs: start,
            msgs_per_s: rate,
        }),
        _ => Err(format!("unreadable scale result: {line}")),
    }
}

/// CPU seconds (user + system) a process has used so far, from `/proc`.
fn cpu_secs_of(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces), from field 3 on.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (per_sec > 0.0).then(|| ticks / per_sec)
}

/// Runs `f` and returns its result with the broker's CPU µs per message over it.
fn with_broker_cpu<T>(
    broker: &Mosquitto,
    messages: usize,
    f: impl FnOnce() -> Result<T, String>,
) -> Result<(T, f64), String> {
    let pid = broker.child.id();
    let before = cpu_secs_of(pid);
    let out = f()?;
    let us = match (before, cpu_secs_of(pid)) {
        (Some(a), Some(b)) => (b - a) * 1e6 / messages as f64,
        _ => f64::NAN,
    };
    Ok((out, us))
}

/// Runs of each scale case on the shared thread and of raw rumqttc: the machine is shared
/// and two cores run the drivers, the I/O thread and the broker, so one run of 10 drivers
/// measured anywhere from 84k to 174k msg/s. The median of three is reported, with the range.
const SCALE_ROUNDS: usize = 3;

/// One row of the scale table: each placement and raw rumqttc, with as many clients.
struct ScaleRow {
    /// The median run.
    shared: ScaleRun,
    /// Slowest and fastest msg/s of the rounds.
    shared_spread: (f64, f64),
    own_msgs_per_s: f64,
    /// The median of the rounds.
    rumqttc_msgs_per_s: f64,
    rumqttc_spread: (f64, f64),
    /// Mosquitto's CPU µs per message, serving luadriver (shared) and raw rumqttc.
    broker_us: (f64, f64),
}

fn scale(opts: &Options, report: &mut Report) {
    let counts: &[usize] = if opts.quick {
        &[1, 10, 100]
    } else {
        &[1, 10, 100, 1000]
    };
    let total = opts.size(200_000, 20_000);
    let mosquitto = match Mosquitto::start(20) {
        Ok(m) => m,
        Err(e) => return progress(&format!("scale skipped: {e}")),
    };
    let port = mosquitto.port;
    let mut results = Vec::new();
    for &count in counts {
        let per_driver = (total / count).max(100);
        let messages = count * per_driver;
        let measured = (|| {
            // The shared-thread and raw rumqttc runs alternate, each case in fresh processes
            // and connections; their medians are reported (see SCALE_ROUNDS).
            let mut shared_runs = Vec::new();
            let mut raw_runs = Vec::new();
            for _ in 0..SCALE_ROUNDS {
                shared_runs.push(with_broker_cpu(&mosquitto, messages, || {
                    scale_in_child(port, count, per_driver, IoThread::Shared)
                })?);
                raw_runs.push(with_broker_cpu(&mosquitto, messages, || {
                    rumqttc_scale(port, count, per_driver)
                })?);
            }
            shared_runs.sort_by(|a, b| a.0.msgs_per_s.total_cmp(&b.0.msgs_per_s));
            raw_runs.sort_by(|a, b| a.0.total_cmp(&b.0));
            let own = scale_in_child(port, count, per_driver, IoThread::Own)?;
            let shared_spread = (
                shared_runs[0].0.msgs_per_s,
                shared_runs[SCALE_ROUNDS - 1].0.msgs_per_s,
            );
            let raw_spread = (raw_runs[0].0, raw_runs[SCALE_ROUNDS - 1].0);
            let (shared, ours_us) = shared_runs.swap_remove(SCALE_ROUNDS / 2);
            let (raw, raw_us) = raw_runs.swap_remove(SCALE_ROUNDS / 2);
            Ok::<_, String>(ScaleRow {
                shared,
                shared_spread,
                own_msgs_per_s: own.msgs_per_s,
                rumqttc_msgs_per_s: raw,
                rumqttc_spread: raw_spread,
                broker_us: (ours_us, raw_us),
            })
        })();
        match measured {
            Ok(r) => {
                progress(&format!(
                    "scale {count} drivers: {:.0} KiB RSS each, started in {:.2} s, {} msg/s \
                     (own-thread I/O {} msg/s, raw rumqttc {} msg/s)",
                    r.shared.rss_per_driver / 1024.0,
                    r.shared.start_secs,
                    fmt_rate(r.shared.msgs_per_s),
                    fmt_rate(r.own_msgs_per_s),
                    fmt_rate(r.rumqttc_msgs_per_s)
                ));
                results.push(r);
            }
            Err(e) => progress(&format!("scale {count} drivers: FAILED: {e}")),
        }
    }
    let at10 = results
        .iter()
        .find(|r| r.shared.drivers == 10)
        .map(|r| (r.shared.msgs_per_s, r.own_msgs_per_s, r.rumqttc_msgs_per_s))
        .unwrap_or((f64::NAN, f64::NAN, f64::NAN));
    let mut table = String::from(
        "### Scale: drivers in one process, each with its own Lua VM and MQTT connection, QoS 1 window 20\n\n\
         | drivers | RSS per driver | RSS total (drivers) | time to start all | aggregate msg/s, shared I/O thread: median (range) of 3 | vs 10 drivers | own-thread I/O msg/s | vs 10 | raw rumqttc msg/s (as many clients): median (range) of 3 | rumqttc vs 10 | luadriver / rumqttc | Mosquitto CPU µs/msg luadriver / rumqttc |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut rows = Vec::new();
    for r in &results {
        let s = &r.shared;
        let ratio = s.msgs_per_s / at10.0;
        let own_ratio = r.own_msgs_per_s / at10.1;
        let raw_ratio = r.rumqttc_msgs_per_s / at10.2;
        let _ = writeln!(
            table,
            "| {} | {:.0} KiB | {:.1} MiB | {:.2} s | {} | {} | {} | {} | {} | {} | {} | {:.1} / {:.1} |",
            fmt_rate(s.drivers as f64),
            s.rss_per_driver / 1024.0,
            s.rss_per_driver * s.drivers as f64 / (1024.0 * 1024.0),
            s.start_secs,
            fmt_spread(s.msgs_per_s, r.shared_spread),
            fmt_ratio(ratio),
            fmt_rate(r.own_msgs_per_s),
            fmt_ratio(own_ratio),
            fmt_spread(r.rumqttc_msgs_per_s, r.rumqttc_spread),
            fmt_ratio(raw_ratio),
            fmt_ratio(s.msgs_per_s / r.rumqttc_msgs_per_s),
            r.broker_us.0,
            r.broker_us.1,
        );
        rows.push(json!({
            "drivers": s.drivers, "rss_per_driver_bytes": s.rss_per_driver,
            "start_secs": s.start_secs, "msgs_per_s": s.msgs_per_s, "ratio_vs_10": ratio,
            "msgs_per_s_range": [r.shared_spread.0, r.shared_spread.1],
            "own_thread_msgs_per_s": r.own_msgs_per_s, "own_thread_ratio_vs_10": own_ratio,
            "rumqttc_msgs_per_s": r.rumqttc_msgs_per_s, "rumqttc_ratio_vs_10": raw_ratio,
            "rumqttc_msgs_per_s_range": [r.rumqttc_spread.0, r.rumqttc_spread.1],
            "broker_cpu_us_per_msg": r.broker_us.0, "broker_cpu_us_per_msg_rumqttc": r.broker_us.1,
        }));
        if s.drivers == 1000 {
            let rss = s.rss_per_driver * 1000.0;
            report.target(
                "1,000 drivers under 1 GiB RSS".into(),
                Some(rss < 1024.0 * 1024.0 * 1024.0),
            );
            report.target(
                "1,000 drivers started in < 3 s".into(),
                Some(s.start_secs < 3.0),
            );
            report.target(
                "aggregate msg/s at 1,000 ≥ 0.8x at 10".into(),
                (!ratio.is_nan()).then_some(ratio >= 0.8),
            );
        }
    }
    let _ = writeln!(
        table,
        "\nEach run publishes {} messages in total, split over its drivers (at least 100 each). \
         Each case runs in a fresh child process; RSS is its growth from before the first driver to all connected. \
         The drivers' MQTT runs on the process's shared I/O thread (`IoThread::Shared`, the placement for a host \
         with many drivers); the own-thread column runs the same drivers with their MQTT on their own threads \
         (`IoThread::Own`, the default). Raw rumqttc runs as many clients on one current-thread runtime, \
         publishing the same messages. The shared-thread and raw rumqttc runs alternate, {SCALE_ROUNDS} of each; \
         the ratios use the medians. The last column is the broker's CPU time per message (in the median runs).",
        fmt_rate(total as f64)
    );
    report.tables.push(table);
    report.json.insert("scale".into(), Json::Array(rows));
}

// ---------------------------------------------------------------- main

fn machine() -> (String, String, String) {
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get().to_string())
        .unwrap_or_else(|_| "?".into());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let date = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    (nproc, cpu, date)
}

fn main() {
    // `--scale-child COUNT PORT PER_DRIVER own|shared`: one scale case in a fresh process, so its RSS
    // is the drivers' own and not memory left over from earlier sections.
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--scale-child") {
        let num = |k: usize| -> usize {
            args.get(i + k)
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| {
                    eprintln!("--scale-child COUNT PORT PER_DRIVER own|shared");
                    std::process::exit(2)
                })
        };
        let io = match args.get(i + 4).map(String::as_str) {
            Some("own") => IoThread::Own,
            Some("shared") => IoThread::Shared,
            _ => {
                eprintln!("--scale-child COUNT PORT PER_DRIVER own|shared");
                std::process::exit(2)
            }
        };
        let mut host = Host::new();
        match scale_run(&mut host, num(2) as u16, num(1), num(3), io) {
            Ok(r) => {
                println!(
                    "SCALE {} {} {} {}",
                    r.drivers, r.rss_per_driver, r.start_secs, r.msgs_per_s
                );
                std::process::exit(0);
            }
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        }
    }
    let opts = Options::parse();
    started_at();
    let nofile = raise_nofile_limit();
    let (nproc, cpu, date) = machine();
    progress(&format!(
        "publish benchmarks ({}), {nproc} CPUs ({cpu}), open-files limit {nofile}",
        if opts.quick { "quick" } else { "full" }
    ));
    let mut host = Host::new();
    let embedded = match EmbeddedBroker::start("127.0.0.1:0".parse().expect("address")) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("cannot start the embedded broker: {e}");
            std::process::exit(1);
        }
    };
    let mut report = Report::default();
    if opts.wants("throughput") {
        throughput(&opts, &mut host, &embedded, &mut report);
    }
    if opts.wants("call") {
        call_cost(&opts, &mut host, &mut report);
    }
    if opts.wants("rtt") {
        round_trip(&opts, &mut host, &embedded, &mut report);
    }
    if opts.wants("scale") {
        scale(&opts, &mut report);
    }

    let mut out = String::new();
    for t in &report.tables {
        out.push_str(t);
        out.push('\n');
    }
    out.push_str("### Targets\n\n| target | result |\n|---|---|\n");
    for (what, met) in &report.targets {
        let _ = writeln!(out, "| {what} | {} |", verdict(*met));
    }
    println!("{out}");

    report.json.insert(
        "machine".into(),
        json!({"nproc": nproc, "cpu": cpu, "date": date, "quick": opts.quick}),
    );
    report.json.insert(
        "targets".into(),
        Json::Array(
            report
                .targets
                .iter()
                .map(|(w, m)| json!({"target": w, "met": m}))
                .collect(),
        ),
    );
    if let Some(parent) = opts.json.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    match serde_json::to_string_pretty(&Json::Object(report.json)) {
        Ok(text) => match std::fs::write(&opts.json, text) {
            Ok(()) => progress(&format!("results written to {}", opts.json.display())),
            Err(e) => progress(&format!("cannot write {}: {e}", opts.json.display())),
        },
        Err(e) => progress(&format!("cannot encode results: {e}")),
    }
    if let Some(path) = &opts.markdown {
        let page = format!(
            "# Benchmarks\n\nThe latest full run of `cargo bench --bench publish` \
             ({}), on {nproc} CPUs ({cpu}), {date}. \
             Every target is a ratio against a baseline measured in the same run.\n\n{out}",
            if opts.quick { "quick" } else { "full" }
        );
        match std::fs::write(path, page) {
            Ok(()) => progress(&format!("table written to {}", path.display())),
            Err(e) => progress(&format!("cannot write {}: {e}", path.display())),
        }
    }
    drop(embedded);
    host.rt.shutdown_timeout(Duration::from_secs(2));
    // rumqttd's router thread cannot be stopped; leave without waiting for it.
    std::process::exit(0);
}
