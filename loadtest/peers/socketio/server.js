"use strict";
// The Socket.IO peer of the imgate load test: the same chat shape as imgate, built the way a
// Socket.IO user would build it.
//
// - Socket.IO v4, WebSocket transport only (no long-polling), no per-message deflate.
// - A client authenticates with its user id: `40{"token":"<user>"}` (handshake auth), or the
//   query parameter `?user=<user>`. There is no JWT check: the peer is compared on delivery, not
//   on authentication.
// - Every socket joins a room named after its user id.
// - A "chat" event `{to, body}` is emitted to the recipient's room as `{from, body}` through the
//   Redis adapter, so that several processes sharing one Redis deliver across processes; the
//   sender's ack callback gets `{status: "sent"}` (the adapter cannot tell whether anyone is in the
//   room, so "sent" is all Socket.IO can promise).
//
// Environment: PORT (default 3000), HOST (default 127.0.0.1), REDIS_URL (default
// redis://127.0.0.1:6379), ADAPTER_KEY (Redis channel prefix, default imgate-loadtest-sio).

const http = require("node:http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");

const PORT = Number(process.env.PORT || 3000);
const HOST = process.env.HOST || "127.0.0.1";
const REDIS_URL = process.env.REDIS_URL || "redis://127.0.0.1:6379";
const ADAPTER_KEY = process.env.ADAPTER_KEY || "imgate-loadtest-sio";
const MAX_ID_LEN = 128;

function validUser(u) {
  return typeof u === "string" && u.length > 0 && u.length <= MAX_ID_LEN;
}

async function main() {
  const pub = createClient({ url: REDIS_URL });
  const sub = pub.duplicate();
  for (const c of [pub, sub]) {
    c.on("error", (err) => console.error(`redis error: ${err.message}`));
  }
  await Promise.all([pub.connect(), sub.connect()]);

  const httpServer = http.createServer((req, res) => {
    if (req.url === "/healthz") {
      res.writeHead(200, { "content-type": "application/json" });
      res.end(JSON.stringify({ status: "ok", pid: process.pid, connections: io.engine.clientsCount }));
    } else {
      res.writeHead(404);
      res.end();
    }
  });

  const io = new Server(httpServer, {
    transports: ["websocket"],
    serveClient: false,
    perMessageDeflate: false,
    maxHttpBufferSize: 64 * 1024,
    adapter: createAdapter(pub, sub, { key: ADAPTER_KEY }),
  });

  io.use((socket, next) => {
    const auth = socket.handshake.auth || {};
    const user = validUser(auth.token) ? auth.token : socket.handshake.query.user;
    if (!validUser(user)) {
      return next(new Error("no user: connect with auth {token: <user id>} or ?user=<user id>"));
    }
    socket.data.user = user;
    next();
  });

  io.on("connection", (socket) => {
    socket.join(socket.data.user);
    socket.on("chat", (msg, ack) => {
      const reply = typeof ack === "function" ? ack : () => {};
      if (!msg || !validUser(msg.to)) {
        return reply({ status: "refused", reason: "INVALID_FIELD" });
      }
      io.to(msg.to).emit("chat", { from: socket.data.user, body: msg.body });
      reply({ status: "sent" });
    });
  });

  httpServer.listen(PORT, HOST, () => {
    console.log(`socket.io peer listening on ${HOST}:${PORT} (pid ${process.pid}, redis ${REDIS_URL})`);
  });

  const stop = () => {
    io.close();
    Promise.allSettled([pub.quit(), sub.quit()]).finally(() => process.exit(0));
    setTimeout(() => process.exit(0), 2000).unref();
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
