//! A logged-in connection's loop: frames read, sends taken and answered in order, pushes from the
//! outbox and the device stream written, replay pages fetched, heartbeats kept.

use super::*;

impl Connection {
    /// Serves a logged-in connection until it ends. `bound` comes boxed so that the task does
    /// not hold it twice (as the login's result and as this future's argument).
    pub(super) async fn run(&mut self, bound: Box<Bound>) -> Close {
        let Bound {
            handle,
            heartbeat,
            session_id,
            mut stream,
        } = {
            // Unboxed in a block of its own, so that the box is freed now and not when this
            // function returns.
            let bound = bound;
            *bound
        };
        let node = self.node.clone();
        let mut last_activity = Instant::now();
        // When to look at the client's silence next (it is checked lazily: a frame moves
        // `last_activity`, not this).
        let mut idle_at = last_activity + heartbeat.idle_timeout;
        // One timer for the heartbeat check and the stream's deadlines (retransmissions,
        // database reads), re-armed when the earliest of them moves.
        let timer = tokio::time::sleep_until(idle_at);
        tokio::pin!(timer);
        let mut armed = Some(idle_at);
        let mut fetch: Option<(Fetch, PageFuture)> = None;
        let mut out: Vec<Outgoing> = Vec::new();
        // Payload bytes in `out` that the stream does not hold (broadcasts).
        let mut writing = 0;
        let close = loop {
            // What this connection holds in memory, against `client.max_queued_bytes`.
            handle.set_held_bytes(stream.queued_bytes(), writing);
            if !out.is_empty() {
                if let Err(close) = self.write_out(Some(&handle), &mut out).await {
                    break close;
                }
                writing = 0;
                handle.set_held_bytes(stream.queued_bytes(), 0);
            }
            if fetch.is_none() {
                if let Some(f) = stream.fetch(Instant::now()) {
                    let store = node.store().clone();
                    let cluster = node.cluster().clone();
                    let user = handle.user.clone();
                    // Its own task: a connection closing meanwhile does not cut the query off.
                    let read: PageFuture = tokio::spawn(async move {
                        // Asked before the read: a missing position that no node holds and
                        // that a later read does not find will never be stored.
                        let held = match f.probe {
                            Some((from, to)) => cluster.lowest_held(&user, from, to).await,
                            None => None,
                        };
                        let rows = store.stream(&user, f.from, f.limit).await?;
                        Ok((rows, held))
                    });
                    fetch = Some((f, read));
                }
            }
            let due = stream.deadline().map_or(idle_at, |at| at.min(idle_at));
            if armed != Some(due) {
                timer.as_mut().reset(due);
                armed = Some(due);
            }
            tokio::select! {
                biased;
                _ = node.shutdown.cancelled() => break Close::Kick(KickReason::Shutdown),
                _ = handle.control.kicked() => {
                    break Close::Kick(handle.control.reason().unwrap_or(KickReason::Admin))
                }
                batch = handle.outbox.recv(MAX_WRITE_BATCH) => {
                    let now = Instant::now();
                    for o in batch {
                        if o.stamp.seq == 0 {
                            writing += o.payload.len();
                            out.push(Outgoing { payload: o.payload, accepted: o.accepted, push: true });
                        } else {
                            stream.offer(o, now);
                        }
                    }
                    stream.pump(now, &mut out);
                }
                rows = async { (&mut fetch.as_mut().expect("guarded").1).await }, if fetch.is_some() => {
                    let (f, _) = fetch.take().expect("guarded");
                    let now = Instant::now();
                    match rows {
                        Ok(Ok((rows, held))) => stream.fill(f, rows, held, now, unix_millis()),
                        Ok(Err(e)) => {
                            debug!(peer = %self.peer, conn = handle.id, user = &*handle.user, error = %crate::logging::esc(&e), "cannot read the stream; trying again");
                            stream.fetch_failed(now);
                        }
                        Err(e) => {
                            debug!(peer = %self.peer, conn = handle.id, user = &*handle.user, error = %crate::logging::esc(&e), "cannot read the stream; trying again");
                            stream.fetch_failed(now);
                        }
                    }
                    stream.pump(now, &mut out);
                }
                () = &mut timer, if armed.is_some() => {
                    armed = None;
                    let now = Instant::now();
                    if stream.deadline().is_some_and(|at| at <= now) {
                        if stream.on_timer(now, &mut out).is_err() {
                            break Close::Kick(KickReason::AckTimeout);
                        }
                        stream.pump(now, &mut out);
                    }
                    if now >= idle_at {
                        if self.receipts.len() >= MAX_SENDS_IN_FLIGHT {
                            // Not reading is our doing (receipts are pending), not the client's
                            // silence: its frames wait in the socket.
                            last_activity = now;
                        }
                        idle_at = last_activity + heartbeat.idle_timeout;
                        if now >= idle_at {
                            break Close::HeartbeatTimeout;
                        }
                    }
                }
                receipt = next_receipt(&mut self.receipts), if !self.receipts.is_empty() => {
                    let frame = receipt.unwrap_or_else(|e| {
                        tracing::error!(peer = %self.peer, conn = handle.id, user = &*handle.user, error = %crate::logging::esc(&e), "send task failed");
                        ServerFrame::error(ErrorCode::Internal, "the message could not be processed")
                    });
                    reply(&mut out, &frame);
                    // Room for the next waiting sends, in the order they came.
                    while self.receipts.len() < MAX_SENDS_IN_FLIGHT {
                        let Some(d) = self.deferred.pop_front() else { break };
                        Box::pin(self.on_send(&handle, d)).await;
                    }
                }
                frame = self.reader.next() => {
                    last_activity = Instant::now();
                    match frame {
                        None => break Close::PeerClosed,
                        Some(Err(ReadError::TooLarge)) => {
                            break Close::Error(ErrorCode::FrameTooLarge, too_large_message(node.settings.client.max_frame_len))
                        }
                        Some(Err(e)) => break Close::Io(e.to_string()),
                        Some(Ok(bytes)) => {
                            if let Some(close) = self.on_frame(&handle, &mut stream, &mut out, bytes).await {
                                break close;
                            }
                        }
                    }
                }
            }
        };
        debug!(
            peer = %self.peer,
            conn = handle.id,
            user = &*handle.user,
            ?close,
            interval_ms = heartbeat.interval.as_millis() as u64,
            cursor = stream.cursor(),
            "connection ending"
        );
        // Counted before the connection leaves the registry: whoever sees it gone sees it counted.
        count_close(&close, &node);
        self.unregister(&handle).await;
        metrics::gauge_connections(self.kind, &handle.channel, -1.0);
        // The session ends with LOGOUT and with kicks that mean "do not come back as this
        // session"; a connection that merely broke (or a node going down) can be resumed.
        // A RESUME of this device that displaced this connection takes the session over.
        if matches!(
            close,
            Close::Logout | Close::Kick(KickReason::DuplicateLogin | KickReason::Admin)
        ) && !handle.control.keeps_session()
        {
            // Boxed, like every once-per-connection call into the cluster.
            Box::pin(node.cluster().revoke_session(&session_id)).await;
        }
        close
    }

    /// Writes `out` with one flush (bounded by the write timeout, cut short by a kick of
    /// `handle` when given), then clears it.
    pub(super) async fn write_out(
        &mut self,
        handle: Option<&ConnHandle>,
        out: &mut Vec<Outgoing>,
    ) -> Result<(), Close> {
        let node = self.node.clone();
        let write_timeout = Duration::from_millis(node.settings.client.write_timeout_ms);
        let writer = &mut self.writer;
        let batch = async {
            for o in out.iter() {
                writer.feed(o.payload.clone()).await?;
            }
            writer.flush().await
        };
        // A write blocked on a client that does not read ends at the write timeout, or sooner
        // when the connection is kicked meanwhile.
        let kicked = async {
            match handle {
                Some(h) => {
                    h.control.kicked().await;
                    h.control.reason().unwrap_or(KickReason::Admin)
                }
                None => std::future::pending().await,
            }
        };
        let written = tokio::select! {
            written = timeout(write_timeout, batch) => written,
            reason = kicked => return Err(Close::Kick(reason)),
        };
        match written {
            Ok(Ok(())) => {
                let now = std::time::Instant::now();
                let mut pushes = 0;
                for o in out.drain(..) {
                    if o.push {
                        pushes += 1;
                    }
                    if let Some(accepted) = o.accepted {
                        node.metrics
                            .push_latency
                            .record(now.duration_since(accepted));
                    }
                }
                metrics::counter_pushes_out(pushes);
                Ok(())
            }
            Ok(Err(e)) => Err(Close::Io(e.to_string())),
            Err(_) => Err(Close::Kick(KickReason::SlowConsumer)),
        }
    }

    /// Handles one frame of a logged-in connection; `Some` ends the connection.
    async fn on_frame(
        &mut self,
        handle: &Arc<ConnHandle>,
        stream: &mut DeviceStream,
        out: &mut Vec<Outgoing>,
        bytes: Bytes,
    ) -> Option<Close> {
        let frame = match ClientFrame::decode(&bytes) {
            Ok(frame) => frame,
            Err(e) => {
                metrics::counter_frame_in("invalid");
                let error = ServerFrame::error(ErrorCode::BadFrame, format!("invalid frame: {e}"));
                metrics::counter_protocol_error(ErrorCode::BadFrame);
                reply(out, &error);
                return None;
            }
        };
        metrics::counter_frame_in(frame.kind());
        let answer = match frame {
            ClientFrame::Heartbeat {} => ServerFrame::HeartbeatAck {
                server_time_ms: unix_millis(),
            },
            ClientFrame::Send {
                to,
                channel,
                client_msg_id,
                body,
                retry,
            } => {
                let now = self.receipts.len() < MAX_SENDS_IN_FLIGHT && self.deferred.is_empty();
                if now || self.deferred.len() < MAX_DEFERRED_SENDS {
                    let Some(slot) = self.node.send_slots.try_take() else {
                        // The node holds all the sends it can answer in time: say no at once.
                        ::metrics::counter!(metrics::SENDS_SHED).increment(1);
                        self.node.metrics.refused.increment(1);
                        let refusal = refused_at_once(
                            client_msg_id,
                            ErrorCode::Unavailable,
                            BACKLOG_RETRY_MS,
                        );
                        reply(out, &refusal);
                        return None;
                    };
                    let send = TakenSend {
                        to,
                        channel,
                        client_msg_id,
                        body,
                        retry,
                        slot,
                    };
                    if now {
                        // Boxed: a send's state exists only while a send is being taken.
                        Box::pin(self.on_send(handle, send)).await;
                    } else {
                        self.deferred.push_back(send);
                    }
                } else {
                    // Too many sends unanswered: say no at once rather than stop reading.
                    ::metrics::counter!(metrics::RATE_LIMITED, "limit" => "backlog").increment(1);
                    let refusal =
                        refused_at_once(client_msg_id, ErrorCode::RateLimited, BACKLOG_RETRY_MS);
                    reply(out, &refusal);
                }
                return None;
            }
            ClientFrame::Ack {
                seq: None,
                id: None,
            } => {
                metrics::counter_protocol_error(ErrorCode::InvalidField);
                ServerFrame::error(ErrorCode::InvalidField, "ack needs seq or id")
            }
            ClientFrame::Ack { seq, id } => {
                metrics::counter_ack();
                if let Some(cursor) = stream.ack(seq, id) {
                    self.node
                        .store()
                        .save_cursor(&handle.user, &handle.device_id, cursor);
                }
                stream.pump(Instant::now(), out);
                return None;
            }
            ClientFrame::Logout {} => return Some(Close::Logout),
            ClientFrame::Login { .. } | ClientFrame::Resume { .. } => {
                metrics::counter_protocol_error(ErrorCode::AlreadyLoggedIn);
                ServerFrame::error(
                    ErrorCode::AlreadyLoggedIn,
                    "this connection is already logged in",
                )
            }
        };
        reply(out, &answer);
        None
    }

    /// Takes a send: the id, the place in the store's queue and the local delivery happen here,
    /// in the order sends arrive; the rest (other nodes, the commit) runs in a task of its own
    /// whose result is the receipt.
    async fn on_send(&mut self, handle: &Arc<ConnHandle>, send: TakenSend) {
        let TakenSend {
            to,
            channel,
            client_msg_id,
            body,
            retry,
            slot,
        } = send;
        let node = self.node.clone();
        let router = &node.router;
        // Rate limits first: a refused send costs nothing more.
        let now = Instant::now();
        let rate = node.connection_send_rate();
        let limited = match self.send_bucket.wait(rate, now) {
            Some(wait) => Some(("connection", wait)),
            None => node.user_sends.wait(&handle.user, now).map(|w| ("user", w)),
        };
        if let Some((limit, wait)) = limited {
            metrics::counter_rate_limited(limit);
            node.metrics.refused.increment(1);
            let frame =
                refused_at_once(client_msg_id, ErrorCode::RateLimited, retry_after_ms(wait));
            self.receipts
                .push_back(node.tasks.spawn(async move { frame }));
            return;
        }
        let _ = self.send_bucket.take(rate, now);
        node.user_sends.take(&handle.user, now);
        let checked = if valid_id(&client_msg_id) {
            router.check(&to, channel.as_deref())
        } else {
            Err(ErrorCode::InvalidField)
        };
        let begun = match checked {
            Err(reason) => Err(router.refused(reason)),
            Ok(()) => {
                let from = Some(handle.user.clone());
                let mut msg = router.accept(from, to, channel, body, Some(client_msg_id.clone()));
                msg.retry = retry;
                router.begin(msg).await
            }
        };
        let receipt = |delivery: crate::router::Delivery| ServerFrame::SendResult {
            client_msg_id,
            id: delivery.id,
            status: delivery.status,
            connections: delivery.connections,
            reason: delivery.reason,
            retry_after_ms: None,
        };
        let task = match begun {
            // Refused, or a retry answered from the store.
            Err(answer) => {
                let frame = receipt(answer);
                node.tasks.spawn(async move { frame })
            }
            Ok(submission) => {
                let node = node.clone();
                node.clone().tasks.spawn(async move {
                    // Released when the send is answered (or the node shuts down).
                    let _slot = slot;
                    receipt(node.router.finish(submission).await)
                })
            }
        };
        self.receipts.push_back(task);
    }
}

/// The receipt of the oldest send, once its task is done. Cancel safe: the receipt is taken
/// off the queue only when it is returned.
async fn next_receipt(
    receipts: &mut VecDeque<JoinHandle<ServerFrame>>,
) -> Result<ServerFrame, tokio::task::JoinError> {
    let Some(oldest) = receipts.front_mut() else {
        return std::future::pending().await;
    };
    let receipt = oldest.await;
    receipts.pop_front();
    receipt
}

/// The receipt of a send refused before it was taken: nothing was stored; the client may send
/// it again after `retry_after_ms`.
fn refused_at_once(client_msg_id: String, reason: ErrorCode, retry_after_ms: u64) -> ServerFrame {
    ServerFrame::SendResult {
        client_msg_id,
        id: None,
        status: imgate_shared::SendStatus::Refused,
        connections: 0,
        reason: Some(reason),
        retry_after_ms: Some(retry_after_ms),
    }
}

/// Queues a reply frame; it leaves with the next write.
fn reply(out: &mut Vec<Outgoing>, frame: &ServerFrame) {
    metrics::counter_frame_out(frame.kind());
    out.push(Outgoing {
        payload: frame.encode(),
        accepted: None,
        push: false,
    });
}
