//! TEMPORARY: stands in for the worker until the engine branch is merged. Removed at merge.
use super::{ClientStatus, EventSink, MqttCommand, ProtocolVersion, PublishRequest};
use std::sync::Arc;

pub struct MqttHandle {
    cmd_tx: tokio::sync::mpsc::UnboundedSender<MqttCommand>,
    pub status: Arc<ClientStatus>,
}

impl MqttHandle {
    pub fn send(&self, cmd: MqttCommand) -> bool {
        self.cmd_tx.send(cmd).is_ok()
    }
}

pub fn spawn_client(rt: &tokio::runtime::Handle, _sink: EventSink) -> MqttHandle {
    let (cmd_tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    rt.spawn(async move { while rx.recv().await.is_some() {} });
    MqttHandle {
        cmd_tx,
        status: Arc::new(ClientStatus::default()),
    }
}

pub mod wire {
    use super::*;
    pub fn publish_packet_size(_v: ProtocolVersion, r: &PublishRequest) -> usize {
        r.topic.len() + r.payload.len() + 16
    }
}
