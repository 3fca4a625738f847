//! The guest side of the muxer: packets from the guest's tx queue, and
//! guest-initiated streams to host sockets.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Instant;

use tracing::{debug, trace, warn};

use super::{connect_nonblocking, Muxer};
use crate::devices::virtio::vsock::connection::{ConnKey, ConnState, Connection};
use crate::devices::virtio::vsock::metrics::{add, inc, FirstResponse};
use crate::devices::virtio::vsock::packet::{op, op_name, Header, VSOCK_TYPE_STREAM};
use crate::devices::virtio::vsock::HOST_CID;

impl Muxer {
    /// A packet from the guest (tx queue).
    pub(crate) fn handle_guest_packet(&mut self, hdr: &Header, payload: &[u8], now: Instant) {
        inc(&self.metrics.tx_packets);
        add(&self.metrics.tx_bytes, payload.len() as u64);
        trace!(?hdr, "vsock: guest packet");

        if hdr.src_cid != self.guest_cid || hdr.type_ != VSOCK_TYPE_STREAM {
            inc(&self.metrics.tx_dropped);
            if self.limiter.allow() {
                warn!(
                    ?hdr,
                    "vsock: dropping guest packet with a bad source CID or type"
                );
            }
            return;
        }
        if hdr.dst_cid != HOST_CID {
            inc(&self.metrics.tx_dropped);
            if self.limiter.allow() {
                debug!(?hdr, "vsock: guest packet for a CID other than the host's");
            }
            if hdr.op != op::RST {
                self.reply_rst(hdr);
            }
            return;
        }

        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        let Some(conn) = self.table.get_mut(&key) else {
            match hdr.op {
                op::REQUEST => self.connect_to_host(hdr),
                op::RST => {}
                _ => {
                    debug!(?hdr, "vsock: guest packet for no connection");
                    self.reply_rst(hdr);
                }
            }
            return;
        };

        conn.update_peer_credit(hdr);
        match hdr.op {
            op::RST => {
                if conn.state == ConnState::LocalInit {
                    // Nothing listens on that guest port.
                    inc(&self.metrics.conns_rejected);
                    self.kill(key, false, "the guest refused the connection");
                } else {
                    inc(&self.metrics.conns_reset);
                    self.kill(key, false, "the guest reset the connection");
                }
                return;
            }
            op::RESPONSE => {
                if conn.accept_response() {
                    inc(&self.metrics.conns_host_initiated);
                    if self.metrics.record_response(key.peer_port, now) {
                        if let Some(hook) = self.response_hook.as_mut() {
                            (hook.0)(FirstResponse {
                                port: key.peer_port,
                                at: now,
                            });
                        }
                    }
                    debug!(
                        conn_id = conn.id,
                        local_port = key.local_port,
                        peer_port = key.peer_port,
                        "vsock: guest accepted host connection"
                    );
                    if let Err(e) = conn.flush_to_host(now) {
                        self.kill_on_error(key, &e);
                        return;
                    }
                } else {
                    self.kill_on_error(key, &"unexpected RESPONSE");
                    return;
                }
            }
            op::RW => {
                if let Err(e) = conn.recv_data(payload) {
                    self.kill_on_error(key, &e);
                    return;
                }
            }
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => conn.request_credit_update(),
            op::SHUTDOWN => conn.guest_shutdown(hdr.flags),
            other => {
                let msg = format!("unexpected {} (op {other})", op_name(other));
                self.kill_on_error(key, &msg);
                return;
            }
        }
        self.maintain_one(key, now);
    }

    /// A guest REQUEST to host port P: connect to `<uds_path>_P`.
    pub(super) fn connect_to_host(&mut self, hdr: &Header) {
        if !self.guest_connects {
            inc(&self.metrics.conns_rejected);
            debug!(
                port = hdr.dst_port,
                "vsock: guest connection refused: the jailed VMM reaches no host socket"
            );
            self.reply_rst(hdr);
            return;
        }
        if self.open_count() >= self.max_connections {
            inc(&self.metrics.conns_rejected);
            if self.limiter.allow() {
                warn!(
                    port = hdr.dst_port,
                    "vsock: refusing guest connection: {} connections open", self.max_connections
                );
            }
            self.reply_rst(hdr);
            return;
        }
        let mut path = OsString::from(self.uds_path.as_os_str());
        path.push(format!("_{}", hdr.dst_port));
        let path = PathBuf::from(path);
        match connect_nonblocking(&path) {
            Ok(stream) => {
                let key = ConnKey {
                    local_port: hdr.dst_port,
                    peer_port: hdr.src_port,
                };
                let id = self.next_id();
                debug!(
                    conn_id = id,
                    local_port = key.local_port,
                    peer_port = key.peer_port,
                    path = %path.display(),
                    "vsock: guest connected to host socket"
                );
                let mut conn = Connection::new_peer(id, key, stream, hdr, self.budget.clone());
                conn.in_rx_list = true;
                self.table.insert(key, conn);
                self.rxq.push_conn(key);
                inc(&self.metrics.conns_open);
                inc(&self.metrics.conns_guest_initiated);
            }
            Err(e) => {
                inc(&self.metrics.conns_rejected);
                debug!(
                    path = %path.display(),
                    "vsock: guest connection refused: {e}"
                );
                self.reply_rst(hdr);
            }
        }
    }
}
