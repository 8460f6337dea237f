//! The task behind one MQTT client: owns the connection, the session ([`Outbox`]) and the
//! keep-alive timer.
//!
//! In: [`MqttCommand`]s from the Lua thread, bytes from the broker, timer ticks.
//! Out: [`MqttEvent`]s through the [`EventSink`], packets to the broker, and the
//! [`ClientStatus`] atomics. Each wake-up drains every ready command, encodes everything
//! the window allows into one buffer and writes it with one flush.

use super::backlog::EventBacklog;
use super::codes::{err, reason, reason_code_to_string};
use super::link::{self, AttemptFailure, Link, packet_name};
use super::outbox::{AckOutcome, Completion, ControlKind, Outbox, Outgoing};
use super::types::{
    ClientStatus, ConnectOptions, EventProps, EventSink, MqttCommand, MqttEvent, MsgId, Props,
    ProtocolVersion, PublishRequest,
};
use super::wire::{self, Ack, Packet};
use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc::{UnboundedReceiver, error::TryRecvError};
use tokio::time::{Instant, sleep_until, timeout};

/// Commands handled per wake-up before the socket gets a turn again.
const MAX_BATCH: usize = 4096;
/// How long a clean DISCONNECT may take to write before the socket is just closed.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// A write that cannot make progress this long means the link is gone.
const MIN_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

const LOG_WARN: u8 = 2;
const LOG_INFO: u8 = 3;
const LOG_DEBUG: u8 = 4;

const LOST: &str = "The connection was lost.";

// Lives on the stack for one step; boxing would cost an allocation per command.
#[allow(clippy::large_enum_variant)]
enum Wake {
    Command(Option<MqttCommand>),
    Read(std::io::Result<usize>),
    KeepAlive,
    Retry,
    /// The driver caught up on its backlog: reading may resume.
    Drained,
}

pub struct Worker {
    commands: UnboundedReceiver<MqttCommand>,
    /// Commands that arrived while a connection attempt was under way.
    deferred: VecDeque<MqttCommand>,
    sink: EventSink,
    /// The driver's undispatched events, this worker's among them: no reading while full.
    backlog: Arc<EventBacklog>,
    status: Arc<ClientStatus>,
    /// Events of the current step, delivered when it ends (see `emit`).
    events_out: Vec<MqttEvent>,
    /// Publish commands taken from `commands`, published as `ClientStatus::taken`.
    publishes_taken: u64,
    /// The last `Connect` settings, for `Reconnect` and auto-reconnect.
    options: Option<ConnectOptions>,
    outbox: Outbox,
    link: Option<Link>,
    /// Incoming QoS 2 packet ids delivered and not yet released, so a resent PUBLISH is
    /// not delivered twice. Kept across reconnects while the broker keeps the session.
    incoming_qos2: HashSet<u16>,
    auto_reconnect: Option<(Duration, Duration)>,
    retry_at: Option<Instant>,
    retry_attempt: u32,
    /// Every handle is gone: stop.
    closed: bool,
    /// The sink refused an event (the driver stopped): stop.
    deaf: bool,
}

impl Worker {
    pub fn new(
        commands: UnboundedReceiver<MqttCommand>,
        sink: EventSink,
        backlog: Arc<EventBacklog>,
        status: Arc<ClientStatus>,
    ) -> Worker {
        Worker {
            commands,
            deferred: VecDeque::new(),
            sink,
            backlog,
            status,
            options: None,
            outbox: Outbox::new(20, None),
            link: None,
            incoming_qos2: HashSet::new(),
            auto_reconnect: None,
            publishes_taken: 0,
            events_out: Vec::new(),
            retry_at: None,
            retry_attempt: 0,
            closed: false,
            deaf: false,
        }
    }

    pub async fn run(mut self) {
        while !self.closed && !self.deaf {
            self.step().await;
        }
        self.close_quietly().await;
        log::debug!(target: "luadriver::mqtt", "worker ended");
    }

    async fn step(&mut self) {
        let wake = match self.deferred.pop_front() {
            Some(cmd) => Wake::Command(Some(cmd)),
            None => self.wait().await,
        };
        match wake {
            Wake::Command(None) => {
                self.closed = true;
                return;
            }
            Wake::Command(Some(cmd)) => {
                self.handle_command(cmd).await;
                for _ in 0..MAX_BATCH {
                    if !self.deferred.is_empty() || self.closed || self.deaf {
                        break;
                    }
                    match self.commands.try_recv() {
                        Ok(cmd) => self.handle_command(cmd).await,
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => self.closed = true,
                    }
                }
            }
            Wake::Read(result) => self.on_read(result),
            Wake::KeepAlive => self.on_keepalive_timer(),
            Wake::Retry => {
                self.retry_at = None;
                self.connect(true).await;
            }
            Wake::Drained => {}
        }
        if !self.closed && !self.deaf {
            self.flush().await;
        }
        self.update_gauges();
        self.deliver_events();
    }

    async fn wait(&mut self) -> Wake {
        match &mut self.link {
            Some(link) => {
                let deadline = link.keepalive_deadline();
                if self.backlog.is_full() {
                    // The driver is behind: what the broker sends stays in the socket.
                    // Armed, then checked again, so a drain in between still wakes us.
                    let drained = self.backlog.drained();
                    tokio::pin!(drained);
                    drained.as_mut().enable();
                    if self.backlog.is_full() {
                        return tokio::select! {
                            cmd = self.commands.recv() => Wake::Command(cmd),
                            _ = drained => Wake::Drained,
                            _ = sleep_until_some(deadline) => Wake::KeepAlive,
                        };
                    }
                }
                link.reserve_read();
                tokio::select! {
                    cmd = self.commands.recv() => Wake::Command(cmd),
                    read = link.stream.read_buf(&mut link.read_buf) => Wake::Read(read),
                    _ = sleep_until_some(deadline) => Wake::KeepAlive,
                }
            }
            None => {
                let retry_at = self.retry_at;
                tokio::select! {
                    cmd = self.commands.recv() => Wake::Command(cmd),
                    _ = sleep_until_some(retry_at) => Wake::Retry,
                }
            }
        }
    }

    // ---- events ----

    /// Queues an event for the driver. Events leave at the end of the step, after the
    /// socket was written: waking the driver's loop may cost a system call and hand it
    /// this core, which must not delay the next PUBLISH.
    fn emit(&mut self, event: MqttEvent) {
        if !self.deaf {
            self.events_out.push(event);
        }
    }

    /// Hands the queued events to the driver, in order.
    fn deliver_events(&mut self) {
        for event in self.events_out.drain(..) {
            if self.deaf {
                break;
            }
            // Counted before it is sent: the driver may dispatch it at once.
            self.backlog.added();
            if !(self.sink)(event) {
                log::debug!(target: "luadriver::mqtt", "event sink closed; stopping");
                self.deaf = true;
            }
        }
    }

    fn log(&mut self, level: u8, line: String) {
        match level {
            0..=2 => log::warn!(target: "luadriver::mqtt", "{line}"),
            3 => log::info!(target: "luadriver::mqtt", "{line}"),
            _ => log::debug!(target: "luadriver::mqtt", "{line}"),
        }
        self.emit(MqttEvent::Log { level, line });
    }

    fn published(&mut self, c: Completion) {
        let counter = if c.is_success() {
            &self.status.acknowledged
        } else {
            &self.status.failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.emit(MqttEvent::Published {
            msg_id: c.msg_id,
            reason: c.reason,
            message: c.message,
            props: c.props.into(),
        });
    }

    fn qos0_failed(&mut self, msg_id: MsgId, why: &str) {
        self.published(Completion {
            msg_id,
            reason: reason::UNSPECIFIED_ERROR,
            message: format!("QoS 0 message not sent: {why}").into(),
            props: Props::default(),
        });
    }

    fn update_gauges(&self) {
        self.status
            .queued
            .store(self.outbox.queued() as u64, Ordering::Relaxed);
        self.status
            .inflight
            .store(self.outbox.inflight() as u64, Ordering::Relaxed);
        // Stored after the gauges (and read before them by `GetStats`), so a message is
        // never counted in neither place: at worst, briefly, in both.
        self.status
            .taken
            .store(self.publishes_taken, Ordering::Release);
    }

    // ---- commands ----

    async fn handle_command(&mut self, cmd: MqttCommand) {
        match cmd {
            MqttCommand::Connect(opts) => {
                self.close_cleanly(Props::default()).await;
                self.outbox.set_limits(opts.max_inflight, opts.max_sends);
                self.auto_reconnect = opts.auto_reconnect;
                self.options = Some(*opts);
                self.connect(false).await;
            }
            MqttCommand::Reconnect => {
                if self.options.is_none() {
                    self.emit(MqttEvent::Connected {
                        reason: reason::UNSPECIFIED_ERROR,
                        session_present: false,
                        message: "Reconnect: there are no settings from an earlier Connect".into(),
                        props: EventProps::default(),
                    });
                    return;
                }
                self.close_cleanly(Props::default()).await;
                self.connect(false).await;
            }
            MqttCommand::Disconnect { props } => {
                self.retry_at = None;
                if self.link.is_some() {
                    self.close_cleanly(props).await;
                } else {
                    self.log(LOG_DEBUG, "Disconnect: not connected".into());
                }
            }
            MqttCommand::Publish(req) => {
                self.publishes_taken += 1;
                self.publish(req)
            }
            MqttCommand::Subscribe {
                msg_id,
                filter,
                qos,
                props,
            } => {
                let Some(pkid) = self.control_id(msg_id, ControlKind::Subscribe) else {
                    return;
                };
                self.send(&Packet::Subscribe(wire::Subscribe {
                    pkid,
                    filter,
                    qos,
                    props,
                }));
            }
            MqttCommand::Unsubscribe {
                msg_id,
                filter,
                props,
            } => {
                let Some(pkid) = self.control_id(msg_id, ControlKind::Unsubscribe) else {
                    return;
                };
                self.send(&Packet::Unsubscribe(wire::Unsubscribe {
                    pkid,
                    filter,
                    props,
                }));
            }
            MqttCommand::SetLimits {
                max_inflight,
                max_sends,
            } => {
                self.outbox.set_limits(max_inflight, max_sends);
                if let Some(opts) = &mut self.options {
                    opts.max_inflight = max_inflight;
                    opts.max_sends = max_sends;
                }
            }
            MqttCommand::SetAutoReconnect(setting) => {
                self.auto_reconnect = setting;
                if let Some(opts) = &mut self.options {
                    opts.auto_reconnect = setting;
                }
                if setting.is_none() {
                    self.retry_at = None;
                }
            }
        }
    }

    fn publish(&mut self, req: PublishRequest) {
        if req.qos > 0 {
            self.outbox.enqueue(req);
            return;
        }
        let Some(link) = &mut self.link else {
            self.qos0_failed(req.msg_id, "the client is not connected");
            return;
        };
        match wire::encode_publish(link.version, &req, 0, false, &mut link.out) {
            Ok(()) => link.qos0_in_out.push(req.msg_id),
            Err(e) => {
                let why = e.to_string();
                self.qos0_failed(req.msg_id, &why);
            }
        }
    }

    fn control_id(&mut self, msg_id: MsgId, kind: ControlKind) -> Option<u16> {
        let what = match kind {
            ControlKind::Subscribe => "Subscribe",
            ControlKind::Unsubscribe => "Unsubscribe",
        };
        if self.link.is_none() {
            self.log(
                LOG_WARN,
                format!("{what} {msg_id} not sent: the client is not connected"),
            );
            return None;
        }
        let pkid = self.outbox.alloc_control(msg_id, kind);
        if pkid.is_none() {
            self.log(
                LOG_WARN,
                format!("{what} {msg_id} not sent: all 65,535 packet ids are in use"),
            );
        }
        pkid
    }

    /// Encodes `packet` into the pending output, if there is a link.
    fn send(&mut self, packet: &Packet) {
        let Some(link) = &mut self.link else {
            return;
        };
        if let Err(e) = wire::encode(link.version, packet, &mut link.out) {
            let line = format!("cannot encode {}: {e}", packet_name(packet));
            self.log(LOG_WARN, line);
        }
    }

    // ---- connecting ----

    /// One connection attempt with the last options; the result is one `Connected`.
    /// `auto`: part of an auto-reconnect cycle, which continues on failure.
    async fn connect(&mut self, auto: bool) {
        let Some(opts) = self.options.clone() else {
            return;
        };
        self.log(
            LOG_DEBUG,
            format!(
                "connecting to {}:{} (client id {:?}, {:?})",
                opts.host, opts.port, opts.client_id, opts.version
            ),
        );
        let result = {
            let attempt = link::establish(&opts);
            tokio::pin!(attempt);
            loop {
                tokio::select! {
                    result = &mut attempt => break Some(result),
                    cmd = self.commands.recv() => match cmd {
                        // Disconnect abandons the attempt (dropping it closes the socket):
                        // a driver must not wait out the CONNACK timeout of a silent broker.
                        Some(MqttCommand::Disconnect { .. }) => {
                            self.retry_at = None;
                            self.log(LOG_INFO, "Disconnect: connection attempt abandoned".into());
                            return;
                        }
                        Some(cmd) => self.deferred.push_back(cmd),
                        None => break None,
                    },
                }
            }
        };
        match result {
            None => self.closed = true,
            Some(Ok((link, connack))) => {
                let session_present = connack.session_present;
                let props = connack.props;
                self.status
                    .max_qos
                    .store(props.maximum_qos.unwrap_or(2).min(2), Ordering::Release);
                self.status
                    .max_packet_size
                    .store(props.maximum_packet_size.unwrap_or(0), Ordering::Release);
                self.status.connected.store(true, Ordering::Release);
                if !session_present {
                    self.incoming_qos2.clear();
                }
                let line = format!(
                    "connected to {} (session present: {session_present}, {} queued)",
                    link.peer,
                    self.outbox.queued()
                );
                self.link = Some(link);
                self.retry_attempt = 0;
                self.retry_at = None;
                let receive_maximum = props.receive_maximum.unwrap_or(u16::MAX);
                self.log(LOG_INFO, line);
                self.emit(MqttEvent::Connected {
                    reason: 0,
                    session_present,
                    message: reason_code_to_string(0).into(),
                    props: props.into(),
                });
                for given_up in self.outbox.on_connected(receive_maximum, session_present) {
                    self.published(given_up);
                }
                // Packets that came right behind the CONNACK.
                self.decode_incoming();
            }
            Some(Err(AttemptFailure {
                reason,
                message,
                props,
            })) => {
                self.log(LOG_WARN, message.clone());
                self.emit(MqttEvent::Connected {
                    reason,
                    session_present: false,
                    message,
                    props: props.into(),
                });
                // With auto-reconnect on, a failed first attempt is retried too: a driver
                // that starts before its broker should not have to notice.
                if auto {
                    self.schedule_retry();
                } else if self.auto_reconnect.is_some() {
                    self.retry_attempt = 0;
                    self.schedule_retry();
                }
            }
        }
    }

    fn schedule_retry(&mut self) {
        let Some((min, max)) = self.auto_reconnect else {
            return;
        };
        let min = min.max(Duration::from_millis(1));
        let max = max.max(min);
        let factor = 2u32.saturating_pow(self.retry_attempt.min(31));
        let base = min.saturating_mul(factor).min(max);
        // Full jitter over the upper half, so clients that lost the same broker spread out.
        let low = (base / 2).max(min).as_millis() as u64;
        let high = (base.as_millis() as u64).max(low);
        let delay =
            Duration::from_millis(rand::Rng::gen_range(&mut rand::thread_rng(), low..=high));
        self.retry_attempt = self.retry_attempt.saturating_add(1);
        self.retry_at = Some(Instant::now() + delay);
        self.log(
            LOG_INFO,
            format!("reconnecting in {} ms", delay.as_millis()),
        );
    }

    // ---- disconnecting ----

    /// The end of an established connection: exactly one `Disconnected` for it.
    fn connection_ended(&mut self, link: Link, reason: i32, message: String, props: Props) {
        self.status.connected.store(false, Ordering::Release);
        for msg_id in link.qos0_in_out {
            self.qos0_failed(msg_id, "the connection was lost before it was written");
        }
        for (msg_id, kind) in self.outbox.on_connection_lost() {
            let (what, ack) = match kind {
                ControlKind::Subscribe => ("Subscribe", "SUBACK"),
                ControlKind::Unsubscribe => ("Unsubscribe", "UNSUBACK"),
            };
            self.log(
                LOG_WARN,
                format!("{what} {msg_id}: the connection ended before its {ack}"),
            );
        }
        self.emit(MqttEvent::Disconnected {
            reason,
            message,
            props: props.into(),
        });
    }

    /// The link failed under us (network, keep-alive, broker DISCONNECT).
    fn lost(&mut self, reason: i32, message: String, props: Props, detail: String) {
        let Some(link) = self.link.take() else {
            return;
        };
        self.log(
            LOG_WARN,
            format!("connection to {} lost: {detail}", link.peer),
        );
        self.connection_ended(link, reason, message, props);
        if self.auto_reconnect.is_some() {
            self.retry_attempt = 0;
            self.schedule_retry();
        }
    }

    /// The broker broke the protocol: the link is dropped and the driver told why, with the
    /// MQTT 5 reason code naming the fault (129 malformed, 130 protocol error, 149 too
    /// large) rather than 7, which would blame the network.
    fn violation(&mut self, reason: i32, detail: String) {
        let message = format!("{}: {detail}", reason_code_to_string(reason));
        self.lost(reason, message, Props::default(), detail);
    }

    /// A clean DISCONNECT (no will), after writing whatever is pending.
    async fn close_cleanly(&mut self, props: Props) {
        if self.link.is_none() {
            return;
        }
        self.fill();
        let Some(mut link) = self.link.take() else {
            return;
        };
        let props = if link.version == ProtocolVersion::V5 {
            props
        } else {
            Props::default()
        };
        let _ = wire::encode(
            link.version,
            &Packet::Disconnect(wire::Disconnect { reason: 0, props }),
            &mut link.out,
        );
        let written = timeout(CLOSE_TIMEOUT, async {
            link.stream.write_all(&link.out).await?;
            link.stream.flush().await?;
            link.stream.shutdown().await
        })
        .await;
        if matches!(written, Ok(Ok(()))) {
            for msg_id in std::mem::take(&mut link.qos0_in_out) {
                self.qos0_written(msg_id);
            }
        }
        self.log(LOG_INFO, format!("disconnected from {}", link.peer));
        self.connection_ended(link, 0, "Disconnected on request.".into(), Props::default());
    }

    /// Leaving for good: what is already encoded or sendable goes out, then DISCONNECT;
    /// not a word more to the driver.
    async fn close_quietly(&mut self) {
        self.deaf = true;
        self.fill();
        self.status.connected.store(false, Ordering::Release);
        if let Some(mut link) = self.link.take() {
            let _ = wire::encode(
                link.version,
                &Packet::Disconnect(wire::Disconnect {
                    reason: 0,
                    props: Props::default(),
                }),
                &mut link.out,
            );
            let _ = timeout(CLOSE_TIMEOUT, async {
                link.stream.write_all(&link.out).await?;
                link.stream.flush().await?;
                link.stream.shutdown().await
            })
            .await;
        }
    }

    // ---- the link ----

    fn qos0_written(&mut self, msg_id: MsgId) {
        self.status.published.fetch_add(1, Ordering::Relaxed);
        self.emit(MqttEvent::Published {
            msg_id,
            reason: 0,
            message: reason_code_to_string(0).into(),
            props: EventProps::default(),
        });
    }

    /// Moves what the window allows from the outbox into the pending output.
    fn fill(&mut self) {
        let Some(link) = &mut self.link else {
            return;
        };
        let mut unencodable = Vec::new();
        let mut first_sends = 0;
        while let Some(out) = self.outbox.next_outgoing() {
            match out {
                Outgoing::Publish {
                    req,
                    pkid,
                    dup,
                    first,
                } => match wire::encode_publish(link.version, req, pkid, dup, &mut link.out) {
                    Ok(()) => first_sends += u64::from(first),
                    Err(e) => unencodable.push((pkid, e.to_string())),
                },
                Outgoing::PubRel { pkid } => {
                    let _ = wire::encode(
                        link.version,
                        &Packet::PubRel(Ack::success(pkid)),
                        &mut link.out,
                    );
                }
            }
        }
        self.status
            .published
            .fetch_add(first_sends, Ordering::Relaxed);
        for (pkid, why) in unencodable {
            if let Some(c) =
                self.outbox
                    .abandon(pkid, reason::UNSPECIFIED_ERROR, format!("not sent: {why}"))
            {
                self.published(c);
            }
        }
    }

    /// Writes all pending output with one flush.
    async fn flush(&mut self) {
        self.fill();
        let Some(link) = &mut self.link else {
            return;
        };
        if link.out.is_empty() {
            return;
        }
        let limit = link.keepalive.max(MIN_WRITE_TIMEOUT);
        let written = timeout(limit, async {
            link.stream.write_all(&link.out).await?;
            link.stream.flush().await
        })
        .await;
        match written {
            Ok(Ok(())) => {
                link.out.clear();
                link.last_sent = Instant::now();
                let written = std::mem::take(&mut link.qos0_in_out);
                for msg_id in written {
                    self.qos0_written(msg_id);
                }
            }
            Ok(Err(e)) => {
                self.lost(
                    err::CONN_LOST,
                    LOST.into(),
                    Props::default(),
                    format!("write: {e}"),
                );
            }
            Err(_) => {
                self.lost(
                    err::CONN_LOST,
                    LOST.into(),
                    Props::default(),
                    format!("write stalled for {} s", limit.as_secs()),
                );
            }
        }
    }

    fn on_keepalive_timer(&mut self) {
        let Some(link) = &mut self.link else {
            return;
        };
        let now = Instant::now();
        match link.keepalive_deadline() {
            Some(deadline) if now >= deadline => {}
            _ => return,
        }
        // While paused for the driver's backlog the answer may be unread in the socket:
        // ping again, so the broker keeps hearing from us, and judge the link once reading
        // resumes.
        if link.ping_sent.is_some() && !self.backlog.is_full() {
            let secs = link.keepalive.as_secs();
            self.lost(
                reason::KEEP_ALIVE_TIMEOUT,
                reason_code_to_string(reason::KEEP_ALIVE_TIMEOUT).into(),
                Props::default(),
                format!("no answer to PINGREQ within {secs} s"),
            );
            return;
        }
        link.ping_sent = Some(now);
        self.send(&Packet::PingReq);
    }

    fn on_read(&mut self, result: std::io::Result<usize>) {
        match result {
            Ok(0) => {
                self.lost(
                    err::CONN_LOST,
                    LOST.into(),
                    Props::default(),
                    "closed by the broker".into(),
                );
                return;
            }
            Err(e) => {
                self.lost(
                    err::CONN_LOST,
                    LOST.into(),
                    Props::default(),
                    format!("read: {e}"),
                );
                return;
            }
            Ok(_) => {}
        }
        if let Some(link) = &mut self.link {
            link.last_received = Instant::now();
            link.ping_sent = None;
        }
        self.decode_incoming();
    }

    /// Handles every whole packet in the read buffer.
    fn decode_incoming(&mut self) {
        loop {
            let Some(link) = &mut self.link else {
                return;
            };
            match wire::decode(link.version, &mut link.read_buf, link.max_incoming) {
                Ok(Some(packet)) => self.on_packet(packet),
                Ok(None) => return,
                Err(e) => {
                    self.violation(e.reason_code(), format!("undecodable packet: {e}"));
                    return;
                }
            }
        }
    }

    fn on_packet(&mut self, packet: Packet) {
        match packet {
            Packet::Publish(publish) => self.on_incoming_publish(publish),
            Packet::PubAck(ack) => {
                let outcome = self.outbox.on_puback(ack.pkid, ack.reason, ack.props);
                self.on_ack_outcome("PUBACK", ack.pkid, outcome);
            }
            Packet::PubRec(ack) => {
                let outcome = self.outbox.on_pubrec(ack.pkid, ack.reason, ack.props);
                if matches!(outcome, AckOutcome::Unknown) && ack.reason < 128 {
                    // Still answered, as libmosquitto does and MQTT 5 asks (146 "Packet
                    // Identifier not found"), so the broker does not hold the id forever.
                    let v5 = self.link.as_ref().map(|l| l.version) == Some(ProtocolVersion::V5);
                    self.send(&Packet::PubRel(Ack {
                        pkid: ack.pkid,
                        reason: if v5 { 146 } else { 0 },
                        props: Props::default(),
                    }));
                }
                self.on_ack_outcome("PUBREC", ack.pkid, outcome);
            }
            Packet::PubComp(ack) => {
                let outcome = self.outbox.on_pubcomp(ack.pkid, ack.reason, ack.props);
                self.on_ack_outcome("PUBCOMP", ack.pkid, outcome);
            }
            Packet::PubRel(ack) => {
                let known = self.incoming_qos2.remove(&ack.pkid);
                let v5 = self.link.as_ref().map(|l| l.version) == Some(ProtocolVersion::V5);
                let reason = if known || !v5 { 0 } else { 146 };
                self.send(&Packet::PubComp(Ack {
                    pkid: ack.pkid,
                    reason,
                    props: Props::default(),
                }));
            }
            Packet::SubAck(ack) => match self.outbox.on_suback(ack.pkid) {
                Some(msg_id) => self.emit(MqttEvent::Subscribed {
                    msg_id,
                    granted: ack.reasons,
                    props: ack.props.into(),
                }),
                None => self.log(
                    LOG_DEBUG,
                    format!("SUBACK for unknown packet id {} ignored", ack.pkid),
                ),
            },
            Packet::UnsubAck(ack) => match self.outbox.on_unsuback(ack.pkid) {
                Some(msg_id) => self.emit(MqttEvent::Unsubscribed {
                    msg_id,
                    props: ack.props.into(),
                }),
                None => self.log(
                    LOG_DEBUG,
                    format!("UNSUBACK for unknown packet id {} ignored", ack.pkid),
                ),
            },
            Packet::PingResp => {}
            Packet::Disconnect(d) => {
                let mut message = reason_code_to_string(d.reason).to_string();
                if let Some(why) = &d.props.reason_string {
                    message = format!("{message} ({why})");
                }
                let detail = format!("the broker sent DISCONNECT: {message}");
                self.lost(d.reason, message, d.props, detail);
            }
            other @ (Packet::Connect(_)
            | Packet::ConnAck(_)
            | Packet::Subscribe(_)
            | Packet::Unsubscribe(_)
            | Packet::PingReq) => {
                self.violation(
                    reason::PROTOCOL_ERROR,
                    format!("the broker sent {}", packet_name(&other)),
                );
            }
        }
    }

    fn on_ack_outcome(&mut self, kind: &str, pkid: u16, outcome: AckOutcome) {
        match outcome {
            AckOutcome::Completed(c) => self.published(c),
            AckOutcome::SendPubRel(pkid) => self.send(&Packet::PubRel(Ack::success(pkid))),
            AckOutcome::Unknown => self.log(
                LOG_DEBUG,
                format!("{kind} for packet id {pkid} matches nothing outstanding; ignored"),
            ),
        }
    }

    fn on_incoming_publish(&mut self, mut publish: wire::Publish) {
        let Some(link) = &mut self.link else {
            return;
        };
        if let Some(alias) = publish.props.topic_alias {
            if publish.topic.is_empty() {
                match link.aliases.get(&alias) {
                    Some(topic) => publish.topic = topic.clone(),
                    None => {
                        self.violation(
                            reason::PROTOCOL_ERROR,
                            format!("the broker sent PUBLISH with unknown topic alias {alias}"),
                        );
                        return;
                    }
                }
            } else {
                link.aliases.insert(alias, publish.topic.clone());
            }
        }
        // MQTT forbids these in a topic name; a driver must never see a "message" on a
        // filter, which its own topic matching would take for a real topic.
        if publish.topic.is_empty() || publish.topic.contains(['+', '#', '\0']) {
            self.violation(
                reason::PROTOCOL_ERROR,
                format!(
                    "the broker sent PUBLISH with invalid topic name {:?}",
                    publish.topic
                ),
            );
            return;
        }
        let pkid = publish.pkid;
        let deliver = match publish.qos {
            0 => true,
            1 => {
                self.send(&Packet::PubAck(Ack::success(pkid)));
                true
            }
            _ => {
                self.send(&Packet::PubRec(Ack::success(pkid)));
                self.incoming_qos2.insert(pkid)
            }
        };
        if deliver {
            self.emit(MqttEvent::Message {
                msg_id: pkid,
                topic: publish.topic,
                payload: publish.payload,
                qos: publish.qos,
                retain: publish.retain,
                props: publish.props.into(),
            });
        }
    }
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
