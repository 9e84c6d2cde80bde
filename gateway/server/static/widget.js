// GatewayChat: a small browser client for the gateway's visitor protocol
// (docs/protocol.md), JSON text frames over WebSocket. No dependencies.
//
//   const chat = new GatewayChat({url, token, tags, onDeliver, onState});
//   chat.connect();
//   const n = await chat.send("hello");   // resolves once the gateway acked
//
// Reconnects with resume {sid, last} after drops, goaway and reconnect-class
// codes (4000-4499, 1001, 1006, 1011), with exponential backoff and full
// jitter; unacknowledged messages are re-sent with their ids (the gateway
// deduplicates) and deliveries already seen are skipped.
"use strict";

class GatewayChat {
  constructor(opts) {
    this.url = opts.url || GatewayChat.defaultUrl();
    this.token = opts.token;
    this.tags = opts.tags || {};
    this.onDeliver = opts.onDeliver || (() => {});
    this.onState = opts.onState || (() => {});
    this.onError = opts.onError || (() => {});
    this.maxBackoffMs = opts.maxBackoffMs || 30000;
    this.sid = null;
    this.lastSeq = 0;
    this.ackedSeq = 0;
    this.nextId = 1;
    this.pending = new Map(); // id -> {body, resolve, reject}
    this.attempt = 0;
    this.ws = null;
    this.open = false;
    this.stopped = false;
    this.reconnectAfterMs = null;
  }

  static defaultUrl() {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    return `${proto}//${location.host}/v1/ws`;
  }

  connect() {
    this.stopped = false;
    const ws = new WebSocket(this.url);
    this.ws = ws;
    this.onState("connecting");
    ws.onopen = () => {
      const hello = { t: "hello", v: 1, token: this.token, platform: "web" };
      if (Object.keys(this.tags).length) hello.tags = this.tags;
      if (this.sid) hello.resume = { sid: this.sid, last: this.lastSeq };
      ws.send(JSON.stringify(hello));
    };
    ws.onmessage = (ev) => this._onFrame(JSON.parse(ev.data));
    ws.onclose = (ev) => this._onClose(ev.code, ev.reason);
  }

  send(body) {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { body, resolve, reject });
      if (this.open) this._write({ t: "msg", id, body });
    });
  }

  close() {
    this.stopped = true;
    if (this.ws) this.ws.close(1000);
  }

  _write(frame) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify(frame));
    }
  }

  _onFrame(f) {
    switch (f.t) {
      case "welcome":
        this.open = true;
        this.attempt = 0;
        if (!f.resumed) { this.lastSeq = 0; this.ackedSeq = 0; }
        if (f.resync) this.lastSeq = Math.max(this.lastSeq, f.first - 1);
        this.sid = f.sid;
        this.onState("open");
        for (const [id, p] of this.pending) this._write({ t: "msg", id, body: p.body });
        break;
      case "ack": {
        const p = this.pending.get(f.id);
        if (p) { this.pending.delete(f.id); p.resolve(f.n); }
        break;
      }
      case "deliver":
        if (f.seq > this.lastSeq) {
          this.lastSeq = f.seq;
          this.onDeliver(f);
        }
        if (this.lastSeq - this.ackedSeq >= 4) this._ack();
        else setTimeout(() => this._ack(), 200);
        break;
      case "ping":
        this._write({ t: "pong", ts: f.ts || 0 });
        break;
      case "goaway":
        this.reconnectAfterMs = f.reconnect_after || 0;
        if (this.ws) this.ws.close(1000);
        break;
      case "error":
        if (f.retry_after && f.code < 4500) this.reconnectAfterMs = f.retry_after;
        if (f.code >= 4500) this.onError(f);
        break;
    }
  }

  _ack() {
    if (this.lastSeq > this.ackedSeq && this.open) {
      this.ackedSeq = this.lastSeq;
      this._write({ t: "ack", seq: this.lastSeq });
    }
  }

  _onClose(code, reason) {
    this.open = false;
    const reconnect =
      code === 1000 ? this.reconnectAfterMs !== null :
      (code >= 4000 && code < 4500) || [1001, 1006, 1011].includes(code);
    if (this.stopped || !reconnect) {
      this.onState("closed");
      if (code >= 4500 || [1002, 1007, 1008, 1009].includes(code)) {
        const err = new Error(`${code} ${reason}`);
        for (const p of this.pending.values()) p.reject(err);
        this.pending.clear();
      }
      return;
    }
    let delay = this.reconnectAfterMs;
    if (delay === null) {
      const cap = Math.min(this.maxBackoffMs, 200 * 2 ** Math.min(this.attempt, 20));
      delay = Math.random() * cap; // full jitter
    }
    this.reconnectAfterMs = null;
    this.attempt++;
    this.onState("reconnecting");
    setTimeout(() => this.connect(), delay);
  }
}

if (typeof window !== "undefined") window.GatewayChat = GatewayChat;
