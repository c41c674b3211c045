//! A connection's first frame: `login` (a token) or `resume` (a session id), then the
//! connection is bound to its user locally and in the cluster, its session made, and the greeting
//! written: `login_result`, and `caught_up` when nothing is to be replayed.

use super::*;

impl Connection {
    /// Reads LOGIN or RESUME and binds the connection: registration (locally and in the
    /// cluster), a session, the device's cursor, `login_result`, and the device stream that
    /// replays what follows the cursor.
    pub(super) async fn login(
        &mut self,
        deadline: Instant,
        pending: PendingGuard,
    ) -> Result<Box<Bound>, Close> {
        let mut hello = self.authenticate(deadline).await?;
        let node = self.node.clone();
        let settings = &node.settings;
        let peer = self.peer;
        let handle = self.bind(&mut hello).await?;
        let (conn, user) = (handle.id, &*handle.user);
        // From here on live pushes reach this connection (locally and from other nodes); what
        // was sent before is in the database, or on its way there, below the stream's head.
        let (stored_cursor, stored_head) = match node
            .store()
            .device_start(&handle.user, &handle.device_id)
            .await
        {
            Ok(start) => start,
            Err(e) => {
                crate::warn_limited!(%peer, conn, user, error = %esc(&e), "cannot read the device's cursor");
                self.unregister(&handle).await;
                return Err(login_failed(
                    ErrorCode::Unavailable,
                    "the message store is unavailable; retry later",
                ));
            }
        };
        // Nothing can refuse the login any more: the session is created, or the presented one
        // replaced (used up) now.
        let resumed = hello.resumed.is_some();
        let ticket = match &hello.resumed {
            Some(presented) => {
                match node
                    .cluster()
                    .resume_session(presented, &handle.device_id)
                    .await
                {
                    Ok(Resume::Resumed { ticket, .. }) => {
                        count_session("resumed");
                        ticket
                    }
                    Ok(Resume::Unknown | Resume::WrongDevice) => {
                        // Taken by a concurrent RESUME, revoked or expired since it was read.
                        count_session("unknown");
                        self.unregister(&handle).await;
                        return Err(session_expired());
                    }
                    Err(e) => {
                        crate::warn_limited!(%peer, conn, user, error = %esc(&e), "cannot resume a session");
                        self.unregister(&handle).await;
                        return Err(sessions_unavailable());
                    }
                }
            }
            None => {
                let session = Session {
                    user: handle.user.to_string(),
                    device: handle.device_id.to_string(),
                    channel: handle.channel.to_string(),
                };
                let (ticket, stored) = node.cluster().create_session(&session).await;
                if let Err(e) = stored {
                    crate::warn_limited!(%peer, conn, user, error = %esc(&e), "session not stored; a RESUME with it will be refused");
                }
                count_session("created");
                ticket
            }
        };
        let cursor = stored_cursor.max(hello.last_seq);
        // Embedded: the first connection of a user since the node started sets the user's
        // counter from the store, so that messages to the user need no database read.
        node.cluster().prime_seq(&handle.user, stored_head);
        // The last position taken, committed or not (the stored head lags it by the writes in
        // flight): replay waits for every position up to it. No counter means no position was
        // taken since the stored head, and any taken from now on is pushed here live.
        let head = match node.cluster().stream_head(&handle.user).await {
            Ok(head) => Some(head.unwrap_or(0).max(stored_head)),
            Err(e) => {
                debug!(%peer, conn, user, error = %esc(&e), "stream head unknown; replay reads the database");
                None
            }
        };

        metrics::gauge_connections(self.kind, &handle.channel, 1.0);
        metrics::counter_login(if resumed { "resumed" } else { "ok" });

        let interval_ms = negotiate_heartbeat(hello.heartbeat, &settings.heartbeat);
        let heartbeat = Heartbeat {
            interval: Duration::from_millis(interval_ms),
            idle_timeout: Duration::from_millis(interval_ms * u64::from(settings.heartbeat.missed)),
        };
        let result = ServerFrame::LoginResult {
            session_id: ticket.id.clone(),
            session_expires_at_ms: ticket.expires_at_ms,
            resumed,
            cursor,
            heartbeat_ms: interval_ms,
            idle_timeout_ms: heartbeat.idle_timeout.as_millis() as u64,
            node_id: node.node_id().to_owned(),
            user_id: handle.user.to_string(),
            server_time_ms: unix_millis(),
            protocol: PROTOCOL_VERSION,
        };
        let mut stream = DeviceStream::new(
            node.streams.clone(),
            handle.channel.clone(),
            cursor,
            head,
            Instant::now(),
        );
        // With nothing to replay, `caught_up` goes out in the same write as `login_result`.
        let mut first = vec![Outgoing {
            payload: result.encode(),
            accepted: None,
            push: false,
        }];
        metrics::counter_frame_out(result.kind());
        stream.pump(Instant::now(), &mut first);
        // Logged in: no longer pending (before the client can learn it).
        drop(pending);
        // Written even if a newer login displaced this one meanwhile: the client learns that it
        // logged in, then that it was kicked.
        if let Err(close) = self.write_out(None, &mut first).await {
            if let Some(presented) = &hello.resumed {
                // The client never learnt the new id: it still holds the one it presented.
                node.cluster()
                    .unresume_session(&ticket, presented, &handle.device_id)
                    .await;
            }
            self.unregister(&handle).await;
            metrics::gauge_connections(self.kind, &handle.channel, -1.0);
            return Err(close);
        }
        debug!(%peer, conn, user, transport = self.kind.as_str(), heartbeat_ms = interval_ms, channel = &*handle.channel, cursor, head, resumed, "logged in");
        Ok(Box::new(Bound {
            handle,
            heartbeat,
            session_id: ticket.id,
            stream,
        }))
    }

    /// Reads the first frame, which must be LOGIN (its token is verified) or RESUME (its session
    /// is checked, not yet used up), and says who is logging in.
    async fn authenticate(&mut self, deadline: Instant) -> Result<Hello, Close> {
        let node = self.node.clone();
        let settings = &node.settings;
        let peer = self.peer;
        let first = tokio::select! {
            r = tokio::time::timeout_at(deadline, self.reader.next()) => r,
            _ = node.shutdown.cancelled() => {
                return Err(Close::Error(ErrorCode::ShuttingDown, "node is shutting down".into()))
            }
        };
        let bytes = match first {
            Err(_) => {
                return Err(login_failed(
                    ErrorCode::LoginTimeout,
                    "no LOGIN within the login timeout",
                ))
            }
            Ok(None) => return Err(Close::PeerClosed),
            Ok(Some(Err(ReadError::TooLarge))) => {
                return Err(login_failed(
                    ErrorCode::FrameTooLarge,
                    too_large_message(settings.client.max_frame_len),
                ))
            }
            Ok(Some(Err(e))) => return Err(Close::Io(e.to_string())),
            Ok(Some(Ok(bytes))) => bytes,
        };
        let frame = match ClientFrame::decode(&bytes) {
            Ok(frame) => frame,
            Err(e) => {
                return Err(login_failed(
                    ErrorCode::BadFrame,
                    format!("invalid frame: {e}"),
                ))
            }
        };
        metrics::counter_frame_in(frame.kind());
        if matches!(
            frame,
            ClientFrame::Login { .. } | ClientFrame::Resume { .. }
        ) {
            // Before the token is checked or a session looked up: that is what costs.
            if let Err(refusal) = node.logins.attempt(peer.ip(), Instant::now()) {
                metrics::counter_login(ErrorCode::RateLimited.name());
                metrics::counter_rate_limited("address");
                let (message, wait) = match refusal {
                    LoginRefusal::RateLimited(wait) => (
                        "too many logins from this address; retry later".to_owned(),
                        wait,
                    ),
                    LoginRefusal::TableFull => (
                        "too many addresses logging in; retry later".to_owned(),
                        Duration::from_secs(1),
                    ),
                };
                return Err(Close::RateLimited(message, retry_after_ms(wait)));
            }
        }
        let hello = match frame {
            ClientFrame::Login {
                token,
                device_id,
                channel,
                client_version: _,
                heartbeat,
                last_seq,
            } => {
                check_hello(&device_id, heartbeat)?;
                if !node.router.is_channel(&channel) {
                    return Err(login_failed(
                        ErrorCode::UnknownChannel,
                        format!(
                            "unknown channel type {channel:?}; accepted: {}",
                            settings.channels.types.join(", ")
                        ),
                    ));
                }
                let claims = match node.auth.verify(&token) {
                    Ok(c) => c,
                    Err(e) => return Err(login_failed(e.code(), e.to_string())),
                };
                Hello {
                    user: claims.sub,
                    device_id,
                    channel,
                    heartbeat,
                    last_seq: last_seq.unwrap_or(0),
                    resumed: None,
                }
            }
            ClientFrame::Resume {
                session_id,
                device_id,
                last_seq,
                client_version: _,
                heartbeat,
            } => {
                check_hello(&device_id, heartbeat)?;
                // Only read here: the session is replaced once the login can no longer be
                // refused, so that a refused RESUME leaves it to be presented again.
                let session = match node.cluster().check_session(&session_id, &device_id).await {
                    Ok(SessionCheck::Valid(session)) => session,
                    Ok(SessionCheck::Unknown) => {
                        count_session("unknown");
                        return Err(session_expired());
                    }
                    Ok(SessionCheck::WrongDevice) => {
                        count_session("wrong_device");
                        return Err(login_failed(
                            ErrorCode::InvalidDevice,
                            "the session belongs to another device; log in",
                        ));
                    }
                    Err(e) => {
                        crate::warn_limited!(%peer, error = %esc(&e), "cannot check a session");
                        return Err(sessions_unavailable());
                    }
                };
                if !node.router.is_channel(&session.channel) {
                    return Err(login_failed(
                        ErrorCode::UnknownChannel,
                        "the session's channel type is no longer accepted; log in",
                    ));
                }
                Hello {
                    user: session.user,
                    device_id,
                    channel: session.channel,
                    heartbeat,
                    last_seq: last_seq.unwrap_or(0),
                    resumed: Some(session_id),
                }
            }
            other => {
                return Err(login_failed(
                    ErrorCode::LoginRequired,
                    format!(
                        "the first frame must be login or resume, not {}",
                        other.kind()
                    ),
                ))
            }
        };
        Ok(hello)
    }

    /// Binds the connection to its user: registered in the local map and, under the same
    /// duplicate-login policy, in the cluster (older connections are kicked where they are),
    /// and counted against the user's send rate. Takes the ids out of `hello`.
    async fn bind(&mut self, hello: &mut Hello) -> Result<Arc<ConnHandle>, Close> {
        let node = self.node.clone();
        let settings = &node.settings;
        let peer = self.peer;
        let handle = Arc::new(ConnHandle::new(
            std::mem::take(&mut hello.user).into(),
            std::mem::take(&mut hello.channel).into(),
            std::mem::take(&mut hello.device_id).into(),
            self.kind,
            settings.client.outbox_capacity,
            node.registry().queued().clone(),
        ));
        let (conn, user) = (handle.id, &*handle.user);
        let policy = settings.channels.policy(&handle.channel);
        let resuming = hello.resumed.is_some();
        match node.router.registry().register(handle.clone(), policy) {
            Ok(displaced) => {
                for old in displaced {
                    // A RESUME takes the session of its own device's older connection over.
                    if resuming && old.device_id == handle.device_id {
                        old.control.kick_keeping_session();
                    } else {
                        old.control.kick(KickReason::DuplicateLogin);
                    }
                }
            }
            Err(RegisterError::Duplicate) => {
                debug_assert_eq!(policy, DuplicateLoginPolicy::RejectNew);
                return Err(login_failed(
                    ErrorCode::DuplicateLogin,
                    "already connected on this channel type",
                ));
            }
            Err(RegisterError::TooMany) => return Err(too_many_connections(settings)),
        }
        node.router.recipients().logged_in(&handle.user);
        // The same policy across the cluster: older connections on other nodes are kicked there.
        match node
            .cluster()
            .register_as(&handle.presence(), policy, resuming)
            .await
        {
            Ok(RegisterOutcome::Registered) => {}
            Ok(RegisterOutcome::Rejected) => {
                node.registry().unregister(&handle.user, handle.id);
                return Err(login_failed(
                    ErrorCode::DuplicateLogin,
                    "already connected on this channel type on another node",
                ));
            }
            Ok(RegisterOutcome::TooMany) => {
                node.registry().unregister(&handle.user, handle.id);
                return Err(too_many_connections(settings));
            }
            Err(e) => {
                crate::warn_limited!(%peer, conn, user, error = %esc(&e), "presence not registered; it is re-registered when the cluster recovers")
            }
        }
        // Released by `unregister`.
        node.user_sends.acquire(&handle.user);
        Ok(handle)
    }
}
