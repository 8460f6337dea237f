//! The outgoing side of one client's session, as pure state: no I/O, no clock, no tokio.
//!
//! In: QoS 1/2 [`PublishRequest`]s ([`Outbox::enqueue`]), acks from the broker
//! (`on_puback` / `on_pubrec` / `on_pubcomp` / `on_suback` / `on_unsuback`), and the
//! connection coming and going (`on_connected` / `on_connection_lost`).
//! Out: the packets to write next ([`Outbox::next_outgoing`], within the in-flight
//! window) and [`Completion`]s, each message's one and only result.
//!
//! Invariants: every enqueued message is completed exactly once (or still held); no two
//! outstanding packets (publishes, subscribes, unsubscribes) ever share a packet id; a
//! message keeps its packet id until it completes, across reconnects, so a resent
//! PUBLISH (DUP) or PUBREL refers to what the broker already holds.

use super::codes::{reason, reason_code_to_string};
use super::types::{MsgId, Props, PublishRequest};
use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};

/// The final result of one message.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub msg_id: MsgId,
    /// The broker's reason (0 on MQTT 3.1.1 success); ≥ 128 is a failure.
    pub reason: i32,
    /// The reason code's text, or what went wrong when luadriver gave up on the message.
    pub message: Cow<'static, str>,
    pub props: Props,
}

impl Completion {
    pub fn is_success(&self) -> bool {
        self.reason < 128
    }
}

/// What a broker's ack to a publish leads to.
// Returned by value and consumed at once; boxing would cost an allocation per ack.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum AckOutcome {
    Completed(Completion),
    /// QoS 2: the broker has the message; answer with PUBREL for this packet id.
    SendPubRel(u16),
    /// No outstanding packet matches: a stray or duplicate ack, nothing changed.
    Unknown,
}

/// The next packet to write.
#[derive(Debug, PartialEq)]
pub enum Outgoing<'a> {
    Publish {
        req: &'a PublishRequest,
        pkid: u16,
        dup: bool,
        /// The message's first send (for the "published" statistic).
        first: bool,
    },
    PubRel {
        pkid: u16,
    },
}

/// What a subscribe-side packet id was used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlKind {
    Subscribe,
    Unsubscribe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// PUBLISH sent (or to be resent); waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    AwaitingAck,
    /// QoS 2 after PUBREC: PUBREL sent (or to be resent); waiting for PUBCOMP.
    AwaitingComp,
}

#[derive(Debug)]
struct Entry {
    req: PublishRequest,
    /// Order of first send, so resends keep the original order.
    seq: u64,
    stage: Stage,
    /// PUBLISH packets written for this message so far (first + resends).
    sends: u32,
    /// Written on the current connection and awaiting its ack (counts in the window).
    live: bool,
}

/// Packet ids 1..=65535, one bit each.
struct IdPool {
    used: Box<[u64; 1024]>,
    next: u16,
    in_use: usize,
}

impl IdPool {
    fn new() -> IdPool {
        IdPool {
            used: Box::new([0; 1024]),
            next: 1,
            in_use: 0,
        }
    }

    fn is_used(&self, id: u16) -> bool {
        self.used[id as usize / 64] & (1 << (id % 64)) != 0
    }

    /// The next free id after the last one handed out, so ids rotate and a late ack for
    /// a finished message is unlikely to hit a new one.
    fn alloc(&mut self) -> Option<u16> {
        if self.in_use >= 65535 {
            return None;
        }
        let mut id = self.next;
        loop {
            if id == 0 {
                id = 1;
            }
            if !self.is_used(id) {
                self.used[id as usize / 64] |= 1 << (id % 64);
                self.in_use += 1;
                self.next = id.wrapping_add(1);
                return Some(id);
            }
            id = id.wrapping_add(1);
        }
    }

    fn free(&mut self, id: u16) {
        if self.is_used(id) {
            self.used[id as usize / 64] &= !(1 << (id % 64));
            self.in_use -= 1;
        }
    }
}

/// One client's outgoing QoS 1/2 messages and subscribe-side packet ids.
pub struct Outbox {
    /// Never sent yet, in publish order.
    queue: VecDeque<PublishRequest>,
    /// Every message holding a packet id, by that id.
    entries: HashMap<u16, Entry>,
    /// Entries from an earlier connection still to be resent, in original order. May hold
    /// ids that completed meanwhile; those are skipped.
    resend: VecDeque<u16>,
    /// Subscribes and unsubscribes awaiting their ack.
    controls: HashMap<u16, (MsgId, ControlKind)>,
    ids: IdPool,
    next_seq: u64,
    live: usize,
    connected: bool,
    max_inflight: u16,
    receive_maximum: u16,
    max_sends: Option<u32>,
}

impl Outbox {
    /// `max_inflight` 0 = no limit of our own; `max_sends` `None` = never give up.
    pub fn new(max_inflight: u16, max_sends: Option<u32>) -> Outbox {
        Outbox {
            queue: VecDeque::new(),
            entries: HashMap::new(),
            resend: VecDeque::new(),
            controls: HashMap::new(),
            ids: IdPool::new(),
            next_seq: 0,
            live: 0,
            connected: false,
            max_inflight,
            receive_maximum: u16::MAX,
            max_sends,
        }
    }

    pub fn set_limits(&mut self, max_inflight: u16, max_sends: Option<u32>) {
        self.max_inflight = max_inflight;
        self.max_sends = max_sends;
    }

    /// Messages waiting to be sent (never sent, or to be resent after a reconnect).
    pub fn queued(&self) -> usize {
        self.queue.len() + (self.entries.len() - self.live)
    }

    /// Messages written on the current connection and awaiting their ack.
    pub fn inflight(&self) -> usize {
        self.live
    }

    /// Messages not yet completed.
    pub fn pending(&self) -> usize {
        self.queue.len() + self.entries.len()
    }

    fn window(&self) -> usize {
        let own = if self.max_inflight == 0 {
            u16::MAX
        } else {
            self.max_inflight
        };
        own.min(self.receive_maximum).max(1) as usize
    }

    /// A QoS 1/2 message to send when the window allows.
    pub fn enqueue(&mut self, req: PublishRequest) {
        self.queue.push_back(req);
    }

    /// The next packet to write now, if connected and the window has room: resends
    /// first (PUBLISH with DUP and the same id, or PUBREL), then queued messages.
    pub fn next_outgoing(&mut self) -> Option<Outgoing<'_>> {
        if !self.connected || self.live >= self.window() {
            return None;
        }
        while let Some(pkid) = self.resend.pop_front() {
            if self.entries.get(&pkid).is_none_or(|e| e.live) {
                continue;
            }
            let entry = self.entries.get_mut(&pkid)?;
            entry.live = true;
            self.live += 1;
            return Some(match entry.stage {
                Stage::AwaitingComp => Outgoing::PubRel { pkid },
                Stage::AwaitingAck => {
                    entry.sends += 1;
                    Outgoing::Publish {
                        req: &entry.req,
                        pkid,
                        dup: true,
                        first: false,
                    }
                }
            });
        }
        if self.queue.is_empty() {
            return None;
        }
        let pkid = self.ids.alloc()?;
        let req = self.queue.pop_front()?;
        let seq = self.next_seq;
        self.next_seq += 1;
        self.live += 1;
        let entry = self.entries.entry(pkid).or_insert(Entry {
            req,
            seq,
            stage: Stage::AwaitingAck,
            sends: 1,
            live: true,
        });
        Some(Outgoing::Publish {
            req: &entry.req,
            pkid,
            dup: false,
            first: true,
        })
    }

    fn take(&mut self, pkid: u16) -> Option<Entry> {
        let entry = self.entries.remove(&pkid)?;
        self.ids.free(pkid);
        if entry.live {
            self.live -= 1;
        }
        Some(entry)
    }

    fn complete(&mut self, pkid: u16, reason: i32, props: Props) -> AckOutcome {
        match self.take(pkid) {
            Some(entry) => AckOutcome::Completed(Completion {
                msg_id: entry.req.msg_id,
                reason,
                message: Cow::Borrowed(reason_code_to_string(reason)),
                props,
            }),
            None => AckOutcome::Unknown,
        }
    }

    fn stage_of(&self, pkid: u16) -> Option<(u8, Stage)> {
        self.entries.get(&pkid).map(|e| (e.req.qos, e.stage))
    }

    /// QoS 1 done: success below 128 (16 "No matching subscribers" included), failure
    /// otherwise; never retried either way.
    pub fn on_puback(&mut self, pkid: u16, reason: i32, props: Props) -> AckOutcome {
        match self.stage_of(pkid) {
            Some((1, Stage::AwaitingAck)) => self.complete(pkid, reason, props),
            _ => AckOutcome::Unknown,
        }
    }

    /// QoS 2 step one: the broker has the message (answer PUBREL), or refused it (≥ 128:
    /// completed as failed).
    pub fn on_pubrec(&mut self, pkid: u16, reason: i32, props: Props) -> AckOutcome {
        match self.stage_of(pkid) {
            Some((2, Stage::AwaitingAck)) if reason >= 128 => self.complete(pkid, reason, props),
            Some((2, Stage::AwaitingAck)) => {
                if let Some(entry) = self.entries.get_mut(&pkid) {
                    entry.stage = Stage::AwaitingComp;
                }
                AckOutcome::SendPubRel(pkid)
            }
            // A repeated PUBREC is answered again, as MQTT asks.
            Some((2, Stage::AwaitingComp)) => AckOutcome::SendPubRel(pkid),
            _ => AckOutcome::Unknown,
        }
    }

    /// QoS 2 done. 146 "Packet Identifier not found" after a resent PUBREL is a success:
    /// the broker owned the message once it sent PUBREC.
    pub fn on_pubcomp(&mut self, pkid: u16, reason: i32, props: Props) -> AckOutcome {
        match self.stage_of(pkid) {
            Some((2, Stage::AwaitingComp)) => {
                let reason = if reason == 146 { 0 } else { reason };
                self.complete(pkid, reason, props)
            }
            _ => AckOutcome::Unknown,
        }
    }

    /// Fails a message whose packet could not be written (e.g. it cannot be encoded).
    pub fn abandon(&mut self, pkid: u16, reason: i32, message: String) -> Option<Completion> {
        self.take(pkid).map(|entry| Completion {
            msg_id: entry.req.msg_id,
            reason,
            message: Cow::Owned(message),
            props: Props::default(),
        })
    }

    /// A packet id for a SUBSCRIBE or UNSUBSCRIBE, unique among everything outstanding.
    pub fn alloc_control(&mut self, msg_id: MsgId, kind: ControlKind) -> Option<u16> {
        let pkid = self.ids.alloc()?;
        self.controls.insert(pkid, (msg_id, kind));
        Some(pkid)
    }

    fn take_control(&mut self, pkid: u16, kind: ControlKind) -> Option<MsgId> {
        match self.controls.get(&pkid) {
            Some(&(msg_id, k)) if k == kind => {
                self.controls.remove(&pkid);
                self.ids.free(pkid);
                Some(msg_id)
            }
            _ => None,
        }
    }

    pub fn on_suback(&mut self, pkid: u16) -> Option<MsgId> {
        self.take_control(pkid, ControlKind::Subscribe)
    }

    pub fn on_unsuback(&mut self, pkid: u16) -> Option<MsgId> {
        self.take_control(pkid, ControlKind::Unsubscribe)
    }

    /// The link is gone: everything in flight waits for a resend, in original order.
    /// Returns the subscribes and unsubscribes whose ack will never come.
    pub fn on_connection_lost(&mut self) -> Vec<(MsgId, ControlKind)> {
        self.connected = false;
        self.live = 0;
        let mut parked: Vec<(u64, u16)> = self
            .entries
            .iter_mut()
            .map(|(&pkid, e)| {
                e.live = false;
                (e.seq, pkid)
            })
            .collect();
        parked.sort_unstable();
        self.resend = parked.into_iter().map(|(_, pkid)| pkid).collect();
        let mut lost: Vec<(u16, (MsgId, ControlKind))> = self.controls.drain().collect();
        lost.sort_unstable_by_key(|&(_, (msg_id, _))| msg_id);
        for &(pkid, _) in &lost {
            self.ids.free(pkid);
        }
        lost.into_iter().map(|(_, c)| c).collect()
    }

    /// A new connection is up; `receive_maximum` is the broker's (65,535 when it said
    /// nothing). Messages that already used up their sends are completed as failed here;
    /// the rest come out of [`Outbox::next_outgoing`].
    ///
    /// Without a session (`session_present` false) the broker has forgotten the QoS 2
    /// messages it PUBREC'd but was not yet released from: Mosquitto, for one, forwards a
    /// QoS 2 message to subscribers only on PUBREL. Resending PUBREL would complete them
    /// without delivery, so they start over with a PUBLISH: at least once, never lost.
    pub fn on_connected(&mut self, receive_maximum: u16, session_present: bool) -> Vec<Completion> {
        if self.connected {
            self.on_connection_lost();
        }
        if !session_present {
            for entry in self.entries.values_mut() {
                if entry.stage == Stage::AwaitingComp {
                    entry.stage = Stage::AwaitingAck;
                }
            }
        }
        self.connected = true;
        self.receive_maximum = if receive_maximum == 0 {
            u16::MAX
        } else {
            receive_maximum
        };
        let Some(max_sends) = self.max_sends else {
            return Vec::new();
        };
        let max_sends = max_sends.max(1);
        let exhausted: Vec<u16> = self
            .resend
            .iter()
            .copied()
            .filter(|pkid| {
                self.entries
                    .get(pkid)
                    .is_some_and(|e| e.stage == Stage::AwaitingAck && e.sends >= max_sends)
            })
            .collect();
        exhausted
            .into_iter()
            .filter_map(|pkid| {
                let sends = self.entries.get(&pkid).map_or(0, |e| e.sends);
                let s = if sends == 1 { "" } else { "s" };
                self.abandon(
                    pkid,
                    reason::UNSPECIFIED_ERROR,
                    format!("given up after {sends} send{s} without an acknowledgement"),
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn req(msg_id: MsgId, qos: u8) -> PublishRequest {
        PublishRequest {
            msg_id,
            topic: format!("t/{msg_id}"),
            payload: Bytes::from_static(b"p"),
            qos,
            retain: false,
            props: Props::default(),
        }
    }

    /// Drains what may be sent now: (msg id or 0 for PUBREL, pkid, dup, is_pubrel).
    fn drain(outbox: &mut Outbox) -> Vec<(MsgId, u16, bool, bool)> {
        let mut sent = Vec::new();
        while let Some(out) = outbox.next_outgoing() {
            sent.push(match out {
                Outgoing::Publish { req, pkid, dup, .. } => (req.msg_id, pkid, dup, false),
                Outgoing::PubRel { pkid } => (0, pkid, false, true),
            });
        }
        sent
    }

    fn completed(outcome: AckOutcome) -> Completion {
        match outcome {
            AckOutcome::Completed(c) => c,
            other => panic!("expected a completion, got {other:?}"),
        }
    }

    #[test]
    fn nothing_is_sent_before_the_first_connection() {
        let mut outbox = Outbox::new(20, None);
        outbox.enqueue(req(1, 1));
        assert!(drain(&mut outbox).is_empty());
        assert_eq!(outbox.queued(), 1);
        outbox.on_connected(u16::MAX, true);
        assert_eq!(drain(&mut outbox).len(), 1);
        assert_eq!((outbox.queued(), outbox.inflight()), (0, 1));
    }

    #[test]
    fn the_window_is_the_smaller_of_max_inflight_and_receive_maximum() {
        let mut outbox = Outbox::new(5, None);
        for id in 1..=20 {
            outbox.enqueue(req(id, 1));
        }
        outbox.on_connected(u16::MAX, true);
        let sent = drain(&mut outbox);
        assert_eq!(sent.len(), 5);
        assert_eq!(outbox.inflight(), 5);
        completed(outbox.on_puback(sent[0].1, 0, Props::default()));
        assert_eq!(drain(&mut outbox).len(), 1);

        let mut outbox = Outbox::new(0, None);
        for id in 1..=20 {
            outbox.enqueue(req(id, 2));
        }
        outbox.on_connected(3, true);
        assert_eq!(drain(&mut outbox).len(), 3);
    }

    #[test]
    fn out_of_order_acks_complete_the_right_messages_once() {
        let mut outbox = Outbox::new(0, None);
        for id in 1..=3 {
            outbox.enqueue(req(id, 1));
        }
        outbox.on_connected(u16::MAX, true);
        let sent = drain(&mut outbox);
        let done = completed(outbox.on_puback(sent[2].1, 16, Props::default()));
        assert_eq!((done.msg_id, done.reason), (3, 16));
        assert!(done.is_success(), "16 No matching subscribers is a success");
        assert_eq!(
            completed(outbox.on_puback(sent[0].1, 0, Props::default())).msg_id,
            1
        );
        assert_eq!(
            outbox.on_puback(sent[0].1, 0, Props::default()),
            AckOutcome::Unknown
        );
        assert_eq!(
            completed(outbox.on_puback(sent[1].1, 0, Props::default())).msg_id,
            2
        );
        assert_eq!(outbox.pending(), 0);
    }

    #[test]
    fn unknown_and_mismatched_acks_are_reported_and_change_nothing() {
        let mut outbox = Outbox::new(0, None);
        outbox.enqueue(req(1, 1));
        outbox.enqueue(req(2, 2));
        outbox.on_connected(u16::MAX, true);
        let sent = drain(&mut outbox);
        let (qos1, qos2) = (sent[0].1, sent[1].1);
        assert_eq!(
            outbox.on_puback(999, 0, Props::default()),
            AckOutcome::Unknown
        );
        assert_eq!(
            outbox.on_pubrec(qos1, 0, Props::default()),
            AckOutcome::Unknown
        );
        assert_eq!(
            outbox.on_puback(qos2, 0, Props::default()),
            AckOutcome::Unknown
        );
        assert_eq!(
            outbox.on_pubcomp(qos2, 0, Props::default()),
            AckOutcome::Unknown
        );
        assert_eq!(outbox.on_suback(qos1), None);
        assert_eq!((outbox.pending(), outbox.inflight()), (2, 2));
    }

    #[test]
    fn qos2_goes_publish_pubrec_pubrel_pubcomp() {
        let mut outbox = Outbox::new(0, None);
        outbox.enqueue(req(7, 2));
        outbox.on_connected(u16::MAX, true);
        let pkid = drain(&mut outbox)[0].1;
        assert_eq!(
            outbox.on_pubrec(pkid, 0, Props::default()),
            AckOutcome::SendPubRel(pkid)
        );
        assert_eq!(
            outbox.on_pubrec(pkid, 0, Props::default()),
            AckOutcome::SendPubRel(pkid),
            "a repeated PUBREC is answered again"
        );
        assert_eq!(outbox.inflight(), 1, "awaiting PUBCOMP still counts");
        let done = completed(outbox.on_pubcomp(pkid, 0, Props::default()));
        assert_eq!((done.msg_id, done.reason), (7, 0));
        assert_eq!(
            outbox.on_pubcomp(pkid, 0, Props::default()),
            AckOutcome::Unknown
        );
    }

    #[test]
    fn a_refusing_ack_fails_the_message_without_retry() {
        let mut outbox = Outbox::new(0, None);
        outbox.enqueue(req(1, 1));
        outbox.enqueue(req(2, 2));
        outbox.on_connected(u16::MAX, true);
        let sent = drain(&mut outbox);
        let a = completed(outbox.on_puback(sent[0].1, 135, Props::default()));
        let b = completed(outbox.on_pubrec(sent[1].1, 151, Props::default()));
        assert!(!a.is_success() && !b.is_success());
        assert_eq!(a.message, "Not authorized");
        outbox.on_connection_lost();
        outbox.on_connected(u16::MAX, true);
        assert!(drain(&mut outbox).is_empty());
    }

    #[test]
    fn resend_after_reconnect_keeps_order_ids_and_sets_dup() {
        let mut outbox = Outbox::new(0, None);
        for id in 1..=4 {
            outbox.enqueue(req(id, if id % 2 == 0 { 2 } else { 1 }));
        }
        outbox.on_connected(u16::MAX, true);
        let first = drain(&mut outbox);
        // Message 2 (QoS 2) got its PUBREC: it must come back as PUBREL, not PUBLISH.
        assert_eq!(
            outbox.on_pubrec(first[1].1, 0, Props::default()),
            AckOutcome::SendPubRel(first[1].1)
        );
        outbox.enqueue(req(5, 1));
        assert!(outbox.on_connection_lost().is_empty());
        assert_eq!((outbox.inflight(), outbox.queued()), (0, 5));
        assert!(drain(&mut outbox).is_empty(), "nothing goes out while down");
        assert!(outbox.on_connected(u16::MAX, true).is_empty());
        let again = drain(&mut outbox);
        assert_eq!(
            again[..4],
            [
                (1, first[0].1, true, false),
                (0, first[1].1, false, true),
                (3, first[2].1, true, false),
                (4, first[3].1, true, false),
            ]
        );
        assert_eq!((again[4].0, again[4].2), (5, false));
    }

    #[test]
    fn a_pubcomp_saying_identifier_not_found_after_a_pubrel_resend_is_success() {
        let mut outbox = Outbox::new(0, None);
        outbox.enqueue(req(1, 2));
        outbox.on_connected(u16::MAX, true);
        let pkid = drain(&mut outbox)[0].1;
        outbox.on_pubrec(pkid, 0, Props::default());
        outbox.on_connection_lost();
        outbox.on_connected(u16::MAX, true);
        assert_eq!(drain(&mut outbox), [(0, pkid, false, true)]);
        let done = completed(outbox.on_pubcomp(pkid, 146, Props::default()));
        assert!(done.is_success());
        assert_eq!(done.msg_id, 1);
    }

    #[test]
    fn without_a_session_a_released_qos2_message_starts_over_with_a_publish() {
        let mut outbox = Outbox::new(0, None);
        outbox.enqueue(req(1, 2));
        outbox.on_connected(u16::MAX, true);
        let pkid = drain(&mut outbox)[0].1;
        outbox.on_pubrec(pkid, 0, Props::default());
        outbox.on_connection_lost();
        // The broker lost its session: a PUBREL would complete a message it never kept.
        outbox.on_connected(u16::MAX, false);
        let again = drain(&mut outbox);
        assert_eq!(again, [(1, pkid, true, false)]);
        assert_eq!(
            outbox.on_pubrec(pkid, 0, Props::default()),
            AckOutcome::SendPubRel(pkid)
        );
        let done = completed(outbox.on_pubcomp(pkid, 0, Props::default()));
        assert_eq!((done.msg_id, done.reason), (1, 0));
    }

    #[test]
    fn retries_exhausted_fail_the_message_once_on_reconnect() {
        let mut outbox = Outbox::new(0, Some(2));
        outbox.enqueue(req(1, 1));
        outbox.enqueue(req(2, 2));
        outbox.on_connected(u16::MAX, true);
        let sent = drain(&mut outbox);
        // Message 2 reaches PUBCOMP stage: PUBREL resends do not count as sends.
        outbox.on_pubrec(sent[1].1, 0, Props::default());
        outbox.on_connection_lost();
        assert!(
            outbox.on_connected(u16::MAX, true).is_empty(),
            "second send allowed"
        );
        assert_eq!(drain(&mut outbox).len(), 2);
        outbox.on_connection_lost();
        let given_up = outbox.on_connected(u16::MAX, true);
        assert_eq!(given_up.len(), 1);
        assert_eq!((given_up[0].msg_id, given_up[0].reason), (1, 128));
        assert!(given_up[0].message.contains("given up after 2 sends"));
        assert_eq!(drain(&mut outbox), [(0, sent[1].1, false, true)]);
        outbox.on_connection_lost();
        assert!(
            outbox.on_connected(u16::MAX, true).is_empty(),
            "never reported twice"
        );
        assert_eq!(outbox.pending(), 1);
    }

    #[test]
    fn packet_ids_never_collide_across_publishes_and_subscribes() {
        let mut outbox = Outbox::new(0, None);
        outbox.on_connected(u16::MAX, true);
        let mut outstanding = std::collections::HashSet::new();
        let mut msg_id = 0;
        // Far more than 65,535 packets overall, with some always outstanding, so ids wrap.
        for round in 0..150_000u32 {
            msg_id += 1;
            if round % 3 == 0 {
                let pkid = outbox
                    .alloc_control(msg_id, ControlKind::Subscribe)
                    .unwrap();
                assert!(outstanding.insert(pkid), "id {pkid} handed out twice");
                if round % 2 == 0 {
                    assert_eq!(outbox.on_suback(pkid), Some(msg_id));
                    outstanding.remove(&pkid);
                }
            } else {
                outbox.enqueue(req(msg_id, 1));
                let sent = drain(&mut outbox);
                for &(_, pkid, _, _) in &sent {
                    assert!(outstanding.insert(pkid), "id {pkid} handed out twice");
                }
                if round % 5 != 0 {
                    for &(_, pkid, _, _) in &sent {
                        completed(outbox.on_puback(pkid, 0, Props::default()));
                        outstanding.remove(&pkid);
                    }
                }
            }
            assert!(!outstanding.contains(&0));
        }
        assert!(outstanding.len() > 10_000);
    }

    #[test]
    fn when_every_id_is_taken_nothing_more_is_sent_until_one_frees() {
        let mut outbox = Outbox::new(0, None);
        outbox.on_connected(u16::MAX, true);
        for id in 1..=65_535 {
            outbox.alloc_control(id, ControlKind::Unsubscribe).unwrap();
        }
        assert_eq!(outbox.alloc_control(0, ControlKind::Subscribe), None);
        outbox.enqueue(req(70_000, 1));
        assert!(drain(&mut outbox).is_empty());
        assert_eq!(outbox.on_unsuback(17), Some(17));
        assert_eq!(drain(&mut outbox), [(70_000, 17, false, false)]);
    }

    #[test]
    fn lost_subscribes_are_returned_and_their_ids_freed() {
        let mut outbox = Outbox::new(0, None);
        outbox.on_connected(u16::MAX, true);
        let a = outbox.alloc_control(1, ControlKind::Subscribe).unwrap();
        outbox.alloc_control(2, ControlKind::Unsubscribe).unwrap();
        assert_eq!(
            outbox.on_connection_lost(),
            [(1, ControlKind::Subscribe), (2, ControlKind::Unsubscribe)]
        );
        assert_eq!(outbox.on_suback(a), None);
        assert!(!outbox.ids.is_used(a));
    }

    #[test]
    fn every_message_completes_exactly_once_through_repeated_losses() {
        let mut outbox = Outbox::new(7, None);
        let mut done = std::collections::HashMap::new();
        for id in 1..=500 {
            outbox.enqueue(req(id, 1 + (id % 2) as u8));
        }
        let mut round = 0;
        while outbox.pending() > 0 {
            round += 1;
            assert!(round < 10_000, "no progress");
            outbox.on_connected(u16::MAX, true);
            // Ack some of what went out, then lose the link.
            for (step, (_, pkid, _, pubrel)) in drain(&mut outbox).into_iter().enumerate() {
                if step % 3 == round % 3 {
                    continue;
                }
                let outcome = if pubrel {
                    outbox.on_pubcomp(pkid, 0, Props::default())
                } else {
                    match outbox.on_puback(pkid, 0, Props::default()) {
                        AckOutcome::Unknown => outbox.on_pubrec(pkid, 0, Props::default()),
                        other => other,
                    }
                };
                if let AckOutcome::Completed(c) = outcome {
                    assert!(done.insert(c.msg_id, c).is_none(), "completed twice");
                }
            }
            outbox.on_connection_lost();
        }
        assert_eq!(done.len(), 500);
    }
}
